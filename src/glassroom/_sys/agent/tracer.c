/* The file audit's tracer: a drop-in for _sys/tracer.py, selected by `--tracer`.
 *
 * Same protocol (a JSON config line on stdin; "attached", one JSON object per
 * observed call, "synced" answers on stdout; EOF on stdin ends it), same
 * properties (observe only; PTRACE_O_EXITKILL; what memory said is checked
 * against what the kernel did), and the same records, key for key: the host
 * parses both with one reader (tracewatch.py, the guest agents).
 *
 * Why in C: the tracer stops every traced process twice per watched call, and
 * each stop costs the Python tracer an interpreter round; and the guest agent
 * of the microVM tier is compiled, so its file audit must not need python3.
 *
 * Threads, as in tracer.py: the main thread owns every ptrace request (ptrace
 * requires the thread that seized), one flushes the batch every 10 ms, one
 * reads stdin ("sync N").
 */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define T_CONT 7
#define T_SYSCALL 24
#define T_GETEVENTMSG 0x4201
#define T_SEIZE 0x4206
#define T_LISTEN 0x4208
#define T_GET_SYSCALL_INFO 0x420E
/* TRACESYSGOOD | TRACEFORK | TRACEVFORK | TRACECLONE | TRACEEXEC | TRACESECCOMP | EXITKILL */
#define T_OPTIONS (1 | 2 | 4 | 8 | 0x10 | 0x80 | 0x100000)
enum { EV_FORK = 1, EV_VFORK = 2, EV_CLONE = 3, EV_EXEC = 4, EV_SECCOMP = 7, EV_STOP = 128 };
enum { INFO_EXIT = 2, INFO_SECCOMP = 3 };
#define AT_FDCWD_U32 0xFFFFFF9Cu
#define T_AT_REMOVEDIR 0x200

#define T_MAX_PATH 4096
#define MAX_BATCH 4096
#define MAX_ARGV 256
#define MAX_ARG 1024
#define FLUSH_NS 10000000L

static long pt(long req, pid_t pid, unsigned long addr, unsigned long data) {
    return syscall(SYS_ptrace, req, (long)pid, addr, data);
}

/* ---- an event: its keys in insertion order, values as JSON text (as a dict) ---- */
typedef struct {
    char key[24];
    buf val;
} field;

typedef struct {
    const char *role; /* "path" or "path2" */
    unsigned long addr;
    buf raw;    /* the bytes read at the seccomp stop */
    buf before; /* their JSON text, to compare with the reading at exit */
    int unreadable;
} addr_t;

typedef struct ev {
    field f[24];
    int n;
    const char *name;
    addr_t addrs[2];
    int naddrs;
    int verify;   /* not an exec: the path is checked again at exit */
    buf *argv;    /* an exec's argv as read from memory: each item's JSON */
    size_t nargv;
    buf path_raw; /* the bytes of "path" as logged (for the open's check) */
} ev;

static field *ev_find(ev *e, const char *key) {
    for (int i = 0; i < e->n; i++)
        if (strcmp(e->f[i].key, key) == 0) return &e->f[i];
    return NULL;
}

/* Set `key` (in place when present, as a Python dict does); returns its value, emptied. */
static buf *ev_set(ev *e, const char *key) {
    field *f = ev_find(e, key);
    if (!f) {
        if (e->n >= (int)(sizeof e->f / sizeof e->f[0])) return NULL;
        f = &e->f[e->n++];
        snprintf(f->key, sizeof f->key, "%s", key);
        f->val = (buf){0};
    }
    f->val.len = 0;
    b_put(&f->val, "", 0);
    return &f->val;
}

static void ev_str(ev *e, const char *key, const char *s, size_t n) {
    buf *b = ev_set(e, key);
    if (b) json_str_text(b, s, n, -1);
}

/* "path" (as JSON) and the bytes it was made of. */
static void ev_path(ev *e, const char *s, size_t n) {
    ev_str(e, "path", s, n);
    e->path_raw.len = 0;
    b_put(&e->path_raw, s, n);
}

static void ev_lit(ev *e, const char *key, const char *json) {
    buf *b = ev_set(e, key);
    if (b) b_puts(b, json);
}

static void ev_free(ev *e) {
    if (!e) return;
    for (int i = 0; i < e->n; i++) b_free(&e->f[i].val);
    b_free(&e->path_raw);
    for (size_t i = 0; i < e->nargv; i++) b_free(&e->argv[i]);
    free(e->argv);
    for (int i = 0; i < e->naddrs; i++) {
        b_free(&e->addrs[i].raw);
        b_free(&e->addrs[i].before);
    }
    free(e);
}

/* The JSON text of a field's value equals `json`: equal texts, equal JSON. */
static int val_is(const field *f, const buf *json) {
    return f && f->val.len == json->len && memcmp(f->val.p, json->p, json->len) == 0;
}

/* ---- the output batch ---- */
static pthread_mutex_t batch_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t write_lock = PTHREAD_MUTEX_INITIALIZER;
static buf batch;
static int batch_lines;
static int out_fd = 1;          /* stdout; in a guest, the agent's pipe */
static int max_batch = MAX_BATCH; /* lines; a guest's pipe is read by the agent's one loop */
static int guest;               /* reports cut to what a guest frame carries (guest_line) */

static void write_out(const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(out_fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) _exit(4); /* the reader is gone: BrokenPipeError's exit */
        p += w;
        n -= (size_t)w;
    }
}

/* Under write_lock: what is batched now, then `extra`, in that order. */
static void flush_locked(const char *extra) {
    pthread_mutex_lock(&batch_lock);
    buf taken = batch;
    batch = (buf){0};
    batch_lines = 0;
    pthread_mutex_unlock(&batch_lock);
    if (taken.len) write_out(taken.p, taken.len);
    b_free(&taken);
    if (extra) write_out(extra, strlen(extra));
}

