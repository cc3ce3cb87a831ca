/* The proxy bridge (as _sys/init_net.py's start_forwarder): a process that
 * listens on 127.0.0.1:PORT in the sandbox's loopback-only netns and splices
 * every TCP connection to the egress proxy's unix socket.  Forked after
 * Landlock (confined like everything else), before the watch filter. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <grp.h>
#include <unistd.h>
#include <arpa/inet.h>

#define CHUNK (1 << 18)
#define MAX_CONNS 400
#define MAX_FD 4096 /* RLIMIT_NOFILE is 1024 */

typedef struct pair {
    int fd[2];
    char *pend[2]; /* bytes waiting to be written TO fd[k] */
    size_t plen[2];
    int eof[2];
} pair;

static pair *by_fd[MAX_FD];
static int npairs;
static char chunk[CHUNK];

static void close_pair(pair *p) {
    for (int k = 0; k < 2; k++) {
        by_fd[p->fd[k]] = NULL;
        close(p->fd[k]);
        free(p->pend[k]);
    }
    free(p);
    npairs--;
}

static void set_pend(pair *p, int k, const char *data, size_t n) {
    free(p->pend[k]);
    p->pend[k] = NULL;
    p->plen[k] = 0;
    if (n == 0) return;
    p->pend[k] = malloc(n);
    if (!p->pend[k]) return; /* out of memory: the bytes are lost, as a reset would */
    memcpy(p->pend[k], data, n);
    p->plen[k] = n;
}

static short mask(pair *p, int k) {
    short m = 0;
    if (!p->eof[k] && !p->plen[1 - k]) m |= POLLIN;
    if (p->plen[k]) m |= POLLOUT;
    return m;
}

static void serve(int port, const struct sockaddr *up, socklen_t uplen, uid_t drop) {
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (lfd < 0) return;
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sin = {0};
    sin.sin_family = AF_INET;
    sin.sin_port = htons((uint16_t)port);
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&sin, sizeof sin) || listen(lfd, 128)) return;
    /* The guest's forwarder starts as root (pid 1's child): bound, it needs nothing more. */
    if (drop && (setgroups(0, NULL) || setgid(drop) || setuid(drop))) return;
    static struct pollfd pfd[2 * MAX_CONNS + 1];
    for (;;) {
        nfds_t n = 0;
        pfd[n++] = (struct pollfd){lfd, POLLIN, 0};
        for (int fd = 0; fd < MAX_FD && n < 2 * MAX_CONNS + 1; fd++) {
            pair *p = by_fd[fd];
            if (!p) continue;
            int k = p->fd[0] == fd ? 0 : 1;
            pfd[n++] = (struct pollfd){fd, mask(p, k), 0};
        }
        if (poll(pfd, n, -1) < 0) {
            if (errno == EINTR) continue;
            return;
        }
        for (nfds_t i = 0; i < n; i++) {
            short ev = pfd[i].revents;
            int fd = pfd[i].fd;
            if (!ev) continue;
            if (fd == lfd) {
                while (npairs < MAX_CONNS) {
                    int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
                    if (c < 0) break; /* EAGAIN: drained; anything else: later */
                    if (c >= MAX_FD) {
                        close(c);
                        break;
                    }
                    int u = socket(up->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
                    if (u < 0 || u >= MAX_FD || connect(u, up, uplen)) {
                        if (u >= 0) close(u);
                        close(c);
                        continue;
                    }
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    int fl = fcntl(c, F_GETFL);
                    fcntl(c, F_SETFL, fl | O_NONBLOCK);
                    fl = fcntl(u, F_GETFL);
                    fcntl(u, F_SETFL, fl | O_NONBLOCK);
                    pair *p = calloc(1, sizeof *p);
                    if (!p) {
                        close(c);
                        close(u);
                        break;
                    }
                    p->fd[0] = c;
                    p->fd[1] = u;
                    by_fd[c] = by_fd[u] = p;
                    npairs++;
                }
                continue;
            }
            pair *p = by_fd[fd];
            if (!p) continue; /* closed earlier in this round */
            int k = p->fd[0] == fd ? 0 : 1, peer = p->fd[1 - k];
            if (ev & POLLOUT && p->plen[k]) {
                ssize_t w = send(fd, p->pend[k], p->plen[k], MSG_NOSIGNAL);
                if (w < 0) {
                    close_pair(p);
                    continue;
                }
                set_pend(p, k, p->pend[k] + w, p->plen[k] - (size_t)w);
                if (!p->plen[k] && p->eof[1 - k]) shutdown(fd, SHUT_WR);
            }
            if (ev & (POLLIN | POLLHUP) && !p->eof[k] && !p->plen[1 - k]) {
                ssize_t r = recv(fd, chunk, CHUNK, 0);
                if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                    close_pair(p);
                    continue;
                }
                if (r == 0) {
                    p->eof[k] = 1;
                    shutdown(peer, SHUT_WR);
                } else if (r > 0) {
                    ssize_t w = send(peer, chunk, (size_t)r, MSG_NOSIGNAL);
                    if (w < 0) {
                        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                            close_pair(p);
                            continue;
                        }
                        w = 0;
                    }
                    set_pend(p, 1 - k, chunk + w, (size_t)(r - w));
                }
            } else if (ev & (POLLERR | POLLNVAL) ||
                       (ev & POLLHUP && !(ev & POLLIN) && !p->plen[k])) {
                close_pair(p);
                continue;
            }
            if (p->eof[0] && p->eof[1] && !p->plen[0] && !p->plen[1]) {
                close_pair(p);
                continue;
            }
        }
    }
}

pid_t start_forwarder(int port, const char *path) {
    struct sockaddr_un sun = {0};
    sun.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof sun.sun_path) return -1;
    strcpy(sun.sun_path, path);
    pid_t pid = fork();
    if (pid != 0) return pid;
    close_range_from(3, 1 << 16);
    setsid();
    serve(port, (struct sockaddr *)&sun, sizeof sun, 0);
    _exit(0);
}

/* The microVM's bridge: 127.0.0.1:PORT in the guest to the host's proxy over
 * the guest's NIC (TCP), as nobody once listening. */
pid_t start_forwarder_tcp(int port, const char *host, int hport) {
    struct sockaddr_in up = {0};
    up.sin_family = AF_INET;
    up.sin_port = htons((uint16_t)hport);
    if (inet_pton(AF_INET, host, &up.sin_addr) != 1) return -1;
    pid_t pid = fork();
    if (pid != 0) return pid;
    close_range_from(3, 1 << 16);
    setsid();
    serve(port, (struct sockaddr *)&up, sizeof up, 65534);
    _exit(0);
}
