/* The walls the init applies to itself: Landlock (as _sys/landlock.py),
 * rlimits (as resource.setrlimit), and host-compiled seccomp filters (as
 * _sys/init_net.py's install_listener). */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
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

static int repr_path(char *out, size_t cap, const char *path) {
    buf b = {0};
    py_repr(&b, path, strlen(path));
    snprintf(out, cap, "%s", b.p ? b.p : "''");
    b_free(&b);
    return 0;
}

static int add_rules(int ruleset, const value *paths, const char *what, uint64_t rights,
                     uint64_t handled, oserr *e) {
    if (!paths) return 0;
    if (paths->kind != V_LIST) {
        oserr_msg(e, EINVAL, "landlock: %s paths are not a list", what);
        return -1;
    }
    for (size_t i = 0; i < paths->len; i++) {
        const value *p = paths->items[i];
        char shown[1024];
        if (p->kind != V_STR || strlen(p->s) != p->len) {
            oserr_msg(e, EINVAL, "landlock: %s path is not a path", what);
            return -1;
        }
        repr_path(shown, sizeof shown, p->s);
        int fd = open(p->s, O_PATH | O_CLOEXEC);
        if (fd < 0) {
            int err = errno;
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
    }
    return 0;
}

int landlock_restrict(const value *cfg, oserr *e) {
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

static const struct {
    const char *name;
    int resource;
} RLIMITS[] = {
    {"RLIMIT_CPU", RLIMIT_CPU},         {"RLIMIT_FSIZE", RLIMIT_FSIZE},
    {"RLIMIT_DATA", RLIMIT_DATA},       {"RLIMIT_STACK", RLIMIT_STACK},
    {"RLIMIT_CORE", RLIMIT_CORE},       {"RLIMIT_RSS", RLIMIT_RSS},
    {"RLIMIT_NPROC", RLIMIT_NPROC},     {"RLIMIT_NOFILE", RLIMIT_NOFILE},
    {"RLIMIT_MEMLOCK", RLIMIT_MEMLOCK}, {"RLIMIT_AS", RLIMIT_AS},
    {"RLIMIT_LOCKS", RLIMIT_LOCKS},     {"RLIMIT_SIGPENDING", RLIMIT_SIGPENDING},
    {"RLIMIT_MSGQUEUE", RLIMIT_MSGQUEUE}, {"RLIMIT_NICE", RLIMIT_NICE},
    {"RLIMIT_RTPRIO", RLIMIT_RTPRIO},   {"RLIMIT_RTTIME", RLIMIT_RTTIME},
};

int apply_rlimits(const value *rl, buf *why) {
    if (!rl) return 0;
    if (rl->kind != V_DICT) {
        b_puts(why, "rlimits: not a dict");
        return -1;
    }
    for (size_t i = 0; i < rl->len; i++) {
        const char *name = v_str(rl->items[2 * i]);
        int64_t v;
        int res = -1;
        for (size_t k = 0; name && k < sizeof RLIMITS / sizeof RLIMITS[0]; k++)
            if (strcmp(RLIMITS[k].name, name) == 0) res = RLIMITS[k].resource;
        if (res < 0 || v_int(rl->items[2 * i + 1], &v) || rl->items[2 * i + 1]->big) {
            b_printf(why, "%s: unknown resource or bad value", name ? name : "?");
            return -1;
        }
        rlim_t lim = v < 0 ? RLIM_INFINITY : (rlim_t)v;
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
