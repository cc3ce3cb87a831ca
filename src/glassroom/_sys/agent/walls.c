/* The walls the init applies to itself: Landlock (as _sys/landlock.py),
 * rlimits (as resource.setrlimit), and host-compiled seccomp filters (as
 * _sys/init_net.py's install_listener). */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef SYS_landlock_create_ruleset /* the same number on every architecture */
#define SYS_landlock_create_ruleset 444
#define SYS_landlock_add_rule 445
#define SYS_landlock_restrict_self 446
#endif

#define LL_CREATE_RULESET_VERSION 1u
#define LL_RULE_PATH_BENEATH 1

#define EXECUTE (1ull << 0)
#define WRITE_FILE (1ull << 1)
#define READ_FILE (1ull << 2)
#define READ_DIR (1ull << 3)
#define REMOVE_DIR (1ull << 4)
#define REMOVE_FILE (1ull << 5)
#define MAKE_DIR (1ull << 7)
#define MAKE_REG (1ull << 8)
#define MAKE_SOCK (1ull << 9)
#define MAKE_FIFO (1ull << 10)
#define MAKE_SYM (1ull << 12)
#define REFER (1ull << 13)
#define TRUNCATE (1ull << 14)
#define IOCTL_DEV (1ull << 15)
#define SCOPE_ABSTRACT_UNIX_SOCKET (1ull << 0)
#define SCOPE_SIGNAL (1ull << 1)

#define FILE_RIGHTS (EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV)
#define WRITE_RIGHTS                                                                           \
    (READ_FILE | READ_DIR | WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG |       \
     MAKE_SOCK | MAKE_FIFO | MAKE_SYM | REFER | TRUNCATE)

struct __attribute__((packed)) path_beneath {
    uint64_t allowed_access;
    int32_t parent_fd;
};

static void fail(oserr *e, const char *step) {
    int err = errno;
    oserr_msg(e, err, "landlock: %s: %s", step, strerror(err));
}

/* type(v).__name__ of a marshal value (a tuple decodes as a list, a frozenset
 * as a set). */
const char *py_type(const value *v) {
    switch (v ? v->kind : V_NONE) {
    case V_NONE: return "NoneType";
    case V_BOOL: return "bool";
    case V_INT: return "int";
    case V_STR: return "str";
    case V_BYTES: return "bytes";
    case V_LIST: return "list";
    case V_DICT: return "dict";
    default: return "set";
    }
}

static void __attribute__((noreturn)) raise_line(const char *line, size_t n) {
    static const char head[] =
        "Traceback (most recent call last):\n  File \"/.glassroom-init\", in configure\n";
    struct iovec iov[3] = {{(void *)head, sizeof head - 1}, {(void *)line, n}, {"\n", 1}};
    ssize_t w = writev(2, iov, 3);
    (void)w;
    _exit(1);
}

