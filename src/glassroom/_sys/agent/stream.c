/* glassroom-init --stream: the gVisor tier's init (as _sys/init_stream.py).
 *
 * Under `runsc run` no host fd crosses into the sandbox: the only channel is
 * this process's stdin (supervisor -> init) and stdout (init -> supervisor),
 * framed: kind (1 byte) | request id (4, big endian) | length (4, big
 * endian) | payload.  In: `M` a marshal dict, `I` stdin bytes of a request,
 * `C` close its stdin.  Out: `J` a JSON reply, `O` / `E` a request's stdout
 * / stderr.  The pipes of each request are made here, and their output is
 * multiplexed into frames (bounded by the request's `max_output`).
 *
 * It is pid 1 of the container, so it reaps orphans too.  gVisor has no
 * pidfd_open: child exits arrive as SIGCHLD through a wake-up pipe.  gVisor
 * has no Landlock (ENOSYS) either: the walls Landlock builds on the
 * namespaces tier come from the OCI mounts (backends/_gvisor_spec.py).  What
 * this init applies itself: the seccomp programs the supervisor sends,
 * rlimits, no_new_privs and non-dumpable.  Every reply is init_stream.py's. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>
#include <utmp.h>

#define S_MAX_DATA (1 << 16)
#define K_JSON 'J'
#define K_OUT 'O'
#define K_ERR 'E'
#define K_MSG 'M'
#define K_IN 'I'
#define K_CLOSE 'C'

typedef struct sreq {
    int64_t rid;
    pid_t pid;
    int out_fd[2], out_kind[2], nouts;
    int stdin_fd;    /* -1: closed */
    int stdin_polled; /* waiting for POLLOUT (pending input) */
    char *pending;
    size_t plen, pcap;
    int eof;
    int64_t sent, max;
} sreq;

typedef struct stty {
    int64_t rid;
    int fd;
} stty;

static sreq **reqs;
static size_t nreqs, capreqs;
static stty *ttys;
static size_t nttys, capttys;
static int wake_r = -1, wake_w = -1;
static char preload[4096];

static unsigned char *inbuf;
static size_t inlen, incap;

/* -- output to the supervisor ------------------------------------------- */

static void shutdown_stream(void) {
    /* The supervisor went away: nothing may outlive it (pid 1 exits). */
    _exit(0);
}

static void frame(int kind, int64_t rid, const void *payload, size_t n) {
    unsigned char head[9];
    uint32_t r = (uint32_t)rid, len = (uint32_t)n;
    head[0] = (unsigned char)kind;
    for (int i = 0; i < 4; i++) {
        head[1 + i] = (unsigned char)(r >> (24 - 8 * i));
        head[5 + i] = (unsigned char)(len >> (24 - 8 * i));
    }
    struct iovec iov[2] = {{head, 9}, {(void *)payload, n}};
    int cnt = 2;
    struct iovec *v = iov;
    while (cnt) {
        ssize_t w = writev(1, v, cnt);
        if (w < 0) {
            if (errno == EINTR) continue;
            shutdown_stream();
        }
        size_t done = (size_t)w;
        while (cnt && done >= v->iov_len) {
            done -= v->iov_len;
            v++;
            cnt--;
        }
        if (cnt) {
            v->iov_base = (char *)v->iov_base + done;
            v->iov_len -= done;
        }
    }
}

static void send_buf(buf *b) {
    if (b->oom || !b->p) shutdown_stream();
    frame(K_JSON, 0, b->p, b->len);
    b_free(b);
}

static void send_fatal(const char *wall, const char *error) {
    buf b = {0};
    b_puts(&b, "{\"op\":\"fatal\",\"wall\":");
    json_str(&b, wall, strlen(wall), 0);
    b_puts(&b, ",\"error\":");
    json_str(&b, error, strlen(error), 0);
    b_puts(&b, "}");
    send_buf(&b);
}