static void flush_out(void) {
    pthread_mutex_lock(&write_lock); /* one writer at a time keeps the batches in order */
    flush_locked(NULL);
    pthread_mutex_unlock(&write_lock);
}

static void guest_shape(ev *e);
static void guest_shrink(ev *e, buf *line);
#define G_LINE_BYTES (32 * 1024) /* a guest's report always fits a frame */

static void emit(ev *e) {
    if (guest) guest_shape(e);
    buf line = {0};
    b_put(&line, "{", 1);
    for (int i = 0; i < e->n; i++) {
        if (e->f[i].key[0] == '_') continue;
        if (line.len > 1) b_put(&line, ",", 1);
        json_str(&line, e->f[i].key, strlen(e->f[i].key), 0);
        b_put(&line, ":", 1);
        b_put(&line, e->f[i].val.p, e->f[i].val.len);
    }
    b_put(&line, "}\n", 2);
    if (guest && line.len > G_LINE_BYTES) guest_shrink(e, &line);
    pthread_mutex_lock(&batch_lock);
    b_put(&batch, line.p, line.len);
    int full = ++batch_lines >= max_batch;
    pthread_mutex_unlock(&batch_lock);
    b_free(&line);
    /* Backpressure: a slow reader blocks this write, and with it every stopped
     * tracee, instead of letting the batch grow without bound. */
    if (full) flush_out();
    ev_free(e);
}

static void *flusher(void *arg) {
    (void)arg;
    struct timespec ts = {0, FLUSH_NS};
    for (;;) { /* batches every few ms: a write per call would wake the host for each */
        nanosleep(&ts, NULL);
        flush_out();
    }
    return NULL;
}

static void *watch_stdin(void *arg) {
    (void)arg;
    char line[256];
    size_t have = 0;
    for (;;) {
        ssize_t r = read(0, line + have, sizeof line - 1 - have);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break; /* EOF: the host is gone; EXITKILL takes the tracees along */
        have += (size_t)r;
        char *nl;
        while ((nl = memchr(line, '\n', have))) {
            *nl = 0;
            char *s = line;
            while (*s == ' ' || *s == '\t' || *s == '\r') s++;
            if (strncmp(s, "sync ", 5) == 0) {
                char *num = s + 5, *end = num;
                while (*end >= '0' && *end <= '9') end++;
                while (*end == ' ' || *end == '\t' || *end == '\r') end++;
                if (end > num && !*end && (end - num) < 32) {
                    char reply[64];
                    size_t k = strspn(num, "0123456789");
                    snprintf(reply, sizeof reply, "{\"synced\":%.*s}\n", (int)k, num);
                    pthread_mutex_lock(&write_lock); /* after everything observed so far */
                    flush_locked(reply);
                    pthread_mutex_unlock(&write_lock);
                }
            }
            size_t used = (size_t)(nl + 1 - line);
            memmove(line, nl + 1, have - used);
            have -= used;
        }
        if (have == sizeof line - 1) have = 0; /* a line too long to be a sync: dropped */
    }
    pthread_mutex_lock(&write_lock); /* no report is cut in half by the exit */
    _exit(3);
    return NULL;
}

/* ---- the tracees ---- */
typedef struct {
    pid_t pid;
    pid_t parent; /* 0: not known */
    int nspid;    /* 0: not read yet */
    ev *pending;
} tracee;

static tracee *tr;
static size_t ntr, captr;
/* Taken by the main thread to change tr, and by a guest's stopper to read it. */
static pthread_mutex_t tr_lock = PTHREAD_MUTEX_INITIALIZER;
static const value *names; /* {"257": "openat", ...} */

static tracee *find(pid_t pid, int create) {
    for (size_t i = 0; i < ntr; i++)
        if (tr[i].pid == pid) return &tr[i];
    if (!create) return NULL;
    pthread_mutex_lock(&tr_lock);
    if (ntr == captr) {
        size_t cap = captr ? captr * 2 : 64;
        tracee *p = realloc(tr, cap * sizeof *p);
        if (!p) {
            pthread_mutex_unlock(&tr_lock);
            return NULL;
        }
        tr = p;
        captr = cap;
    }
    tr[ntr] = (tracee){.pid = pid};
    tracee *t = &tr[ntr++];
    pthread_mutex_unlock(&tr_lock);
    return t;
}

static void forget(pid_t pid) {
    pthread_mutex_lock(&tr_lock);
    for (size_t i = 0; i < ntr; i++)
        if (tr[i].pid == pid) {
            tr[i] = tr[--ntr];
            break;
        }
    pthread_mutex_unlock(&tr_lock);
}

/* ---- the tracee's memory (for the log only) ---- */
static size_t mem_read(pid_t pid, unsigned long addr, char *out, size_t size) {
    size_t got = 0;
    if (!addr) return 0;
    while (size > 0) {
        /* Never across a page boundary in one read: a string may end right
         * before an unmapped page, and a read spanning both would fail. */
        size_t chunk = 4096 - (addr % 4096);
        if (chunk > size) chunk = size;
        if (chunk > T_MAX_PATH) chunk = T_MAX_PATH;
        struct iovec local = {out + got, chunk}, remote = {(void *)addr, chunk};
        ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
        if (n <= 0) break;
        got += (size_t)n;
        if ((size_t)n < chunk) break;
        addr += (unsigned long)n;
        size -= (size_t)n;
    }
    return got;
}

