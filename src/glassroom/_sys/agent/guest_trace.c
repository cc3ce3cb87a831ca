/* The file audit in a microVM guest: one tracer per request, as guest/agent.py.
 *
 * The request's child waits on a gate (a pipe) until its tracer, a fork of the
 * agent running tracer_guest (tracer.c), has seized it; only then does it
 * enter its walls, the trace filter last.  No tracer, no request: a tracer
 * that cannot attach fails the request (wall audit.level) and the child dies
 * at the closed gate having run nothing.  The agent forwards the tracer's
 * lines as "trace" frames, all of them before the request's exit or done.
 * After the command ends, its tracer ends with the last traced process;
 * descendants that left the process group get TRACE_GRACE_MS, then the tracer
 * is asked to kill them (EOF on its ctl pipe), then it is killed itself.
 */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define ATTACH_TIMEOUT_MS 20000 /* TCG guests are slow */
#define TRACE_GRACE_MS 1000
#define TRACE_KILL_MS 5000
#define TRACE_FRAME_BYTES (56 * 1024) /* under protocol.MAX_HEADER (64 KiB) */
#define TRACE_FRAME_EVENTS 512
#define TRACE_LINE_BYTES (32 * 1024)
#define TRACE_PART_MAX (1 << 18) /* no report line is that long */
#define MAX_TRACERS 260

struct gtrace {
    pid_t pid;
    int fd, ctl;
    buf part; /* the start of a line not yet whole */
    int exited, status, killed;
};

static value trace_bpf;          /* V_BYTES: installed last in each child; len 0: no audit */
static const value *trace_names; /* {"257": "openat", ...} */
static gtrace *live[MAX_TRACERS];

int gtrace_config(const char *bpf, size_t n, const value *names) {
    trace_bpf.kind = V_BYTES;
    trace_bpf.s = malloc(n + 1);
    if (!trace_bpf.s) return -1;
    memcpy(trace_bpf.s, bpf, n);
    trace_bpf.len = n;
    trace_names = names;
    return 0;
}

int gtrace_install(oserr *e) {
    /* Last: from here on every watched call stops for the tracer, which seized
     * this process before the gate opened (without one: ENOSYS). */
    return trace_bpf.len && seccomp_install(&trace_bpf, 0, e) < 0 ? -1 : 0;
}

int gate_open(int g[2]) {
    g[0] = g[1] = -1;
    return trace_bpf.len ? pipe2(g, O_CLOEXEC) : 0;
}

void gate_wait(int g[2]) {
    if (g[0] < 0) return;
    close(g[1]);
    char go = 0;
    ssize_t r;
    do r = read(g[0], &go, 1);
    while (r < 0 && errno == EINTR);
    close(g[0]);
    if (r != 1 || go != 'g') _exit(125); /* the gate was closed: no tracer, no run */
}

int gtrace_fd(const gtrace *t) { return t ? t->fd : -1; }

int gtrace_reaped(pid_t pid, int status) {
    for (int i = 0; i < MAX_TRACERS; i++)
        if (live[i] && live[i]->pid == pid) {
            live[i]->exited = 1;
            live[i]->status = status;
            return 1;
        }
    return 0;
}