static void send_error(int64_t rid, long err, const char *text, size_t n) {
    buf b = {0};
    b_printf(&b, "{\"op\":\"error\",\"id\":%lld,\"errno\":%ld,\"error\":", (long long)rid, err);
    json_str(&b, text, n, 0);
    b_puts(&b, "}");
    send_buf(&b);
}

/* -- input from the supervisor ------------------------------------------- */

static uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Read what fd 0 has (0 on EOF: shutdown). */
static void read_frames(void) {
    if (incap - inlen < (1 << 17)) {
        size_t cap = incap ? incap : 1 << 18;
        while (cap - inlen < (1 << 17)) cap *= 2;
        unsigned char *p = realloc(inbuf, cap);
        if (!p) shutdown_stream();
        inbuf = p;
        incap = cap;
    }
    ssize_t n = read(0, inbuf + inlen, 1 << 17);
    if (n < 0) {
        if (errno == EINTR || errno == EAGAIN) return;
        _exit(1);
    }
    if (n == 0) shutdown_stream();
    inlen += (size_t)n;
}

/* The next complete frame in inbuf, or 0. */
static int next_frame(size_t *off, int *kind, int64_t *rid, const unsigned char **payload,
                      size_t *n) {
    if (inlen - *off < 9) return 0;
    const unsigned char *p = inbuf + *off;
    uint32_t len = be32(p + 5);
    if (inlen - *off - 9 < len) return 0;
    *kind = p[0];
    *rid = be32(p + 1);
    *payload = p + 9;
    *n = len;
    *off += 9 + (size_t)len;
    return 1;
}

static void consume(size_t off) {
    memmove(inbuf, inbuf + off, inlen - off);
    inlen -= off;
}

/* A marshal dict; a malformed one is a supervisor bug: the init stops. */
static value *load_msg(const unsigned char *payload, size_t n) {
    value *v = marshal_load(payload, n);
    if (!v || v->kind != V_DICT) {
        send_fatal("init", "malformed message");
        _exit(125);
    }
    return v;
}

static int truthy(const value *v) {
    if (!v) return 0;
    switch (v->kind) {
    case V_NONE: return 0;
    case V_BOOL: case V_INT: return v->i != 0 || v->big;
    default: return v->len != 0 || v->kind == V_OTHER;
    }
}

/* -- walls ----------------------------------------------------------------- */

static void forwarder(int port, const char *path) {
    /* A short-lived child points fds 0/1 at /dev/null first, so the bridge
     * (which pid 1 adopts and reaps) never holds the supervisor's pipes. */
    pid_t pid = fork();
    if (pid == 0) {
        signal(SIGCHLD, SIG_DFL);
        int null = open("/dev/null", O_RDWR);
        if (null >= 0) {
            dup2(null, 0);
            dup2(null, 1);
        }
        start_forwarder(port, path);
        _exit(0);
    }
    if (pid > 0) {
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    }
}

static void configure(const value *cfg) {
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0); /* no /proc/1/mem for same-uid code */
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); /* the OCI spec sets it too */
    const value *progs = dict_get(cfg, "seccomp");
    if (progs && (progs->kind == V_LIST)) {
        for (size_t i = 0; i < progs->len; i++) {
            const value *p = progs->items[i];
            if (p->kind != V_BYTES) {
                send_fatal("seccomp", strerror(EINVAL));
                _exit(125);
            }
            struct sock_fprog fprog = {(unsigned short)(p->len / 8), (struct sock_filter *)p->s};
            if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog, 0, 0) != 0) {
                send_fatal("seccomp", strerror(errno));
                _exit(125);
            }
        }
    }
    const value *pre = dict_get(cfg, "preload");
    if (pre && pre->kind == V_STR && pre->len < sizeof preload) memcpy(preload, pre->s, pre->len + 1);
    buf why = {0};
    /* as init_stream.py: cfg["rlimits"] (walls.c, shared with the namespaces init) */
    if (apply_rlimits(dict_get(cfg, "rlimits"), &why)) {
        send_fatal("rlimits", why.p ? why.p : "rlimits");
        _exit(125);
    }
    const value *fwd = dict_get(cfg, "forward");
    if (truthy(fwd)) { /* the proxy bridge, as on namespaces */
        int64_t port;
        const char *sock = v_str(dict_get(fwd, "socket"));
        if (!v_int(dict_get(fwd, "port"), &port) && sock) forwarder((int)port, sock);
    }
    buf ready = {0};
    b_printf(&ready, "{\"op\":\"ready\",\"landlock_abi\":0,\"pid\":%d}", (int)getpid());
    send_buf(&ready);
}

