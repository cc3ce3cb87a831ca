/* glassroom-init: the loop.  See agent.h and _sys/sandbox_init.py, whose
 * protocol and behaviour this reproduces exactly. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>
#include <linux/seccomp.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif

int ctl_fd = 3;

typedef struct child {
    int pidfd;
    int64_t rid;
    pid_t pid;
} child;

typedef struct ptyent {
    int64_t rid;
    int master;
} ptyent;

static child *children;
static size_t nchildren, capchildren;
static ptyent *ptys;
static size_t nptys, capptys;

void close_range_from(int low, int high) {
    if (low >= high) return;
    if (syscall(SYS_close_range, (unsigned)low, (unsigned)(high - 1), 0u) == 0) return;
    for (int fd = low; fd < high; fd++) close(fd);
}

static void shutdown_init(int code) {
    /* The supervisor went away: nothing may outlive it. */
    for (size_t i = 0; i < nchildren; i++) kill(-children[i].pid, SIGKILL);
    _exit(code);
}

void send_json(buf *b) {
    int bad = b->oom || !b->p;
    if (!bad) {
        ssize_t n;
        do n = send(ctl_fd, b->p, b->len, MSG_NOSIGNAL);
        while (n < 0 && errno == EINTR);
        bad = n < 0;
    }
    b_free(b);
    if (bad) shutdown_init(0);
}

static void send_fatal(const char *wall, const char *error) {
    buf b = {0};
    b_puts(&b, "{\"op\":\"fatal\",\"wall\":");
    json_str(&b, wall, strlen(wall), 0);
    b_puts(&b, ",\"error\":");
    json_str(&b, error, strlen(error), 0);
    b_puts(&b, "}");
    send_json(&b);
}

static void send_error(int64_t rid, long err, const char *text, size_t n) {
    buf b = {0};
    b_printf(&b, "{\"op\":\"error\",\"id\":%lld,\"errno\":%ld,\"error\":", (long long)rid, err);
    json_str(&b, text, n, 0);
    b_puts(&b, "}");
    send_json(&b);
}

static int truthy(const value *v) {
    if (!v) return 0;
    switch (v->kind) {
    case V_NONE: return 0;
    case V_BOOL: case V_INT: return v->i != 0 || v->big;
    default: return v->len != 0 || v->kind == V_OTHER;
    }
}

static unsigned char msgbuf[MAX_MSG + 1];

static value *recv_msg(int *fds, int *nfds) {
    char cbuf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    struct iovec iov = {msgbuf, MAX_MSG + 1};
    struct msghdr mh = {0};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf;
    mh.msg_controllen = sizeof cbuf;
    ssize_t n;
    do n = recvmsg(ctl_fd, &mh, 0);
    while (n < 0 && errno == EINTR);
    *nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t cnt = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < cnt && *nfds < MAX_FDS; i++)
            memcpy(&fds[(*nfds)++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
    }
    if (n <= 0) shutdown_init(0);
    value *v = NULL;
    if (!(mh.msg_flags & MSG_TRUNC) && n <= MAX_MSG) v = marshal_load(msgbuf, (size_t)n);
    if (!v || v->kind != V_DICT) {
        /* the supervisor is trusted: this is a bug, and the init stops */
        send_fatal("init", "malformed message");
        shutdown_init(125);
    }
    return v;
}

static void configure(const value *cfg) {
    oserr e = {0};
    /* Not dumpable: code running as the same uid cannot open /proc/<init>/mem. */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    int abi = landlock_restrict(cfg, &e);
    if (abi < 0) {
        send_fatal("landlock", e.text);
        _exit(125);
    }
    buf why = {0};
    if (apply_rlimits(dict_get(cfg, "rlimits"), &why)) {
        send_fatal("rlimits", why.p ? why.p : "rlimits");
        _exit(125);
    }
    buf ready = {0};
    b_printf(&ready, "{\"op\":\"ready\",\"landlock_abi\":%d,\"pid\":%d", abi, (int)getpid());
    const value *fwd = dict_get(cfg, "forward"), *watch = dict_get(cfg, "netwatch");
    const value *trace = dict_get(cfg, "trace");
    if (truthy(fwd)) { /* the proxy bridge */
        int64_t port;
        const char *sock = v_str(dict_get(fwd, "socket"));
        if (v_int(dict_get(fwd, "port"), &port) || !sock) {
            send_fatal("network", "[Errno 22] forward: bad port or socket");
            _exit(125);
        }
        if (start_forwarder((int)port, sock) < 0) {
            oserr_set(&e, errno, NULL);
            send_fatal("network", e.text);
            _exit(125);
        }
    }
    if (truthy(watch)) { /* the direct-attempt watch */
        int fd = seccomp_install(watch, SECCOMP_FILTER_FLAG_NEW_LISTENER, &e);
        if (fd < 0) {
            send_fatal("network", e.text);
            _exit(125);
        }
        b_printf(&ready, ",\"netwatch_fd\":%d", fd);
    }
    if (truthy(trace)) { /* the file/exec audit: last, so nothing above is traced */
        if (seccomp_install(trace, 0, &e) < 0) {
            send_fatal("audit.level", e.text);
            _exit(125);
        }
    }
    b_puts(&ready, "}");
    send_json(&ready);
}