/* The NUL-terminated string at addr (up to limit bytes) into out; -1 when not
 * even its first byte can be read (a bad pointer: the call fails with EFAULT),
 * so that no such path is mistaken for "" or for the cwd. */
static ssize_t mem_string(pid_t pid, unsigned long addr, char *out, size_t limit) {
    size_t len = 0;
    while (len < limit) {
        size_t want = limit - len < 256 ? limit - len : 256;
        size_t n = mem_read(pid, addr + len, out + len, want);
        if (!n) {
            if (!len) return -1;
            break;
        }
        char *nul = memchr(out + len, 0, n);
        if (nul) {
            len = (size_t)(nul - out);
            break;
        }
        len += n;
    }
    return (ssize_t)len;
}

static ssize_t readlink_at(const char *path, char *out, size_t cap) {
    ssize_t n = readlink(path, out, cap);
    return n >= (ssize_t)cap ? (ssize_t)cap : n;
}

/* /proc/PID/cwd or /proc/PID/fd/N, as text; "<cwd>" or "<fd/N>" when unreadable.
 * is_fd: an fd argument (fchmod...), where AT_FDCWD means nothing but EBADF. */
static size_t base_of(pid_t pid, unsigned long dirfd, int is_fd, char *out, size_t cap) {
    char link[32], path[64];
    unsigned fd = (unsigned)(dirfd & 0xFFFFFFFFu);
    if (fd == AT_FDCWD_U32 && !is_fd) snprintf(link, sizeof link, "cwd");
    else snprintf(link, sizeof link, "fd/%u", fd);
    snprintf(path, sizeof path, "/proc/%d/%s", (int)pid, link);
    ssize_t n = readlink_at(path, out, cap);
    if (n < 0) return (size_t)snprintf(out, cap, "<%s>", link);
    return (size_t)n;
}

/* The pid as the sandbox sees it (the last NSpid field), cached. */
static int ns_pid(pid_t pid) {
    tracee *t = find(pid, 0);
    if (t && t->nspid) return t->nspid;
    int got = (int)pid;
    char path[64], data[4096];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t n = read(fd, data, sizeof data - 1);
        close(fd);
        if (n > 0) {
            data[n] = 0;
            char *line = strstr(data, "\nNSpid:");
            if (line) {
                char *end = strchr(line + 1, '\n');
                if (end) *end = 0;
                char *last = strrchr(line + 7, '\t');
                char *p = last ? last + 1 : line + 7;
                while (*p == ' ' || *p == '\t') p++;
                if (*p) got = atoi(p);
            }
        }
    }
    if (t) t->nspid = got;
    return got;
}

static void flags_text(buf *b, unsigned long flags) {
    static const char *acc[] = {"O_RDONLY", "O_WRONLY", "O_RDWR", "O_ACCMODE"};
    static const struct {
        unsigned long bit;
        const char *name;
    } bits[] = {{O_CREAT, "O_CREAT"},         {O_EXCL, "O_EXCL"},         {O_TRUNC, "O_TRUNC"},
                {O_APPEND, "O_APPEND"},       {O_DIRECTORY, "O_DIRECTORY"}, {O_NOFOLLOW, "O_NOFOLLOW"},
                {O_PATH, "O_PATH"}};
    int tmpfile = (flags & O_TMPFILE) == O_TMPFILE; /* O_TMPFILE includes O_DIRECTORY's bit */
    b_puts(b, "\"");
    b_puts(b, acc[flags & 3]);
    for (size_t i = 0; i < sizeof bits / sizeof bits[0]; i++) {
        if (!(flags & bits[i].bit) || (tmpfile && bits[i].bit == O_DIRECTORY)) continue;
        b_puts(b, "|");
        b_puts(b, bits[i].name);
    }
    if (tmpfile) b_puts(b, "|O_TMPFILE");
    b_puts(b, "\"");
}

static void oct_mode(ev *e, unsigned long mode) {
    buf *b = ev_set(e, "mode");
    if (b) b_printf(b, "\"0o%lo\"", mode & 07777);
}

static const char *roles_of(const char *name) {
    /* Argument roles per syscall, one letter each: d dirfd, p path, q path2,
     * D dirfd2, f flags, m mode, h open_how, a atflags, r rename flags,
     * v argv, F an fd whose file is the path. */
    static const struct {
        const char *name, *roles;
    } t[] = {
        {"open", "pfm"},       {"openat", "dpfm"},     {"openat2", "dph"},    {"creat", "pm"},
        {"unlink", "p"},       {"unlinkat", "dpa"},    {"rename", "pq"},      {"renameat", "dpDq"},
        {"renameat2", "dpDqr"}, {"chmod", "pm"},       {"fchmodat", "dpm"},   {"fchmodat2", "dpm"},
        {"link", "pq"},        {"linkat", "dpDq"},     {"symlink", "qp"},     {"symlinkat", "qdp"},
        {"mkdir", "pm"},       {"mkdirat", "dpm"},     {"rmdir", "p"},        {"truncate", "p"},
        {"chown", "p"},        {"lchown", "p"},        {"fchownat", "dp"},    {"execve", "pv"},
        {"execveat", "dpv"},   {"stat", "p"},          {"lstat", "p"},        {"newfstatat", "dp"},
        {"statx", "dp"},       {"access", "p"},        {"faccessat", "dp"},   {"faccessat2", "dp"},
        {"readlink", "p"},     {"readlinkat", "dp"},   {"chdir", "p"},        {"mknod", "pm"},
        {"mknodat", "dpm"},    {"utime", "p"},         {"utimes", "p"},       {"futimesat", "dp"},
        {"utimensat", "dp"},   {"setxattr", "p"},      {"lsetxattr", "p"},    {"fsetxattr", "F"},
        {"removexattr", "p"},  {"lremovexattr", "p"},  {"fremovexattr", "F"}, {"fchmod", "Fm"},
        {"fchown", "F"},       {"ftruncate", "F"},     {"fallocate", "F"},
    };
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
        if (strcmp(t[i].name, name) == 0) return t[i].roles;
    return "";
}