/* -- requests -------------------------------------------------------------- */

static sreq *find_req(int64_t rid) {
    for (size_t i = nreqs; i-- > 0;)
        if (reqs[i]->rid == rid) return reqs[i];
    return NULL;
}

static stty *find_tty(int64_t rid) {
    for (size_t i = nttys; i-- > 0;)
        if (ttys[i].rid == rid) return &ttys[i];
    return NULL;
}

static void drop_tty(int64_t rid) {
    stty *t = find_tty(rid);
    if (!t) return;
    close(t->fd);
    *t = ttys[--nttys];
}

static void add_tty(int64_t rid, int fd) {
    stty *t = find_tty(rid);
    if (t) { /* as a dict assignment: the new one wins */
        t->fd = fd;
        return;
    }
    if (nttys == capttys) {
        capttys = capttys ? 2 * capttys : 8;
        ttys = realloc(ttys, capttys * sizeof *ttys);
        if (!ttys) _exit(1);
    }
    ttys[nttys++] = (stty){rid, fd};
}

static void close_out(sreq *r, int fd) {
    for (int i = 0; i < r->nouts; i++) {
        if (r->out_fd[i] != fd) continue;
        close(fd);
        r->out_fd[i] = r->out_fd[r->nouts - 1];
        r->out_kind[i] = r->out_kind[r->nouts - 1];
        r->nouts--;
        return;
    }
}

static void close_stdin(sreq *r) {
    if (r->stdin_fd >= 0) {
        close(r->stdin_fd);
        r->stdin_fd = -1;
    }
    r->stdin_polled = 0;
    r->plen = 0;
}

/* Forward one chunk of fd; 0 when nothing is left now (EOF or EAGAIN). */
static int relay(sreq *r, int fd) {
    static char chunk[S_MAX_DATA];
    int kind = -1;
    for (int i = 0; i < r->nouts; i++)
        if (r->out_fd[i] == fd) kind = r->out_kind[i];
    if (kind < 0) return 0;
    ssize_t n;
    do n = read(fd, chunk, sizeof chunk);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
    if (n <= 0) { /* EOF, or an error (EIO: the pty's slave side is closed) */
        close_out(r, fd);
        return 0;
    }
    r->sent += n;
    frame(kind, r->rid, chunk, (size_t)n);
    if (r->sent > r->max) { /* past the cap: the writer gets EPIPE, as on namespaces */
        while (r->nouts) close_out(r, r->out_fd[0]);
        return 0;
    }
    return 1;
}

/* Write pending stdin without blocking; the rest waits for POLLOUT. */
static void feed(sreq *r) {
    size_t done = 0;
    while (done < r->plen) {
        size_t want = r->plen - done < S_MAX_DATA ? r->plen - done : S_MAX_DATA;
        ssize_t w = write(r->stdin_fd, r->pending + done, want);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            close_stdin(r);
            return;
        }
        done += (size_t)w;
    }
    memmove(r->pending, r->pending + done, r->plen - done);
    r->plen -= done;
    if (r->plen) {
        r->stdin_polled = 1;
    } else {
        r->stdin_polled = 0;
        if (r->eof) close_stdin(r);
    }
}

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