typedef void (*body_fn)(const value *, int, const int *, int, oserr *);

static void close_fds(const int *fds, int n) {
    for (int i = 0; i < n; i++) close(fds[i]);
}

/* Fork a child that runs body; report its start and, later, its exit.
 * 0 if it failed before its op started (reported as error). */
static int spawn(int64_t rid, const int *fds, int nfds, body_fn body, const value *msg) {
    int errp[2];
    if (pipe2(errp, O_CLOEXEC) != 0) {
        oserr e;
        oserr_set(&e, errno, NULL);
        close_fds(fds, nfds);
        send_error(rid, e.err, e.text, strlen(e.text));
        return 0;
    }
    pid_t pid = fork();
    if (pid == 0) {
        oserr e = {0};
        close(errp[0]);
        setsid();
        close(ctl_fd);
        body(msg, errp[1], fds, nfds, &e);
        /* Before the op started, errw carries the error; once the op has closed
         * errw (and started streaming) the errno is the exit code. */
        if (e.err == -1) _exit(127); /* not an OSError (sandbox_init: finally) */
        char out[4200];
        int n = snprintf(out, sizeof out, "%d %s", e.err, e.text);
        if (n > 0) {
            ssize_t w = write(errp[1], out, (size_t)n < sizeof out ? (size_t)n : sizeof out - 1);
            (void)w;
        }
        _exit((e.err ? e.err : 1) & 0xFF);
    }
    int fork_err = errno;
    close(errp[1]);
    close_fds(fds, nfds);
    if (pid < 0) {
        oserr e;
        close(errp[0]);
        oserr_set(&e, fork_err, NULL);
        send_error(rid, e.err, e.text, strlen(e.text));
        return 0;
    }
    char err[4096];
    ssize_t n;
    do n = read(errp[0], err, sizeof err);
    while (n < 0 && errno == EINTR);
    close(errp[0]);
    if (n > 0) {
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
        long code = 0;
        size_t i = 0;
        int neg = 0;
        if (i < (size_t)n && err[i] == '-') neg = 1, i++;
        while (i < (size_t)n && err[i] >= '0' && err[i] <= '9' && code < 1000000)
            code = code * 10 + (err[i++] - '0');
        if (neg) code = -code;
        const char *text = memchr(err, ' ', (size_t)n);
        size_t tl = text ? (size_t)n - (size_t)(text + 1 - err) : 0;
        send_error(rid, code, text ? text + 1 : "", tl);
        return 0;
    }
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pidfd < 0) { /* cannot watch it: it must not run unwatched */
        kill(-pid, SIGKILL);
        kill(pid, SIGKILL);
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
        oserr e;
        oserr_set(&e, errno ? errno : EMFILE, NULL);
        send_error(rid, e.err, e.text, strlen(e.text));
        return 0;
    }
    if (nchildren == capchildren) {
        capchildren = capchildren ? 2 * capchildren : 16;
        children = realloc(children, capchildren * sizeof *children);
        if (!children) shutdown_init(1);
    }
    children[nchildren++] = (child){pidfd, rid, pid};
    buf b = {0};
    b_printf(&b, "{\"op\":\"started\",\"id\":%lld,\"pid\":%d}", (long long)rid, (int)pid);
    send_json(&b);
    return 1;
}

static ptyent *find_pty(int64_t rid) {
    for (size_t i = 0; i < nptys; i++)
        if (ptys[i].rid == rid) return &ptys[i];
    return NULL;
}