void py_raise(const char *fmt, ...) {
    char line[2048];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    raise_line(line, n < 0 ? 0 : (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

static int repr_path(char *out, size_t cap, const char *path) {
    buf b = {0};
    py_repr(&b, path, strlen(path));
    snprintf(out, cap, "%s", b.p ? b.p : "''");
    b_free(&b);
    return 0;
}

/* As landlock.py's `for path in paths: os.open(path, ...)`: what Python
 * iterates (a list, a dict's keys, a set, a str's characters) and what
 * os.open takes (str, bytes).  Anything else is the TypeError or ValueError
 * Python raises there: the init dies before it answers (py_raise). */
static int add_path(int ruleset, const value *p, const char *s, size_t n, const char *what,
                    uint64_t rights, uint64_t handled, oserr *e) {
    if (p && p->kind != V_STR && p->kind != V_BYTES)
        py_raise("TypeError: open: path should be string, bytes or os.PathLike, not %s",
                 py_type(p));
    int is_bytes = p && p->kind == V_BYTES;
    if (memchr(s, 0, n))
        py_raise(is_bytes ? "ValueError: open: embedded null character in path"
                          : "ValueError: embedded null byte");
    char shown[1024], *path = malloc(n + 1);
    if (!path) {
        oserr_set(e, ENOMEM, NULL);
        return -1;
    }
    memcpy(path, s, n);
    path[n] = 0;
    if (is_bytes) {
        buf b = {0};
        py_repr_value(&b, p);
        snprintf(shown, sizeof shown, "%s", b.p ? b.p : "b''");
        b_free(&b);
    } else {
        repr_path(shown, sizeof shown, path);
    }
    int fd = open(path, O_PATH | O_CLOEXEC), err = errno;
    free(path);
    if (fd < 0) {
        oserr_msg(e, err, "landlock: %s path %s: %s", what, shown, strerror(err));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        oserr_set(e, errno, NULL);
        close(fd);
        return -1;
    }
    uint64_t access = rights & handled;
    if (!S_ISDIR(st.st_mode)) access &= FILE_RIGHTS;
    struct path_beneath attr = {access, fd};
    long ret = syscall(SYS_landlock_add_rule, ruleset, LL_RULE_PATH_BENEATH, &attr, 0u);
    if (ret < 0) {
        char step[1200];
        snprintf(step, sizeof step, "add rule for %s path %s", what, shown);
        fail(e, step);
        close(fd);
        return -1;
    }
    close(fd);
    return 0;
}

/* One character of a str (file-system bytes: UTF-8, an undecodable byte alone). */
static size_t char_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t k = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (k > n) return 1;
    for (size_t i = 1; i < k; i++)
        if ((s[i] & 0xC0) != 0x80) return 1;
    return k;
}

static int add_rules(int ruleset, const value *paths, const char *what, uint64_t rights,
                     uint64_t handled, oserr *e) {
    switch (paths->kind) {
    case V_LIST: case V_OTHER: case V_DICT: { /* a dict: its keys */
        size_t step = paths->kind == V_DICT ? 2 : 1;
        for (size_t i = 0; i < paths->len; i++) {
            const value *p = paths->items[step * i];
            if (add_path(ruleset, p, p->s, p->len, what, rights, handled, e)) return -1;
        }
        return 0;
    }
    case V_STR: /* each character is a path */
        for (size_t i = 0, k; i < paths->len; i += k) {
            k = char_len((const unsigned char *)paths->s + i, paths->len - i);
            if (add_path(ruleset, NULL, paths->s + i, k, what, rights, handled, e)) return -1;
        }
        return 0;
    case V_BYTES: /* each item is an int */
        if (paths->len)
            py_raise("TypeError: open: path should be string, bytes or os.PathLike, not int");
        return 0;
    default:
        py_raise("TypeError: '%s' object is not iterable", py_type(paths));
    }
}

int landlock_restrict(const value *cfg, oserr *e) {
    /* sandbox_init.py reads them all (cfg["read"], ...) before it calls restrict() */
    static const char *const lists[] = {"read", "write", "execute", "devices", "listable"};
    for (size_t i = 0; i < sizeof lists / sizeof lists[0]; i++)
        if (!dict_get(cfg, lists[i])) py_raise("KeyError: '%s'", lists[i]);
    long abi = syscall(SYS_landlock_create_ruleset, NULL, (size_t)0, LL_CREATE_RULESET_VERSION);
    if (abi < 0) {
        if (errno != ENOSYS && errno != EOPNOTSUPP) {
            fail(e, "query ABI version");
            return -1;
        }
        abi = 0;
    }
    if (abi < 1) {
        oserr_msg(e, ENOSYS, "landlock: not supported by this kernel (ABI 0)");
        return -1;
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        fail(e, "prctl(PR_SET_NO_NEW_PRIVS)");
        return -1;
    }
    uint64_t handled = (1ull << 13) - 1; /* ABI 1: EXECUTE .. MAKE_SYM */
    if (abi >= 2) handled |= REFER;
    if (abi >= 3) handled |= TRUNCATE;
    if (abi >= 5) handled |= IOCTL_DEV;
    uint64_t scoped = abi >= 6 ? SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL : 0;
    /* struct landlock_ruleset_attr grows with the ABI: fs (1), net (4), scoped (6). */
    uint64_t attr[3] = {handled, 0, scoped};
    size_t size = abi >= 6 ? 24 : abi >= 4 ? 16 : 8;
    long rs = syscall(SYS_landlock_create_ruleset, attr, size, 0u);
    if (rs < 0) {
        fail(e, "create ruleset");
        return -1;
    }
    int ruleset = (int)rs, bad = 0;
    bad = add_rules(ruleset, dict_get(cfg, "read"), "read", READ_FILE | READ_DIR, handled, e) ||
          add_rules(ruleset, dict_get(cfg, "write"), "write", WRITE_RIGHTS, handled, e) ||
          add_rules(ruleset, dict_get(cfg, "execute"), "execute", EXECUTE | READ_FILE, handled,
                    e) ||
          add_rules(ruleset, dict_get(cfg, "devices"), "devices",
                    READ_FILE | WRITE_FILE | READ_DIR | IOCTL_DEV, handled, e) ||
          add_rules(ruleset, dict_get(cfg, "listable"), "listable", READ_DIR, handled, e);
    if (!bad && syscall(SYS_landlock_restrict_self, ruleset, 0u)) {
        fail(e, "restrict self");
        bad = 1;
    }
    close(ruleset);
    return bad ? -1 : (int)abi;
}

/* dir(resource) of CPython 3.11 on Linux, sorted: `type` NULL is an int
 * attribute (`num`), else the type of a non-int one.  getattr(resource, name)
 * is how the Python inits find a limit. */
static const struct {
    const char *name, *type;
    int num;
} RESOURCE[] = {
    {"RLIMIT_AS", NULL, RLIMIT_AS},
    {"RLIMIT_CORE", NULL, RLIMIT_CORE},
    {"RLIMIT_CPU", NULL, RLIMIT_CPU},
    {"RLIMIT_DATA", NULL, RLIMIT_DATA},
    {"RLIMIT_FSIZE", NULL, RLIMIT_FSIZE},
    {"RLIMIT_MEMLOCK", NULL, RLIMIT_MEMLOCK},
    {"RLIMIT_MSGQUEUE", NULL, RLIMIT_MSGQUEUE},
    {"RLIMIT_NICE", NULL, RLIMIT_NICE},
    {"RLIMIT_NOFILE", NULL, RLIMIT_NOFILE},
    {"RLIMIT_NPROC", NULL, RLIMIT_NPROC},
    {"RLIMIT_OFILE", NULL, RLIMIT_NOFILE},
    {"RLIMIT_RSS", NULL, RLIMIT_RSS},
    {"RLIMIT_RTPRIO", NULL, RLIMIT_RTPRIO},
    {"RLIMIT_RTTIME", NULL, RLIMIT_RTTIME},
    {"RLIMIT_SIGPENDING", NULL, RLIMIT_SIGPENDING},
    {"RLIMIT_STACK", NULL, RLIMIT_STACK},
    {"RLIM_INFINITY", NULL, -1},
    {"RUSAGE_CHILDREN", NULL, -1},
    {"RUSAGE_SELF", NULL, 0},
    {"RUSAGE_THREAD", NULL, 1},
    {"__doc__", "NoneType", 0},
    {"__file__", "str", 0},
    {"__loader__", "ExtensionFileLoader", 0},
    {"__name__", "str", 0},
    {"__package__", "str", 0},
    {"__spec__", "ModuleSpec", 0},
    {"error", "type", 0},
    {"getpagesize", "builtin_function_or_method", 0},
    {"getrlimit", "builtin_function_or_method", 0},
    {"getrusage", "builtin_function_or_method", 0},
    {"prlimit", "builtin_function_or_method", 0},
    {"setrlimit", "builtin_function_or_method", 0},
    {"struct_rusage", "type", 0},
};
#define NRESOURCE (sizeof RESOURCE / sizeof RESOURCE[0])

/* CPython's "Did you mean" (Python/suggestions.c): a weighted Levenshtein
 * distance, a case flip costing half a move. */
#define MOVE_COST 2
#define CASE_COST 1

static size_t subst_cost(char a, char b) {
    if ((a & 31) != (b & 31)) return MOVE_COST;
    if (a == b) return 0;
    if (a >= 'A' && a <= 'Z') a += 'a' - 'A';
    if (b >= 'A' && b <= 'Z') b += 'a' - 'A';
    return a == b ? CASE_COST : MOVE_COST;
}

static size_t lev_distance(const char *a, size_t an, const char *b, size_t bn, size_t max_cost) {
    size_t row[40];
    while (an && bn && a[0] == b[0]) a++, b++, an--, bn--;
    while (an && bn && a[an - 1] == b[bn - 1]) an--, bn--;
    if (!an || !bn) return (an + bn) * MOVE_COST;
    if (an > 40 || bn > 40) return max_cost + 1;
    if (bn < an) {
        const char *t = a;
        a = b, b = t;
        size_t tn = an;
        an = bn, bn = tn;
    }
    if ((bn - an) * MOVE_COST > max_cost) return max_cost + 1;
    for (size_t i = 0; i < an; i++) row[i] = (i + 1) * MOVE_COST;
    size_t result = 0;
    for (size_t bi = 0; bi < bn; bi++) {
        size_t distance = result = bi * MOVE_COST, minimum = SIZE_MAX;
        for (size_t i = 0; i < an; i++) {
            size_t substitute = distance + subst_cost(b[bi], a[i]);
            distance = row[i];
            size_t ins_del = (result < distance ? result : distance) + MOVE_COST;
            result = ins_del < substitute ? ins_del : substitute;
            row[i] = result;
            if (result < minimum) minimum = result;
        }
        if (minimum > max_cost) return max_cost + 1;
    }
    return result;
}

static const char *suggest(const char *name, size_t n) {
    const char *best = NULL;
    size_t best_d = SIZE_MAX;
    for (size_t i = 0; i < NRESOURCE; i++) {
        size_t in = strlen(RESOURCE[i].name);
        size_t max_d = (n + in + 3) * MOVE_COST / 6;
        if (best && best_d - 1 < max_d) max_d = best_d - 1;
        size_t d = lev_distance(name, n, RESOURCE[i].name, in, max_d);
        if (d > max_d) continue;
        if (!best || d < best_d) best = RESOURCE[i].name, best_d = d;
    }
    return best;
}

/* As the Python inits' `for name, value in cfg["rlimits"].items():
 * resource.setrlimit(getattr(resource, name), (value, value))`, in order: a
 * refused limit is a `fatal` (why), anything Python raises past its
 * `except (OSError, ValueError)` ends the init before it answers. */
int apply_rlimits(const value *rl, buf *why) {
    if (!rl) py_raise("KeyError: 'rlimits'");
    if (rl->kind != V_DICT)
        py_raise("AttributeError: '%s' object has no attribute 'items'", py_type(rl));
    for (size_t i = 0; i < rl->len; i++) {
        const value *key = rl->items[2 * i], *val = rl->items[2 * i + 1];
        if (key->kind != V_STR)
            py_raise("TypeError: attribute name must be string, not '%s'", py_type(key));
        const char *name = key->s;
        size_t k = 0;
        while (k < NRESOURCE && (strlen(RESOURCE[k].name) != key->len ||
                                 memcmp(RESOURCE[k].name, name, key->len)))
            k++;
        if (k == NRESOURCE) { /* the name as it is (a NUL too), and CPython's hint */
            const char *s = suggest(name, key->len);
            buf b = {0};
            b_puts(&b, "AttributeError: module 'resource' has no attribute '");
            b_put(&b, name, key->len > 1024 ? 1024 : key->len);
            b_puts(&b, "'");
            if (s) b_printf(&b, ". Did you mean: '%s'?", s);
            raise_line(b.p ? b.p : "AttributeError", b.p ? b.len : 14);
        }
        if (RESOURCE[k].type)
            py_raise("TypeError: '%s' object cannot be interpreted as an integer",
                     RESOURCE[k].type);
        int res = RESOURCE[k].num;
        if (res < 0 || res >= RLIM_NLIMITS) {
            b_printf(why, "%s: invalid resource specified", name);
            return -1;
        }
        if (val->kind != V_INT && val->kind != V_BOOL)
            py_raise("TypeError: '%s' object cannot be interpreted as an integer", py_type(val));
        if (val->big) py_raise("OverflowError: Python int too large to convert to C long");
        /* as CPython (PyLong_AsLongLong, cast): -1 is RLIM_INFINITY, -2 is 2**64-2 */
        rlim_t lim = (rlim_t)val->i;
        struct rlimit r = {lim, lim};
        if (setrlimit(res, &r) != 0) {
            /* what CPython's resource.setrlimit says */
            if (errno == EINVAL) b_printf(why, "%s: current limit exceeds maximum limit", name);
            else if (errno == EPERM) b_printf(why, "%s: not allowed to raise maximum limit", name);
            else b_printf(why, "%s: [Errno %d] %s", name, errno, strerror(errno));
            return -1;
        }
    }
    return 0;
}

int seccomp_install(const value *bpf, unsigned flags, oserr *e) {
    if (!bpf || bpf->kind != V_BYTES || bpf->len % 8 || bpf->len / 8 > 0xFFFF) {
        oserr_msg(e, EINVAL, "seccomp(NEW_LISTENER): %s", strerror(EINVAL));
        return -1;
    }
    struct sock_fprog prog = {(unsigned short)(bpf->len / 8), (struct sock_filter *)bpf->s};
    long fd = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
    if (fd < 0) {
        int err = errno;
        oserr_msg(e, err, "seccomp(NEW_LISTENER): %s", strerror(err));
        return -1;
    }
    return (int)fd;
}