static void register_req(int64_t rid, pid_t pid, const int *pfd, const int *pkind, int n,
                         const value *msg) {
    sreq *r = calloc(1, sizeof *r);
    if (!r) _exit(1);
    r->rid = rid;
    r->pid = pid;
    r->stdin_fd = -1;
    r->max = 1 << 20;
    const value *mx = dict_get(msg, "max_output");
    if (mx) v_int(mx, &r->max);
    for (int i = 0; i < n; i++) {
        set_nonblock(pfd[i]);
        if (pkind[i] == K_IN) {
            r->stdin_fd = pfd[i];
        } else if (r->nouts < 2) {
            r->out_fd[r->nouts] = pfd[i];
            r->out_kind[r->nouts++] = pkind[i];
        }
    }
    if (nreqs == capreqs) {
        capreqs = capreqs ? 2 * capreqs : 16;
        reqs = realloc(reqs, capreqs * sizeof *reqs);
        if (!reqs) _exit(1);
    }
    reqs[nreqs++] = r;
    buf b = {0};
    b_printf(&b, "{\"op\":\"started\",\"id\":%lld,\"pid\":%d}", (long long)rid, (int)pid);
    send_buf(&b);
}

/* env["LD_PRELOAD"] = " ".join(filter(None, (preload, env.get("LD_PRELOAD")))) */
static value **with_preload(value *env, size_t *saved_len, value ***saved_items) {
    *saved_len = env->len;
    *saved_items = env->items;
    if (!*preload || env->kind != V_DICT) return NULL;
    static value joined;
    static char text[8192];
    const value *old = dict_get(env, "LD_PRELOAD");
    const char *o = old && old->kind == V_STR ? old->s : "";
    size_t pl = strlen(preload), ol = old && old->kind == V_STR ? old->len : 0;
    if (pl + 1 + ol >= sizeof text) return NULL;
    memcpy(text, preload, pl);
    size_t n = pl;
    if (ol) {
        text[n++] = ' ';
        memcpy(text + n, o, ol);
        n += ol;
    }
    text[n] = 0;
    joined = (value){.kind = V_STR, .s = text, .len = n};
    static value key = {.kind = V_STR, .s = "LD_PRELOAD", .len = 10};
    value **items = malloc(sizeof(value *) * 2 * (env->len + 1));
    if (!items) return NULL;
    size_t cnt = 0;
    int replaced = 0;
    for (size_t i = 0; i < env->len; i++) {
        const value *k = env->items[2 * i];
        items[2 * cnt] = env->items[2 * i];
        items[2 * cnt + 1] = env->items[2 * i + 1];
        if (k->kind == V_STR && k->len == 10 && !memcmp(k->s, "LD_PRELOAD", 10)) {
            if (replaced) continue; /* one key, as in a dict */
            items[2 * cnt + 1] = &joined;
            replaced = 1;
        }
        cnt++;
    }
    if (!replaced) {
        items[2 * cnt] = &key;
        items[2 * cnt + 1] = &joined;
        cnt++;
    }
    env->items = items;
    env->len = cnt;
    return items;
}

enum body_kind { B_EXEC, B_PTY, B_FILE };

static void pipe_or_die(int p[2], int64_t rid, int *ok) {
    if (!*ok) return;
    if (pipe2(p, O_CLOEXEC) != 0) {
        oserr e;
        oserr_set(&e, errno, NULL);
        send_error(rid, e.err, e.text, strlen(e.text));
        *ok = 0;
    }
}