int set_winsize(int master, const value *rows, const value *cols) {
    int64_t r, c;
    if (v_int(rows, &r) || v_int(cols, &c) || r < 0 || c < 0 || r > 0xFFFF || c > 0xFFFF) {
        errno = EINVAL;
        return -1;
    }
    struct winsize ws = {(unsigned short)r, (unsigned short)c, 0, 0};
    return ioctl(master, TIOCSWINSZ, &ws);
}

/* exec on a new pseudo-terminal from the sandbox's own devpts; the child
 * (pty_body) relays; this init keeps a copy of the master for resize/signal. */
static void spawn_pty(int64_t rid, int *fds, int nfds, const value *msg) {
    if (nfds > 2) close_fds(fds + 2, nfds - 2); /* stderr: a terminal has one output stream */
    if (nfds > 2) nfds = 2;
    int master = -1, slave = -1;
    const value *size = dict_get(msg, "pty");
    int err = 0;
    if (openpty(&master, &slave, NULL, NULL, NULL) != 0) {
        err = errno;
    } else {
        fcntl(master, F_SETFD, FD_CLOEXEC);
        fcntl(slave, F_SETFD, FD_CLOEXEC);
        if (size->kind != V_LIST || size->len != 2) err = EINVAL;
        else if (set_winsize(master, size->items[0], size->items[1])) err = errno ? errno : EINVAL;
    }
    if (err || nfds != 2) {
        if (!err) err = EINVAL;
        close_fds(fds, nfds);
        if (master >= 0) close(master);
        if (slave >= 0) close(slave);
        char text[600];
        snprintf(text, sizeof text, "pty: [Errno %d] %s", err, strerror(err));
        send_error(rid, err, text, strlen(text));
        return;
    }
    int four[4] = {fds[0], fds[1], fcntl(master, F_DUPFD_CLOEXEC, 0), slave};
    if (four[2] < 0) {
        int e2 = errno;
        close_fds(fds, 2);
        close(master);
        close(slave);
        char text[600];
        snprintf(text, sizeof text, "pty: [Errno %d] %s", e2, strerror(e2));
        send_error(rid, e2, text, strlen(text));
        return;
    }
    if (spawn(rid, four, 4, pty_body, msg)) {
        ptyent *p = find_pty(rid);
        if (p) {
            p->master = master; /* as a dict assignment: the old one stays open */
            return;
        }
        if (nptys == capptys) {
            capptys = capptys ? 2 * capptys : 8;
            ptys = realloc(ptys, capptys * sizeof *ptys);
            if (!ptys) shutdown_init(1);
        }
        ptys[nptys++] = (ptyent){rid, master};
    } else {
        close(master);
    }
}

/* The session (and process group) on request rid's pty, or 0. */
static pid_t pty_session(int64_t rid) {
    ptyent *p = find_pty(rid);
    pid_t sid = 0;
    if (!p || ioctl(p->master, TIOCGSID, &sid) != 0) return 0;
    return sid;
}

static void reap(size_t idx) {
    child c = children[idx];
    children[idx] = children[--nchildren];
    close(c.pidfd);
    ptyent *p = find_pty(c.rid);
    if (p) {
        close(p->master); /* the last master: what is left on the tty gets SIGHUP */
        *p = ptys[--nptys];
    }
    int status = 0;
    while (waitpid(c.pid, &status, 0) < 0 && errno == EINTR) {}
    buf b = {0};
    if (WIFSIGNALED(status))
        b_printf(&b, "{\"op\":\"exit\",\"id\":%lld,\"code\":null,\"signal\":%d}", (long long)c.rid,
                 WTERMSIG(status));
    else
        b_printf(&b, "{\"op\":\"exit\",\"id\":%lld,\"code\":%d,\"signal\":null}", (long long)c.rid,
                 WEXITSTATUS(status));
    send_json(&b);
}