static int is_open(const char *name) {
    return !strcmp(name, "open") || !strcmp(name, "openat") || !strcmp(name, "openat2") ||
           !strcmp(name, "creat");
}

static void argv_of(ev *e, pid_t pid, unsigned long addr) {
    static unsigned char ptrs[8 * MAX_ARGV];
    static char arg[MAX_ARG + 1];
    size_t n = mem_read(pid, addr, (char *)ptrs, sizeof ptrs);
    buf *b = ev_set(e, "argv");
    if (!b) return;
    free(e->argv);
    e->argv = calloc(MAX_ARGV, sizeof *e->argv);
    e->nargv = 0;
    b_put(b, "[", 1);
    for (size_t i = 0; i + 8 <= n && e->argv; i += 8) {
        unsigned long p = 0;
        for (int k = 7; k >= 0; k--) p = p << 8 | ptrs[i + (size_t)k];
        if (!p) break;
        ssize_t len = mem_string(pid, p, arg, MAX_ARG);
        buf *item = &e->argv[e->nargv++];
        /* cut to MAX_ARG characters of its text, as exec_truth cuts /proc's */
        json_str_text(item, arg, len < 0 ? 0 : (size_t)len, MAX_ARG);
        if (i) b_put(b, ",", 1);
        b_put(b, item->p, item->len);
    }
    b_put(b, "]", 1);
}

/* A whole path as Python's posixpath.normpath gives it (for comparing only). */
static size_t normpath(const char *in, size_t n, char *out) {
    if (!n) {
        out[0] = '.';
        return 1;
    }
    size_t lead = 0;
    if (in[0] == '/') lead = (n > 1 && in[1] == '/' && !(n > 2 && in[2] == '/')) ? 2 : 1;
    size_t o = lead, comps = 0;
    static size_t starts[T_MAX_PATH + 8];
    memset(out, '/', lead);
    for (size_t i = 0; i < n;) {
        while (i < n && in[i] == '/') i++;
        size_t j = i;
        while (j < n && in[j] != '/') j++;
        size_t len = j - i;
        if (len == 0 || (len == 1 && in[i] == '.')) {
        } else if (len == 2 && in[i] == '.' && in[i + 1] == '.' &&
                   (comps > 0 && !(o - starts[comps - 1] == 2 && out[starts[comps - 1]] == '.' &&
                                   out[starts[comps - 1] + 1] == '.'))) {
            o = starts[--comps];
            if (o > lead) o--; /* the slash before it */
        } else if (len == 2 && in[i] == '.' && in[i + 1] == '.' && lead) {
            /* ".." at the root stays at the root */
        } else {
            if (o > lead) out[o++] = '/';
            starts[comps++] = o;
            memcpy(out + o, in + i, len);
            o += len;
        }
        i = j;
    }
    if (o == 0) out[o++] = '.';
    return o;
}