/* Fork the op's child with fresh pipes; the init relays them as frames. */
static void spawn(int64_t rid, value *msg, const char *op) {
    int pfd[3], pkind[3], np = 0; /* kept here */
    int cfd[3], nc = 0;           /* the child's */
    enum body_kind body;
    int ok = 1;
    value *env = dict_get(msg, "env");
    value **own_env = NULL;
    size_t env_len = 0;
    value **env_items = NULL;
    if (!strcmp(op, "exec") && truthy(dict_get(msg, "pty"))) {
        int master = -1, slave = -1, err = 0;
        const value *size = dict_get(msg, "pty");
        if (openpty(&master, &slave, NULL, NULL, NULL) != 0) {
            err = errno;
        } else {
            fcntl(master, F_SETFD, FD_CLOEXEC);
            fcntl(slave, F_SETFD, FD_CLOEXEC);
            int64_t rows, cols;
            if (size->kind != V_LIST || size->len != 2 || v_int(size->items[0], &rows) ||
                v_int(size->items[1], &cols) || rows < 0 || cols < 0 || rows > 0xFFFF ||
                cols > 0xFFFF) {
                err = EINVAL;
            } else {
                struct winsize ws = {(unsigned short)rows, (unsigned short)cols, 0, 0};
                if (ioctl(master, TIOCSWINSZ, &ws) != 0) err = errno;
            }
        }
        if (err) {
            if (master >= 0) close(master);
            if (slave >= 0) close(slave);
            char text[600];
            snprintf(text, sizeof text, "pty: [Errno %d] %s", err, strerror(err));
            send_error(rid, err, text, strlen(text));
            return;
        }
        /* A fork: the child needs the slave as its controlling tty. */
        int in = fcntl(master, F_DUPFD_CLOEXEC, 0);
        int tty = in < 0 ? -1 : fcntl(master, F_DUPFD_CLOEXEC, 0);
        if (tty < 0) {
            err = errno;
            if (in >= 0) close(in);
            close(master);
            close(slave);
            char text[600];
            snprintf(text, sizeof text, "pty: [Errno %d] %s", err, strerror(err));
            send_error(rid, err, text, strlen(text));
            return;
        }
        cfd[nc++] = slave;
        pfd[np] = in;
        pkind[np++] = K_IN;
        pfd[np] = master;
        pkind[np++] = K_OUT;
        add_tty(rid, tty);
        if (env) own_env = with_preload(env, &env_len, &env_items);
        body = B_PTY;
    } else if (!strcmp(op, "exec")) {
        int in[2] = {-1, -1}, out[2] = {-1, -1}, er[2] = {-1, -1};
        pipe_or_die(in, rid, &ok);
        pipe_or_die(out, rid, &ok);
        pipe_or_die(er, rid, &ok);
        if (!ok) {
            int all[6] = {in[0], in[1], out[0], out[1], er[0], er[1]};
            for (int i = 0; i < 6; i++)
                if (all[i] >= 0) close(all[i]);
            return;
        }
        cfd[0] = in[0], cfd[1] = out[1], cfd[2] = er[1], nc = 3;
        pfd[0] = in[1], pkind[0] = K_IN;
        pfd[1] = out[0], pkind[1] = K_OUT;
        pfd[2] = er[0], pkind[2] = K_ERR;
        np = 3;
        if (env) own_env = with_preload(env, &env_len, &env_items); /* the compat shim */
        body = B_EXEC;
    } else {
        const char *kind = v_str(dict_get(msg, "kind"));
        int p[2];
        if (kind && (!strcmp(kind, "read") || !strcmp(kind, "list") || !strcmp(kind, "write"))) {
            pipe_or_die(p, rid, &ok);
            if (!ok) return;
            int w = !strcmp(kind, "write");
            cfd[nc++] = w ? p[0] : p[1];
            pfd[np] = w ? p[1] : p[0];
            pkind[np++] = w ? K_IN : K_OUT;
        }
        body = B_FILE;
    }
    int errp[2];
    pid_t pid = -1;
    int fork_err = 0;
    if (pipe2(errp, O_CLOEXEC) == 0) {
        pid = fork();
        fork_err = errno;
    } else {
        fork_err = errno;
        errp[0] = errp[1] = -1;
    }
    if (pid == 0) {
        oserr e = {0};
        signal(SIGCHLD, SIG_DFL);
        close(wake_r);
        close(wake_w);
        close(errp[0]);
        for (int i = 0; i < np; i++) close(pfd[i]);
        if (body == B_FILE) { /* the control channel must not reach the op's child */
            int null = open("/dev/null", O_RDWR);
            if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0) {
                oserr_set(&e, errno, NULL);
                goto failed;
            }
        }
        setsid();
        if (body == B_PTY) {
            /* login_tty: TIOCSCTTY, the slave on 0/1/2 (its setsid fails: we made one) */
            if (login_tty(cfd[0]) != 0) {
                oserr_set(&e, errno, NULL);
                goto failed;
            }
            int std[3] = {0, 1, 2};
            exec_body(msg, errp[1], std, 3, &e);
        } else if (body == B_EXEC) {
            exec_body(msg, errp[1], cfd, nc, &e);
        } else {
            file_body(msg, errp[1], cfd, nc, &e);
        }
    failed:
        if (e.err == -1) _exit(127); /* not an OSError */
        char out[4200];
        int n = snprintf(out, sizeof out, "%d %s", e.err, e.text);
        if (n > 0) {
            ssize_t w = write(errp[1], out, (size_t)n < sizeof out ? (size_t)n : sizeof out - 1);
            (void)w;
        }
        _exit((e.err ? e.err : 1) & 0xFF);
    }
    if (own_env) {
        env->items = env_items;
        env->len = env_len;
        free(own_env);
    }
    if (errp[1] >= 0) close(errp[1]);
    for (int i = 0; i < nc; i++) close(cfd[i]);
    if (pid < 0) {
        if (errp[0] >= 0) close(errp[0]);
        for (int i = 0; i < np; i++) close(pfd[i]);
        drop_tty(rid);
        oserr e;
        oserr_set(&e, fork_err, NULL);
        send_error(rid, e.err, e.text, strlen(e.text));
        return;
    }
    char err[4200];
    ssize_t n = 0;
    for (;;) { /* to EOF: the exec (close-on-exec) or the op's own close */
        ssize_t r = read(errp[0], err + n, sizeof err - 1 - (size_t)n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        n += r;
        if ((size_t)n >= sizeof err - 1) break;
    }
    close(errp[0]);
    if (n > 0) {
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
        for (int i = 0; i < np; i++) close(pfd[i]);
        drop_tty(rid);
        long code = 0;
        ssize_t i = 0;
        int neg = 0;
        if (i < n && err[i] == '-') neg = 1, i++;
        while (i < n && err[i] >= '0' && err[i] <= '9' && code < 1000000)
            code = code * 10 + (err[i++] - '0');
        if (neg) code = -code;
        const char *text = memchr(err, ' ', (size_t)n);
        size_t tl = text ? (size_t)(n - (text + 1 - err)) : 0;
        send_error(rid, code, text ? text + 1 : "", tl);
        return;
    }
    register_req(rid, pid, pfd, pkind, np, msg);
}

