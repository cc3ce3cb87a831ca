/* Running a command: as sandbox_init.py's _exec_body (fds, cwd, PATH lookup
 * as _which, execve) and _pty_body (the command on a pty, this process
 * relaying the host's pipes to and from the master). */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <utmp.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

/* The str has no NUL inside (Python: ValueError, the child exits 127). */
static int clean(const value *v) { return v && v->kind == V_STR && strlen(v->s) == v->len; }

/* _which: the first regular, executable PATH entry; else the first regular one. */
static char *which(const char *name, const char *path, oserr *e) {
    static char denied[8192];
    static char cand[8192];
    int have_denied = 0;
    const char *d = path;
    for (;;) {
        const char *end = strchr(d, ':');
        size_t dl = end ? (size_t)(end - d) : strlen(d);
        size_t nl = strlen(name);
        if (dl + 1 + nl < sizeof cand) {
            memcpy(cand, d, dl);
            cand[dl] = '/';
            memcpy(cand + dl + 1, name, nl + 1);
            struct stat st;
            if (stat(cand, &st) == 0 && S_ISREG(st.st_mode)) {
                if (access(cand, X_OK) == 0) return cand;
                if (!have_denied) {
                    memcpy(denied, cand, strlen(cand) + 1);
                    have_denied = 1;
                }
            }
        }
        if (!end) break;
        d = end + 1;
    }
    if (have_denied) return denied;
    oserr_msg(e, ENOENT, "%s: command not found", name);
    return NULL;
}

void exec_body(const value *msg, int errw, const int *fds, int nfds, oserr *e) {
    for (int t = 0; t < nfds && t < 3; t++)
        if (fds[t] != t && dup2(fds[t], t) < 0) {
            oserr_set(e, errno, NULL);
            return;
        }
    close_range_from(3, errw);
    close_range_from(errw + 1, 1 << 16);
    const value *env = dict_get(msg, "env"), *cwd = dict_get(msg, "cwd");
    const value *argv = dict_get(msg, "argv");
    e->err = -1; /* anything but an OSError below: exit 127 */
    if (!env || env->kind != V_DICT || !clean(cwd)) return;
    if (chdir(cwd->s) != 0) {
        oserr_set(e, errno, cwd->s);
        return;
    }
    if (!argv || argv->kind != V_LIST || argv->len == 0 || !clean(argv->items[0])) return;
    const char *exe = argv->items[0]->s;
    if (!strchr(exe, '/')) {
        const value *pv = dict_get(env, "PATH");
        const char *path = "";
        if (pv) {
            if (!clean(pv)) return;
            path = pv->s;
        }
        exe = which(exe, path, e);
        if (!exe) return;
        e->err = -1;
    }
    if (!*argv->items[0]->s) return; /* execve: argv first element cannot be empty */
    char **av = calloc(argv->len + 1, sizeof(char *));
    char **ev = calloc(env->len + 1, sizeof(char *));
    if (!av || !ev) return;
    for (size_t i = 0; i < argv->len; i++) {
        if (!clean(argv->items[i])) return;
        av[i] = argv->items[i]->s;
    }
    for (size_t i = 0; i < env->len; i++) {
        const value *k = env->items[2 * i], *v = env->items[2 * i + 1];
        if (!clean(k) || !clean(v) || k->len == 0 || strchr(k->s + 1, '=')) return;
        char *kv = malloc(k->len + v->len + 2);
        if (!kv) return;
        memcpy(kv, k->s, k->len);
        kv[k->len] = '=';
        memcpy(kv + k->len + 1, v->s, v->len + 1);
        ev[i] = kv;
    }
    execve(exe, av, ev);
    oserr_set(e, errno, exe);
}

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* What the command wrote before it exited (bounded: a background job of the
 * command that keeps writing does not hold its end). */
static void drain(int master, int out_w) {
    static char chunk[1 << 16];
    for (int i = 0; i < 64; i++) {
        ssize_t r = read(master, chunk, sizeof chunk);
        if (r <= 0) return; /* EAGAIN (nothing now) or EIO (the slave is closed) */
        if (write_all(out_w, chunk, (size_t)r)) return;
    }
}

#define PEND_CAP (2 << 16)

/* Copy in_r -> master and master -> out_w until pid exits; its status.  Input
 * waits in a bounded buffer while the terminal does not take it; EPIPE on
 * out_w hangs the terminal up (SIGHUP). */