static ev *entry(pid_t pid, unsigned long nr, const unsigned long *args) {
    char key[24];
    snprintf(key, sizeof key, "%lu", nr);
    const char *name = v_str(dict_get(names, key));
    if (!name) return NULL;
    const char *roles = roles_of(name);
    ev *e = calloc(1, sizeof *e);
    if (!e) return NULL;
    e->name = name;
    ev_str(e, "syscall", name, strlen(name));
    buf *b = ev_set(e, "pid");
    if (b) b_printf(b, "%d", ns_pid(pid));
    unsigned long dirfd = AT_FDCWD_U32, dirfd2 = AT_FDCWD_U32;
    int from_fd = 0;
    static char text[T_MAX_PATH + 1];
    for (int i = 0; roles[i] && i < 6; i++) {
        unsigned long a = args[i];
        switch (roles[i]) {
        case 'd': dirfd = a; break;
        case 'D': dirfd2 = a; break;
        case 'p':
        case 'q': {
            const char *role = roles[i] == 'p' ? "path" : "path2";
            ssize_t len = mem_string(pid, a, text, T_MAX_PATH);
            if (len < 0) { /* logged as such: "" and a flag, never a made-up name */
                char k[32];
                snprintf(k, sizeof k, "%s_unreadable", role);
                ev_lit(e, k, "true");
            }
            size_t got = len < 0 ? 0 : (size_t)len;
            if (roles[i] == 'p') ev_path(e, text, got);
            else ev_str(e, role, text, got);
            if (e->naddrs < 2) {
                addr_t *ad = &e->addrs[e->naddrs++];
                ad->role = role;
                ad->addr = a;
                ad->unreadable = len < 0;
                b_put(&ad->raw, text, got);
                json_str_text(&ad->before, text, got, -1);
            }
            break;
        }
        case 'F': { /* the file the fd names: already absolute (or <fd/N>) */
            size_t len = base_of(pid, a, 1, text, T_MAX_PATH);
            ev_path(e, text, len);
            from_fd = 1;
            break;
        }
        case 'r': {
            buf *fb = NULL;
            static const char *rn[] = {"RENAME_NOREPLACE", "RENAME_EXCHANGE", "RENAME_WHITEOUT"};
            for (int k = 0; k < 3; k++) {
                if (!(a & (1ul << k))) continue;
                if (!fb) {
                    fb = ev_set(e, "flags");
                    if (!fb) break;
                    b_puts(fb, "\"");
                } else {
                    b_puts(fb, "|");
                }
                b_puts(fb, rn[k]);
            }
            if (fb) b_puts(fb, "\"");
            break;
        }
        case 'f': {
            buf *fb = ev_set(e, "flags");
            if (fb) flags_text(fb, a);
            break;
        }
        case 'h': {
            unsigned char how[16];
            if (mem_read(pid, a, (char *)how, 16) == 16) {
                unsigned long fl = 0, mode = 0;
                for (int k = 7; k >= 0; k--) fl = fl << 8 | how[k];
                for (int k = 15; k >= 8; k--) mode = mode << 8 | how[k];
                buf *fb = ev_set(e, "flags");
                if (fb) flags_text(fb, fl);
                if (fl & 0100) oct_mode(e, mode);
            }
            break;
        }
        case 'm':
            if ((strcmp(name, "open") && strcmp(name, "openat")) || (i > 0 && (args[i - 1] & 0100)))
                oct_mode(e, a);
            break;
        case 'a':
            if (!strcmp(name, "unlinkat") && (a & T_AT_REMOVEDIR)) ev_str(e, "flags", "AT_REMOVEDIR", 12);
            break;
        case 'v': argv_of(e, pid, a); break;
        }
    }
    if (!strcmp(name, "creat")) ev_str(e, "flags", "O_WRONLY|O_CREAT|O_TRUNC", 24);
    /* A relative path, joined to the dir it is relative to. */
    for (int k = 0; k < e->naddrs; k++) {
        addr_t *ad = &e->addrs[k];
        int path2 = !strcmp(ad->role, "path2");
        if (ad->unreadable || (ad->raw.len && ad->raw.p[0] == '/')) continue;
        if (path2 && !strncmp(name, "symlink", 7)) continue;
        if (!path2 && from_fd) continue;
        size_t blen = base_of(pid, path2 ? dirfd2 : dirfd, 0, text, T_MAX_PATH);
        buf joined = {0};
        b_put(&joined, text, blen);
        if (ad->raw.len) {
            while (joined.len && joined.p[joined.len - 1] == '/') joined.len--;
            b_put(&joined, "/", 1);
            b_put(&joined, ad->raw.p, ad->raw.len);
        }
        if (path2) ev_str(e, "path2", joined.p ? joined.p : "", joined.len);
        else ev_path(e, joined.p ? joined.p : "", joined.len);
        b_free(&joined);
    }
    e->verify = strncmp(name, "exec", 4) != 0;
    if (!e->verify) {
        tracee *t = find(pid, 0);
        pid_t ppid = t ? t->parent : 0;
        if (ppid) {
            buf *pb = ev_set(e, "ppid");
            if (pb) b_printf(pb, "%d", ns_pid(ppid));
            char path[64], comm[64];
            snprintf(path, sizeof path, "/proc/%d/comm", (int)ppid);
            int fd = open(path, O_RDONLY | O_CLOEXEC);
            if (fd >= 0) {
                ssize_t n = read(fd, comm, sizeof comm);
                close(fd);
                if (n >= 0) {
                    size_t a = 0, z = (size_t)n;
                    while (a < z && strchr(" \t\n\r\v\f", comm[a])) a++;
                    while (z > a && strchr(" \t\n\r\v\f", comm[z - 1])) z--;
                    buf *cb = ev_set(e, "parent");
                    if (cb) json_str(cb, comm + a, z - a, 0);
                }
            }
        }
    }
    return e;
}