static void remove_req(sreq *r) {
    for (size_t i = 0; i < nreqs; i++)
        if (reqs[i] == r) {
            memmove(&reqs[i], &reqs[i + 1], (nreqs - i - 1) * sizeof *reqs);
            nreqs--;
            break;
        }
    free(r->pending);
    free(r);
}

/* Reap every exited child (pid 1 adopts orphans); report ours. */
static void reap(void) {
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid < 0 && errno == EINTR) continue;
        if (pid <= 0) return;
        sreq *r = NULL;
        for (size_t i = 0; i < nreqs; i++)
            if (reqs[i]->pid == pid && reqs[i]->pid > 0) r = reqs[i];
        if (!r) continue;
        r->pid = 0;
        while (r->nouts) { /* what it wrote before exiting, then close: */
            int fd = r->out_fd[0];
            while (relay(r, fd)) {} /* a background grandchild writing on gets EPIPE */
            close_out(r, fd);
        }
        close_stdin(r);
        drop_tty(r->rid);
        int64_t rid = r->rid;
        remove_req(r);
        buf b = {0};
        if (WIFSIGNALED(status))
            b_printf(&b, "{\"op\":\"exit\",\"id\":%lld,\"code\":null,\"signal\":%d}",
                     (long long)rid, WTERMSIG(status));
        else
            b_printf(&b, "{\"op\":\"exit\",\"id\":%lld,\"code\":%d,\"signal\":null}",
                     (long long)rid, WEXITSTATUS(status));
        send_buf(&b);
    }
}