static int relay(pid_t pid, int in_r, int out_w, int master) {
    static char pending[PEND_CAP];
    static char chunk[1 << 16];
    size_t plen = 0;
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pidfd < 0) _exit(errno & 0xFF);
    fcntl(master, F_SETFL, fcntl(master, F_GETFL) | O_NONBLOCK);
    int reading_in = 1, out_open = 1, master_open = 1, in_eof = 0;
    short master_ev = POLLIN;
    for (;;) {
        struct pollfd pfd[3];
        nfds_t n = 0;
        pfd[n++] = (struct pollfd){pidfd, POLLIN, 0};
        if (master_open) pfd[n++] = (struct pollfd){master, master_ev, 0};
        if (reading_in) pfd[n++] = (struct pollfd){in_r, POLLIN, 0};
        if (poll(pfd, n, -1) < 0) {
            if (errno == EINTR) continue;
            _exit(errno & 0xFF);
        }
        for (nfds_t i = 0; i < n; i++) {
            short ev = pfd[i].revents;
            int fd = pfd[i].fd;
            if (!ev) continue;
            if (fd == pidfd) {
                int status;
                while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
                if (master_open && out_open) drain(master, out_w);
                return status;
            }
            if (fd == master) {
                if (ev & POLLOUT && plen) {
                    ssize_t w = write(master, pending, plen < 4096 ? plen : 4096);
                    if (w >= 0) {
                        memmove(pending, pending + w, plen - (size_t)w);
                        plen -= (size_t)w;
                    } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
                        plen = 0;
                    }
                }
                if (ev & (POLLIN | POLLHUP | POLLERR)) {
                    ssize_t r = read(master, chunk, sizeof chunk);
                    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                        /* nothing now */
                    } else if (r <= 0) { /* EIO: no process has the slave open any more */
                        master_open = 0;
                    } else if (out_open) {
                        if (write_all(out_w, chunk, (size_t)r)) { /* EPIPE: the host stopped */
                            out_open = 0;
                            kill(-pid, SIGHUP);
                        }
                    }
                }
            } else if (fd == in_r) {
                ssize_t r = read(in_r, chunk, sizeof chunk);
                if (r < 0) _exit(errno & 0xFF);
                if (r == 0) {
                    reading_in = 0;
                    in_eof = 1;
                }
                if (plen + (size_t)r > PEND_CAP) _exit(EIO); /* cannot happen: bounded below */
                memcpy(pending + plen, chunk, (size_t)r);
                plen += (size_t)r;
                if (plen > (1 << 16) && reading_in) reading_in = 0; /* full: wait */
            }
        }
        if (master_open) master_ev = POLLIN | (plen ? POLLOUT : 0);
        if (!reading_in && !in_eof && plen <= (1 << 15)) reading_in = 1;
    }
}

void pty_body(const value *msg, int errw, const int *fds, int nfds, oserr *e) {
    if (nfds != 4) {
        e->err = -1;
        return;
    }
    int in_r = fds[0], out_w = fds[1], master = fds[2], slave = fds[3];
    int keep[5] = {in_r, out_w, master, slave, errw};
    /* close every fd from 3 up but those five (the init's other fds) */
    for (int i = 0; i < 5; i++)
        for (int j = i + 1; j < 5; j++)
            if (keep[j] < keep[i]) {
                int t = keep[i];
                keep[i] = keep[j];
                keep[j] = t;
            }
    int low = 3;
    for (int i = 0; i < 5; i++)
        if (keep[i] >= low) {
            close_range_from(low, keep[i]);
            low = keep[i] + 1;
        }
    close_range_from(low, 1 << 16);
    pid_t pid = fork();
    if (pid < 0) {
        oserr_set(e, errno, NULL);
        return;
    }
    if (pid == 0) {
        close(in_r);
        close(out_w);
        close(master);
        if (login_tty(slave) != 0) {
            oserr_set(e, errno, NULL);
            return;
        }
        int std[3] = {0, 1, 2};
        exec_body(msg, errw, std, 3, e);
        return; /* the error goes on errw, from this grandchild */
    }
    close(slave);
    close(errw);
    int status = relay(pid, in_r, out_w, master);
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        signal(sig, SIG_DFL);
        kill(getpid(), sig);
        _exit(128 + sig);
    }
    _exit(WEXITSTATUS(status));
}