/* After a successful exec: what the kernel loaded and the argv it copied. */
static void exec_truth(pid_t pid, ev *e) {
    static char text[T_MAX_PATH + 1];
    static char raw[MAX_ARG * 8];
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/exe", (int)pid);
    ssize_t n = readlink_at(path, text, T_MAX_PATH);
    if (n >= 0) {
        buf exe = {0};
        json_str_text(&exe, text, (size_t)n, -1);
        if (!val_is(ev_find(e, "path"), &exe)) {
            buf *b = ev_set(e, "exe");
            if (b) b_put(b, exe.p, exe.len);
        }
        b_free(&exe);
    }
    snprintf(path, sizeof path, "/proc/%d/cmdline", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    size_t got = 0;
    while (got < sizeof raw) {
        ssize_t r = read(fd, raw + got, sizeof raw - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    close(fd);
    /* The args that end in a NUL (a cut-off last one is dropped), each cut to
     * MAX_ARG characters of its text. */
    buf list = {0}, item = {0};
    size_t count = 0;
    int differs = 0; /* argv != ev.get("argv", [])[: len(argv)] */
    b_put(&list, "[", 1);
    for (size_t a = 0; a < got;) {
        char *nul = memchr(raw + a, 0, got - a);
        if (!nul) break;
        if (count) b_put(&list, ",", 1);
        item.len = 0;
        json_str_text(&item, raw + a, (size_t)(nul - (raw + a)), MAX_ARG);
        b_put(&list, item.p, item.len);
        if (count >= e->nargv || e->argv[count].len != item.len ||
            memcmp(e->argv[count].p, item.p, item.len))
            differs = 1;
        count++;
        a = (size_t)(nul - raw) + 1;
    }
    b_put(&list, "]", 1);
    b_free(&item);
    if (!count) differs = 0; /* an empty argv from /proc is never taken */
    field *mem = ev_find(e, "argv");
    if (differs) {
        buf *b = ev_set(e, "argv_arg");
        if (b) {
            if (mem) b_put(b, mem->val.p, mem->val.len);
            else b_puts(b, "null");
        }
        b = ev_set(e, "argv");
        if (b) b_put(b, list.p, list.len);
    }
    b_free(&list);
}

static unsigned char info[88];

static int info_op(pid_t pid) {
    long n = pt(T_GET_SYSCALL_INFO, pid, sizeof info, (unsigned long)info);
    return n > 0 ? info[0] : 0;
}

static uint64_t le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int k = 7; k >= 0; k--) v = v << 8 | p[k];
    return v;
}

/* At the seccomp stop: copy the arguments; resume to the syscall's exit. */
static long on_seccomp(pid_t pid) {
    if (info_op(pid) != INFO_SECCOMP) return T_CONT;
    unsigned long nr = (unsigned long)le64(info + 24), args[6];
    for (int i = 0; i < 6; i++) args[i] = (unsigned long)le64(info + 32 + 8 * i);
    ev *e = entry(pid, nr, args);
    if (!e) return T_CONT;
    tracee *t = find(pid, 1);
    if (!t) {
        ev_free(e);
        return T_CONT;
    }
    ev_free(t->pending);
    t->pending = e;
    return T_SYSCALL;
}

static const char *errno_name(long err) {
    static const struct {
        int n;
        const char *s;
    } t[] = {{1, "EPERM"},    {2, "ENOENT"},   {4, "EINTR"},    {5, "EIO"},       {9, "EBADF"},
             {12, "ENOMEM"},  {13, "EACCES"},  {14, "EFAULT"},  {16, "EBUSY"},    {17, "EEXIST"},
             {18, "EXDEV"},   {20, "ENOTDIR"}, {21, "EISDIR"},  {22, "EINVAL"},   {24, "EMFILE"},
             {26, "ETXTBSY"}, {27, "EFBIG"},   {28, "ENOSPC"},  {30, "EROFS"},    {31, "EMLINK"},
             {36, "ENAMETOOLONG"}, {38, "ENOSYS"}, {39, "ENOTEMPTY"}, {40, "ELOOP"},
             {95, "EOPNOTSUPP"}, {122, "EDQUOT"}, {512, "ERESTARTSYS"}, {513, "ERESTARTNOINTR"},
             {514, "ERESTARTNOHAND"}, {516, "ERESTART_RESTARTBLOCK"}};
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
        if (t[i].n == err) return t[i].s;
    return NULL;
}

/* Prefer the kernel's own view of what was touched over the tracee's memory
 * (see tracer.py's _verify_paths): a successful open's fd names the file;
 * otherwise the buffer is read again, and a change is kept beside the first. */
static void verify_paths(pid_t pid, ev *e, long rval, int ok) {
    static char text[T_MAX_PATH + 1];
    if (!e->verify) return;
    if (is_open(e->name) && ok && rval >= 0) {
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/fd/%ld", (int)pid, rval);
        ssize_t n = readlink_at(path, text, T_MAX_PATH);
        if (n < 0) return;
        field *cur = ev_find(e, "path");
        buf want = {0}, real = {0};
        if (!cur) return;
        static char norm[2 * T_MAX_PATH + 8];
        size_t nl = normpath(e->path_raw.p ? e->path_raw.p : "", e->path_raw.len, norm);
        json_str_text(&want, norm, nl, -1);
        json_str_text(&real, text, (size_t)n, -1);
        if (!(want.len == real.len && !memcmp(want.p, real.p, real.len))) {
            buf *b = ev_set(e, "path_arg");
            if (b) b_put(b, cur->val.p, cur->val.len);
            ev_path(e, text, (size_t)n);
        }
        b_free(&want);
        b_free(&real);
        return;
    }
    for (int k = 0; k < e->naddrs; k++) {
        addr_t *ad = &e->addrs[k];
        ssize_t len = mem_string(pid, ad->addr, text, T_MAX_PATH);
        buf now = {0};
        json_str_text(&now, text, len < 0 ? 0 : (size_t)len, -1);
        if (!(now.len == ad->before.len && !memcmp(now.p, ad->before.p, now.len))) {
            ev_lit(e, "path_changed", "true");
            char key[32];
            snprintf(key, sizeof key, "%s_at_exit", ad->role);
            buf *b = ev_set(e, key);
            if (b) b_put(b, now.p, now.len);
        }
        b_free(&now);
    }
}

static void on_exit_stop(pid_t pid) {
    tracee *t = find(pid, 0);
    ev *e = t ? t->pending : NULL;
    if (!e) return;
    t->pending = NULL;
    if (info_op(pid) != INFO_EXIT) { /* killed at this very stop: say so */
        ev_str(e, "result", "unknown (no exit state)", 23);
        emit(e);
        return;
    }
    long rval = (long)le64(info + 24);
    int is_error = info[32];
    if (is_error) {
        const char *n = errno_name(-rval);
        char tmp[32];
        if (!n) {
            snprintf(tmp, sizeof tmp, "E%ld", -rval);
            n = tmp;
        }
        ev_str(e, "result", n, strlen(n));
    } else {
        ev_str(e, "result", "ok", 2);
    }
    verify_paths(pid, e, rval, !is_error);
    emit(e);
}

static void end_pending(ev *e, const char *why) {
    ev_str(e, "result", why, strlen(why));
    emit(e);
}

static void stopped(pid_t pid, int status) {
    int sig = WSTOPSIG(status), event = status >> 16;
    long resume = T_CONT;
    unsigned long inject = 0, msg = 0;
    find(pid, 1); /* a new child's first stop, maybe before its parent's event */
    if (sig == (SIGTRAP | 0x80)) { /* syscall-exit-stop, asked for at the seccomp stop */
        on_exit_stop(pid);
    } else if (sig == SIGTRAP && event == EV_SECCOMP) {
        resume = on_seccomp(pid);
    } else if (sig == SIGTRAP && (event == EV_FORK || event == EV_VFORK || event == EV_CLONE)) {
        if (pt(T_GETEVENTMSG, pid, 0, (unsigned long)&msg) == 0) {
            tracee *c = find((pid_t)msg, 1);
            if (c) c->parent = pid;
        }
    } else if (sig == SIGTRAP && event == EV_EXEC) {
        if (pt(T_GETEVENTMSG, pid, 0, (unsigned long)&msg) == 0) {
            pid_t former = (pid_t)msg;
            tracee *f = former != pid ? find(former, 0) : NULL;
            if (f && f->pending) { /* a thread ran exec */
                ev *moved = f->pending;
                f->pending = NULL;
                tracee *t = find(pid, 1);
                if (t && t->pending) end_pending(t->pending, "unknown (thread group exec)");
                if (t) t->pending = moved;
                else ev_free(moved);
            }
            /* The thread that ran exec now has the leader's id: its own id is
             * gone without an exit to report, and may be reused. */
            if (former != pid) forget(former);
        }
        tracee *t = find(pid, 0);
        if (t) t->nspid = 0;
        if (t && t->pending) {
            exec_truth(pid, t->pending);
            resume = T_SYSCALL; /* still on the way to execve's exit */
        }
    } else if (event == EV_STOP) {
        if (sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU) {
            pt(T_LISTEN, pid, 0, 0); /* group-stop: stay stopped, but keep seeing events */
            return;
        }
    } else if (event == 0) {
        inject = (unsigned long)sig; /* a signal for the tracee: delivered unchanged */
    }
    pt(resume, pid, 0, inject);
}

static void run(void) {
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, __WALL);
        if (pid < 0) {
            if (errno == EINTR) continue;
            break; /* ECHILD: no tracee is left */
        }
        if (WIFEXITED(status) || WIFSIGNALED(status)) {
            tracee *t = find(pid, 0);
            if (t && t->pending) {
                ev *e = t->pending;
                t->pending = NULL;
                end_pending(e, "unknown (process ended)");
            }
            forget(pid);
            continue;
        }
        if (WIFSTOPPED(status)) stopped(pid, status);
    }
}