static void handle(int kind, int64_t rid, const unsigned char *payload, size_t n) {
    if (kind == K_IN || kind == K_CLOSE) {
        sreq *r = find_req(rid);
        if (!r || r->stdin_fd < 0) return;
        if (kind == K_IN) {
            if (r->plen + n > r->pcap) {
                size_t cap = r->pcap ? r->pcap : 1 << 16;
                while (cap < r->plen + n) cap *= 2;
                char *p = realloc(r->pending, cap);
                if (!p) _exit(1);
                r->pending = p;
                r->pcap = cap;
            }
            memcpy(r->pending + r->plen, payload, n);
            r->plen += n;
        } else {
            r->eof = 1;
        }
        feed(r);
        return;
    }
    if (kind != K_MSG) return;
    value *msg = load_msg(payload, n);
    const value *opv = dict_get(msg, "op");
    const char *op = v_str(opv);
    int64_t mid = 0, target = -1;
    v_int(dict_get(msg, "id"), &mid);
    v_int(dict_get(msg, "target"), &target);
    if (op && (!strcmp(op, "exec") || !strcmp(op, "file"))) {
        spawn(mid, msg, op);
    } else if (op && !strcmp(op, "signal")) {
        sreq *r = find_req(target);
        int64_t sig;
        if (r && r->pid > 0 && !v_int(dict_get(msg, "sig"), &sig)) kill(-r->pid, (int)sig);
    } else if (op && !strcmp(op, "resize")) {
        stty *t = find_tty(target);
        int64_t rows, cols;
        if (t && !v_int(dict_get(msg, "rows"), &rows) && !v_int(dict_get(msg, "cols"), &cols) &&
            rows >= 0 && cols >= 0 && rows <= 0xFFFF && cols <= 0xFFFF) {
            struct winsize ws = {(unsigned short)rows, (unsigned short)cols, 0, 0};
            ioctl(t->fd, TIOCSWINSZ, &ws);
        }
    } else if (op && !strcmp(op, "close_output")) {
        sreq *r = find_req(target);
        if (r)
            while (r->nouts) close_out(r, r->out_fd[0]);
    } else if (op && !strcmp(op, "statfs")) {
        const char *path = v_str(dict_get(msg, "path"));
        struct statvfs st;
        if (path && statvfs(path, &st) == 0) {
            unsigned long long total = (unsigned long long)st.f_blocks * st.f_frsize;
            unsigned long long avail = (unsigned long long)st.f_bavail * st.f_frsize;
            buf b = {0};
            b_printf(&b, "{\"op\":\"statfs\",\"id\":%lld,\"total\":%llu,\"used\":%lld}",
                     (long long)mid, total, (long long)(total - avail));
            send_buf(&b);
        } else {
            oserr e;
            oserr_set(&e, path ? errno : EINVAL, path);
            send_error(mid, e.err, e.text, strlen(e.text));
        }
    } else {
        buf t = {0};
        b_puts(&t, "unknown op ");
        py_repr_value(&t, opv);
        send_error(mid, 22, t.p ? t.p : "unknown op", t.p ? t.len : 10);
        b_free(&t);
    }
    marshal_free_all();
}

static void on_sigchld(int sig) {
    (void)sig;
    int saved = errno;
    char c = 0;
    ssize_t w = write(wake_w, &c, 1); /* only has to wake poll(); reap() does the rest */
    (void)w;
    errno = saved;
}

/* One round of fd 0: read, then handle every complete frame. */
static void input(void) {
    read_frames();
    size_t off = 0;
    int kind;
    int64_t rid;
    const unsigned char *payload;
    size_t n;
    /* handle() may spawn and so block on a child's errw only: never on fd 0 */
    while (next_frame(&off, &kind, &rid, &payload, &n)) {
        /* copy: handle() runs no read of fd 0, so inbuf stays put meanwhile */
        handle(kind, rid, payload, n);
    }
    consume(off);
}