static long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* The text of {"error": "..."} (the tracer's json_str: ASCII, simple escapes); "" if none. */
static void said_error(const char *line, char *out, size_t cap) {
    const char *p = line ? strstr(line, "{\"error\": \"") : NULL;
    size_t o = 0;
    out[0] = 0;
    if (!p) return;
    for (p += 11; *p && *p != '"' && o + 1 < cap; p++) {
        if (*p == '\\' && p[1]) {
            p++;
            if (*p == 'u') { /* non-ASCII: shown as '?' */
                for (int k = 0; k < 4 && p[1]; k++) p++;
                out[o++] = '?';
                continue;
            }
            out[o++] = *p == 'n' ? '\n' : *p == 't' ? '\t' : *p;
            continue;
        }
        out[o++] = *p;
    }
    out[o] = 0;
}

static gtrace *fork_tracer(pid_t target, char *why, size_t cap) {
    int rep[2] = {-1, -1}, ctl[2] = {-1, -1}, slot = -1;
    for (int i = 0; i < MAX_TRACERS && slot < 0; i++)
        if (!live[i]) slot = i;
    if (slot < 0 || pipe2(rep, O_CLOEXEC) || pipe2(ctl, O_CLOEXEC)) {
        snprintf(why, cap, "cannot trace the request: %s",
                 slot < 0 ? "too many tracers" : strerror(errno));
        for (int i = 0; i < 2; i++) {
            if (rep[i] >= 0) close(rep[i]);
            if (ctl[i] >= 0) close(ctl[i]);
        }
        return NULL;
    }
    pid_t tp = fork();
    if (tp == 0) {
        /* nothing of the agent's: not the host channel, not other commands' pipes */
        int keep[2] = {rep[1], ctl[0]};
        for (int fd = 3; fd < 1024; fd++)
            if (fd != keep[0] && fd != keep[1]) close(fd);
        close_range_from(1024, 1 << 20);
        _exit(tracer_guest(target, trace_names, rep[1], ctl[0]) & 0xFF);
    }
    int err = errno;
    close(rep[1]);
    close(ctl[0]);
    if (tp < 0) {
        close(rep[0]);
        close(ctl[1]);
        snprintf(why, cap, "cannot trace the request: %s", strerror(err));
        return NULL;
    }
    buf got = {0};
    long deadline = now_ms() + ATTACH_TIMEOUT_MS;
    char chunk[4096];
    while (!(got.p && memchr(got.p, '\n', got.len)) && got.len < 65536) {
        long left = deadline - now_ms();
        struct pollfd pf = {rep[0], POLLIN, 0};
        if (left <= 0) break;
        int r = poll(&pf, 1, (int)left);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        ssize_t n = read(rep[0], chunk, sizeof chunk);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        b_put(&got, chunk, (size_t)n);
    }
    char *nl = got.p ? memchr(got.p, '\n', got.len) : NULL;
    size_t first = nl ? (size_t)(nl - got.p) : got.len;
    if (nl) *nl = 0;
    /* Read by hand, not with json_load: its arena holds the request being served. */
    long long attached = 0;
    char end = 0;
    if (!got.p || sscanf(got.p, "{\"attached\": %lld%c", &attached, &end) != 2 || end != '}' ||
        attached != target) {
        char said[256];
        said_error(got.p, said, sizeof said);
        snprintf(why, cap, "cannot trace the request: %s", said[0] ? said : "no answer");
        b_free(&got);
        close(rep[0]);
        close(ctl[1]);
        kill(tp, SIGKILL);
        while (waitpid(tp, NULL, 0) < 0 && errno == EINTR) {
        }
        return NULL;
    }
    gtrace *t = calloc(1, sizeof *t);
    if (!t) _exit(1);
    t->pid = tp;
    t->fd = rep[0];
    t->ctl = ctl[1];
    if (nl) b_put(&t->part, nl + 1, got.len - first - 1);
    b_free(&got);
    fcntl(t->fd, F_SETFL, fcntl(t->fd, F_GETFL) | O_NONBLOCK);
    live[slot] = t;
    return t;
}

int gtrace_start(pid_t pid, int g[2], gtrace **out, char *why, size_t cap) {
    *out = NULL;
    if (g[0] < 0) return 0;
    close(g[0]);
    gtrace *t = fork_tracer(pid, why, cap);
    if (!t) {
        close(g[1]); /* the child dies at the closed gate */
        return -1;
    }
    ssize_t w;
    do w = write(g[1], "g", 1);
    while (w < 0 && errno == EINTR);
    close(g[1]);
    *out = t;
    return 0;
}

/* One "trace" frame a batch: the lines as the tracer wrote them (JSON objects). */
static void send_trace(int64_t rid, const char *lines, size_t n, const char *error) {
    buf head = {0}, frame = {0};
    b_printf(&head, "{\"op\":\"trace\",\"id\":%lld", (long long)rid);
    if (error) {
        b_puts(&head, ",\"error\":");
        json_str(&head, error, strlen(error) > 200 ? 200 : strlen(error), 0);
    }
    b_puts(&head, ",\"events\":[");
    int events = 0;
    for (size_t a = 0; a < n;) {
        const char *nl = memchr(lines + a, '\n', n - a);
        size_t len = nl ? (size_t)(nl - (lines + a)) : n - a;
        const char *line = lines + a;
        a += len + 1;
        if (len < 2 || line[0] != '{' || line[len - 1] != '}') continue;
        if (len > TRACE_LINE_BYTES) { /* cannot happen (the tracer cuts); never hide it */
            line = "{\"syscall\": \"?\", \"path\": \"?\", \"result\": \"?\"}";
            len = strlen(line);
        }
        if (events && (frame.len + len > TRACE_FRAME_BYTES || events >= TRACE_FRAME_EVENTS)) {
            b_puts(&frame, "]}");
            guest_frame(head.p, head.len, frame.p, frame.len);
            frame.len = 0;
            events = 0;
        }
        if (events) b_put(&frame, ",", 1);
        b_put(&frame, line, len);
        events++;
    }
    if (events || error) {
        b_puts(&frame, "]}");
        guest_frame(head.p, head.len, frame.p, frame.len);
    }
    b_free(&head);
    b_free(&frame);
}

void gtrace_end(int64_t rid, gtrace *t) {
    if (t->fd >= 0) close(t->fd);
    if (t->ctl >= 0) close(t->ctl);
    t->fd = t->ctl = -1;
    for (int i = 0; i < MAX_TRACERS; i++)
        if (live[i] == t) live[i] = NULL;
    int status = t->status;
    if (!t->exited) { /* at EOF it is exiting; after SIGKILL, do not hang on it */
        pid_t got;
        do got = waitpid(t->pid, &status, t->killed ? WNOHANG : 0);
        while (got < 0 && errno == EINTR);
        if (got == 0) status = SIGKILL;
        else if (got < 0) status = 0;
    }
    if (t->killed || !WIFEXITED(status) || WEXITSTATUS(status)) {
        char why[160];
        if (t->killed) snprintf(why, sizeof why, "killed after the request ended");
        else snprintf(why, sizeof why, "status %d", status);
        char text[256];
        snprintf(text, sizeof text, "the tracer ended abnormally (%s); reports may be missing", why);
        send_trace(rid, "", 0, text);
    }
    b_free(&t->part);
    free(t);
}

int gtrace_read(int64_t rid, gtrace *t) {
    static char chunk[1 << 16];
    ssize_t n = read(t->fd, chunk, sizeof chunk);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
    if (n <= 0) {
        gtrace_end(rid, t);
        return 1;
    }
    b_put(&t->part, chunk, (size_t)n);
    char *last = t->part.p ? memrchr(t->part.p, '\n', t->part.len) : NULL;
    if (last) {
        size_t whole = (size_t)(last - t->part.p) + 1;
        send_trace(rid, t->part.p, whole - 1, NULL);
        memmove(t->part.p, t->part.p + whole, t->part.len - whole);
        t->part.len -= whole;
    }
    if (t->part.len > TRACE_PART_MAX) t->part.len = 0;
    return 0;
}

int gtrace_nudge(gtrace *t, long since_ms) {
    if (since_ms > TRACE_GRACE_MS && t->ctl >= 0) {
        close(t->ctl); /* the tracer kills what is left of the command */
        t->ctl = -1;
    }
    if (since_ms > TRACE_GRACE_MS + TRACE_KILL_MS && !t->killed) {
        t->killed = 1;
        kill(t->pid, SIGKILL);
    }
    return since_ms > TRACE_GRACE_MS + 2 * TRACE_KILL_MS;
}

void gtrace_drain(int64_t rid, gtrace *t) {
    long start = now_ms();
    for (;;) {
        if (gtrace_nudge(t, now_ms() - start)) {
            gtrace_end(rid, t);
            return;
        }
        struct pollfd pf = {t->fd, POLLIN, 0};
        poll(&pf, 1, 100);
        if (gtrace_read(rid, t)) return;
    }
}