static void say(const char *line) {
    write_out(line, strlen(line));
}

int tracer_main(void) {
    signal(SIGPIPE, SIG_IGN); /* a closed stdout is EPIPE: exit 4, as tracer.py */
    static char first[1 << 16];
    size_t n = 0;
    while (n < sizeof first - 1) {
        ssize_t r = read(0, first + n, 1);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0 || first[n] == '\n') break;
        n++;
    }
    value *cfg = json_load(first, n);
    value *sc = cfg && cfg->kind == V_DICT ? dict_get(cfg, "syscalls") : NULL;
    value *pv = cfg && cfg->kind == V_DICT ? dict_get(cfg, "pid") : NULL;
    int64_t pid = 0;
    if (!sc || sc->kind != V_DICT || !pv || v_int(pv, &pid) < 0 || pid <= 0 || pid > INT32_MAX) {
        say("{\"error\": \"bad config: want {\\\"pid\\\": N, \\\"syscalls\\\": {NR: NAME}}\"}\n");
        _exit(2);
    }
    for (size_t i = 0; i < sc->len; i++) {
        const value *k = sc->items[2 * i], *v = sc->items[2 * i + 1];
        const char *ks = v_str(k);
        if (!ks || !*ks || strspn(ks, "0123456789") != strlen(ks) || !v_str(v)) {
            say("{\"error\": \"bad config: syscalls: want {NR: NAME}\"}\n");
            _exit(2);
        }
    }
    json_keep();
    names = sc;
    if (pt(T_SEIZE, (pid_t)pid, 0, T_OPTIONS) != 0) {
        int err = errno;
        buf b = {0}, text = {0};
        b_printf(&text, "[Errno %d] ptrace(SEIZE, %lld): %s", err, (long long)pid, strerror(err));
        b_puts(&b, "{\"error\": ");
        json_str(&b, text.p, text.len, 0);
        b_puts(&b, "}\n");
        write_out(b.p, b.len);
        _exit(1);
    }
    find((pid_t)pid, 1);
    char line[64];
    snprintf(line, sizeof line, "{\"attached\": %lld}\n", (long long)pid);
    say(line);
    pthread_t th;
    if (pthread_create(&th, NULL, watch_stdin, NULL) || pthread_create(&th, NULL, flusher, NULL)) {
        say("{\"error\": \"cannot start the tracer's threads\"}\n");
        _exit(1);
    }
    run();
    flush_out();
    _exit(0);
}

/* ---- in a microVM guest: the agent's fork, reporting to a pipe ---- */

#define G_PATH_CHARS 1024 /* as the host cuts a path */

/* A guest's report always fits one frame (G_LINE_BYTES): every name is cut to
 * G_PATH_CHARS characters and G_STR_BYTES bytes as sent (with a mark), argv
 * and argv_arg to a byte budget (with the count of what was left out).  Cut
 * on the JSON text, never inside an escape or a surrogate pair. */
#define G_STR_BYTES 2048
#define G_ARGV_BYTES (12 * 1024)
#define G_ARGV_ARG_BYTES (4 * 1024)

/* The length of the JSON string literal at p (quote to quote), or 0. */
static size_t json_lit_len(const char *p, size_t n) {
    if (!n || p[0] != '"') return 0;
    for (size_t i = 1; i < n; i++) {
        if (p[i] == '\\') i++;
        else if (p[i] == '"') return i + 1;
    }
    return 0;
}

/* The literal at p (len n), cut to at most `chars` characters and `bytes`
 * bytes, the cut marked with an ellipsis; appended to out. */