static void loop(void) {
    struct pollfd *pfd = NULL;
    size_t cap = 0;
    for (;;) {
        size_t want = 2;
        for (size_t i = 0; i < nreqs; i++) want += (size_t)reqs[i]->nouts + 1;
        if (want > cap) {
            cap = 2 * want;
            pfd = realloc(pfd, cap * sizeof *pfd);
            if (!pfd) _exit(1);
        }
        nfds_t n = 0;
        for (size_t i = 0; i < nreqs; i++) {
            sreq *r = reqs[i];
            for (int k = 0; k < r->nouts; k++) pfd[n++] = (struct pollfd){r->out_fd[k], POLLIN, 0};
            if (r->stdin_polled && r->stdin_fd >= 0)
                pfd[n++] = (struct pollfd){r->stdin_fd, POLLOUT, 0};
        }
        nfds_t nreq_fds = n;
        pfd[n++] = (struct pollfd){wake_r, POLLIN, 0};
        pfd[n++] = (struct pollfd){0, POLLIN, 0};
        int got = poll(pfd, n, 1000);
        if (got < 0 && errno != EINTR) _exit(1);
        if (got > 0) {
            /* outputs and pending stdin first (their fds are all still open:
             * nothing below closes another request's fds), then fd 0 */
            for (nfds_t i = 0; i < nreq_fds; i++) {
                if (!pfd[i].revents) continue;
                int fd = pfd[i].fd;
                for (size_t k = 0; k < nreqs; k++) {
                    sreq *r = reqs[k];
                    if (pfd[i].events & POLLOUT) {
                        if (r->stdin_fd == fd && r->stdin_polled) {
                            feed(r);
                            break;
                        }
                    } else {
                        int mine = 0;
                        for (int j = 0; j < r->nouts; j++) mine |= r->out_fd[j] == fd;
                        if (mine) {
                            relay(r, fd);
                            break;
                        }
                    }
                }
            }
            if (pfd[nreq_fds].revents) {
                char drain[512];
                while (read(wake_r, drain, sizeof drain) > 0) {}
            }
            if (pfd[nreq_fds + 1].revents) input();
        }
        reap();
    }
}

int stream_main(void) {
    /* Only as the container's first process: the binary is executable inside
     * (gVisor applies noexec to pid 1 too), and run again by sandboxed code it
     * would be one more program there, outside tools.allow. */
    if (getpid() != 1) {
        static const char why[] = "glassroom-init --stream: only the container's pid 1 runs this\n";
        ssize_t w = write(2, why, sizeof why - 1);
        (void)w;
        return 126;
    }
    /* As CPython does at start-up, so commands inherit the same dispositions:
     * a write to a closed pipe or past RLIMIT_FSIZE fails (EPIPE, EFBIG). */
    signal(SIGPIPE, SIG_IGN);
    signal(SIGXFSZ, SIG_IGN);
    int wp[2];
    if (pipe2(wp, O_NONBLOCK | O_CLOEXEC) != 0) _exit(1);
    wake_r = wp[0];
    wake_w = wp[1];
    struct sigaction sa = {0};
    sa.sa_handler = on_sigchld;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGCHLD, &sa, NULL);
    /* the first M frame: config (anything before it is dropped) */
    for (;;) {
        read_frames();
        size_t off = 0;
        int kind;
        int64_t rid;
        const unsigned char *payload;
        size_t n;
        int done = 0;
        while (!done && next_frame(&off, &kind, &rid, &payload, &n)) {
            if (kind != K_MSG) continue;
            value *msg = load_msg(payload, n);
            const char *op = v_str(dict_get(msg, "op"));
            if (!op || strcmp(op, "config")) {
                send_fatal("init", "first message must be config");
                _exit(125);
            }
            configure(msg);
            marshal_free_all();
            done = 1;
        }
        if (done) {
            /* the frames after it (if any came with it) are handled as in the loop */
            size_t off2 = off;
            while (next_frame(&off2, &kind, &rid, &payload, &n)) handle(kind, rid, payload, n);
            consume(off2);
            break;
        }
        consume(off);
    }
    loop();
    return 0;
}