static void handle(const value *msg, int *fds, int nfds) {
    const value *opv = dict_get(msg, "op");
    const char *op = v_str(opv);
    int64_t rid = 0;
    const value *idv = dict_get(msg, "id");
    if (idv) v_int(idv, &rid);
    if (op && !strcmp(op, "config")) {
        configure(msg);
    } else if (op && !strcmp(op, "exec")) {
        if (truthy(dict_get(msg, "pty"))) spawn_pty(rid, fds, nfds, msg);
        else spawn(rid, fds, nfds, exec_body, msg);
        return;
    } else if (op && !strcmp(op, "file")) {
        spawn(rid, fds, nfds, file_body, msg);
        return;
    } else if (op && !strcmp(op, "signal")) {
        int64_t target, sig;
        const value *tv = dict_get(msg, "target");
        if (!v_int(tv, &target) && !v_int(dict_get(msg, "sig"), &sig)) {
            for (size_t i = 0; i < nchildren; i++) {
                if (children[i].rid != target) continue;
                /* a pty's command is in a session of its own: signal that too */
                pid_t groups[2] = {children[i].pid, pty_session(target)};
                for (int g = 0; g < 2; g++)
                    if (groups[g] > 0) kill(-groups[g], (int)sig);
            }
        }
    } else if (op && !strcmp(op, "resize")) {
        int64_t target = -1;
        v_int(dict_get(msg, "target"), &target);
        ptyent *p = find_pty(target);
        int err = 0;
        if (p && set_winsize(p->master, dict_get(msg, "rows"), dict_get(msg, "cols")))
            err = errno ? errno : EINVAL;
        /* the answer (errno 0: done) lets the host order the resize before later input */
        send_error(rid, err, "resize", 6);
    } else if (op && !strcmp(op, "netwatch-taken")) { /* the supervisor holds the listener */
        int64_t fd;
        if (!v_int(dict_get(msg, "fd"), &fd) && fd >= 0 && fd < (1 << 20)) close((int)fd);
    } else {
        buf t = {0};
        b_puts(&t, "unknown op ");
        py_repr_value(&t, opv);
        send_error(rid, 22, t.p ? t.p : "unknown op", t.p ? t.len : 10);
        b_free(&t);
    }
    close_fds(fds, nfds); /* fds no op took */
}

static void loop(void) {
    struct pollfd *pfd = NULL;
    size_t cap = 0;
    for (;;) {
        size_t n = nchildren + 1;
        if (n > cap) {
            cap = 2 * n;
            pfd = realloc(pfd, cap * sizeof *pfd);
            if (!pfd) shutdown_init(1);
        }
        pfd[0] = (struct pollfd){ctl_fd, POLLIN, 0};
        for (size_t i = 0; i < nchildren; i++) pfd[i + 1] = (struct pollfd){children[i].pidfd, POLLIN, 0};
        if (poll(pfd, n, -1) < 0) {
            if (errno == EINTR) continue;
            shutdown_init(1);
        }
        for (size_t i = 0; i < n; i++) {
            if (!pfd[i].revents) continue;
            if (i == 0) {
                int fds[MAX_FDS], nfds;
                value *msg = recv_msg(fds, &nfds);
                handle(msg, fds, nfds);
                marshal_free_all();
                continue;
            }
            for (size_t k = 0; k < nchildren; k++)
                if (children[k].pidfd == pfd[i].fd) {
                    reap(k);
                    break;
                }
            /* Orphans re-parented to bwrap's pid 1 are reaped by it, not here. */
        }
    }
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--stream") == 0) return stream_main(); /* gVisor (stream.c) */
    if (argc > 1 && strcmp(argv[1], "--tracer") == 0) return tracer_main(); /* file audit (tracer.c) */
    /* microVM (guest.c): pid 1 of the guest, started by the kernel as /.glassroom/guest-agent */
    const char *base = argc > 0 ? strrchr(argv[0], '/') : NULL;
    if ((argc > 1 && strcmp(argv[1], "--guest") == 0) ||
        (argc > 0 && strcmp(base ? base + 1 : argv[0], "guest-agent") == 0))
        return guest_main();
    if (argc > 1) ctl_fd = atoi(argv[argc - 1]); /* the supervisor passes the number */
    /* As CPython does at start-up, so commands inherit the same dispositions:
     * a write to a closed pipe or past RLIMIT_FSIZE fails (EPIPE, EFBIG). */
    signal(SIGPIPE, SIG_IGN);
    signal(SIGXFSZ, SIG_IGN);
    int fds[MAX_FDS], nfds;
    value *msg = recv_msg(fds, &nfds);
    const char *op = v_str(dict_get(msg, "op"));
    if (!op || strcmp(op, "config")) {
        send_fatal("init", "first message must be config");
        _exit(125);
    }
    configure(msg);
    close_fds(fds, nfds);
    marshal_free_all();
    loop();
}