static void json_lit_cut(buf *out, const char *p, size_t n, size_t chars, size_t bytes) {
    size_t i = 1, count = 0;
    while (i + 1 < n) {
        size_t unit = 1;
        if (p[i] == '\\') {
            unit = p[i + 1] == 'u' ? 6 : 2;
            if (unit == 6 && i + 12 <= n - 1 && p[i + 2] == 'd' && strchr("89ab", p[i + 3]) &&
                p[i + 6] == '\\' && p[i + 7] == 'u')
                unit = 12; /* a surrogate pair: one character */
        }
        if (count + 1 > chars || i + unit + 1 > bytes) break;
        i += unit;
        count++;
    }
    b_put(out, p, i);
    if (i + 1 < n) b_puts(out, "\\u2026");
    b_put(out, "\"", 1);
}

static void shape_str(field *f) {
    size_t n = json_lit_len(f->val.p, f->val.len);
    if (!n || (n <= G_STR_BYTES && n <= G_PATH_CHARS + 2)) return;
    buf out = {0};
    json_lit_cut(&out, f->val.p, n, G_PATH_CHARS, G_STR_BYTES);
    b_free(&f->val);
    f->val = out;
}

static void shape_list(field *f, long budget) {
    const char *p = f->val.p;
    size_t n = f->val.len, i = 1, total = 0, kept = 0;
    for (size_t j = 1; j < n;) { /* count the items */
        size_t l = json_lit_len(p + j, n - j);
        if (!l) break;
        total++;
        j += l + 1;
    }
    buf out = {0};
    b_put(&out, "[", 1);
    while (i < n) {
        size_t l = json_lit_len(p + i, n - i);
        if (!l) break;
        buf item = {0};
        json_lit_cut(&item, p + i, l, G_PATH_CHARS, G_STR_BYTES);
        budget -= (long)item.len + 1;
        if (kept) b_put(&out, ",", 1);
        if (budget < 0) {
            b_printf(&out, "\"\\u2026(%zu more arguments)\"", total - kept);
            b_free(&item);
            break;
        }
        b_put(&out, item.p, item.len);
        b_free(&item);
        kept++;
        i += l + 1; /* the comma or the closing bracket */
    }
    b_put(&out, "]", 1);
    b_free(&f->val);
    f->val = out;
}

static void guest_shape(ev *e) {
    static const char *strs[] = {"path", "path2", "exe", "parent", "path_arg", "path_at_exit",
                                 "path2_at_exit"};
    for (size_t k = 0; k < sizeof strs / sizeof strs[0]; k++) {
        field *f = ev_find(e, strs[k]);
        if (f) shape_str(f);
    }
    field *a = ev_find(e, "argv");
    if (a) shape_list(a, G_ARGV_BYTES);
    a = ev_find(e, "argv_arg");
    if (a) shape_list(a, G_ARGV_ARG_BYTES);
}

/* Cannot happen once shaped (7 names of 2 KiB and 16 KiB of argv); kept so
 * that a report is never dropped: what always fits. */
static void guest_shrink(ev *e, buf *line) {
    line->len = 0;
    b_puts(line, "{\"syscall\": ");
    json_str(line, e->name, strlen(e->name), 0);
    b_puts(line, ", \"path\": ");
    field *f = ev_find(e, "path");
    size_t n = f ? json_lit_len(f->val.p, f->val.len) : 0;
    if (n) json_lit_cut(line, f->val.p, n, 256, 1024);
    else b_puts(line, "\"?\"");
    b_puts(line, ", \"result\": ");
    field *r = ev_find(e, "result");
    if (r) b_put(line, r->val.p, r->val.len);
    else b_puts(line, "\"?\"");
    field *p = ev_find(e, "pid");
    if (p) {
        b_puts(line, ", \"pid\": ");
        b_put(line, p->val.p, p->val.len);
    }
    b_puts(line, "}\n");
}

static int stop_fd = -1;

static void *stopper(void *arg) {
    (void)arg;
    char c[64];
    for (;;) { /* EOF: the agent gave up waiting for the tree to end */
        ssize_t r = read(stop_fd, c, sizeof c);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
    }
    pthread_mutex_lock(&tr_lock);
    for (size_t i = 0; i < ntr; i++) kill(tr[i].pid, SIGKILL);
    pthread_mutex_unlock(&tr_lock);
    return NULL;
}

int tracer_guest(pid_t target, const value *nm, int out, int ctl) {
    static const int SIGS[] = {SIGCHLD, SIGINT, SIGTERM};
    for (size_t i = 0; i < sizeof SIGS / sizeof SIGS[0]; i++) signal(SIGS[i], SIG_DFL);
    signal(SIGPIPE, SIG_IGN); /* the agent gone: EPIPE, exit 4 (EXITKILL takes the tracees) */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    guest = 1;
    out_fd = out;
    stop_fd = ctl;
    max_batch = 256; /* a full pipe stops the tracer, and so the tracees */
    names = nm;
    if (pt(T_SEIZE, target, 0, T_OPTIONS) != 0) {
        int err = errno;
        buf b = {0}, text = {0};
        b_printf(&text, "[Errno %d] ptrace(SEIZE, %d): %s", err, (int)target, strerror(err));
        b_puts(&b, "{\"error\": ");
        json_str(&b, text.p, text.len > 200 ? 200 : text.len, 0);
        b_puts(&b, "}\n");
        write_out(b.p, b.len);
        return 1;
    }
    find(target, 1);
    char line[64];
    snprintf(line, sizeof line, "{\"attached\": %d}\n", (int)target);
    say(line);
    pthread_t th;
    if (pthread_create(&th, NULL, flusher, NULL) || pthread_create(&th, NULL, stopper, NULL))
        return 1;
    run();
    flush_out();
    return 0;
}
