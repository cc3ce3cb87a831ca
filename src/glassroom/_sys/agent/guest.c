/* glassroom-init --guest: pid 1 of a glassroom microVM, the compiled guest agent.
 *
 * A drop-in for guest/agent.py: the same framed protocol (guest/protocol.py:
 * ">II" header and payload lengths, a JSON header, an opaque payload) on the
 * same virtio-serial port, the same boot (mounts, the task's minimal /dev,
 * sysctls), the same walls for every command and file op (its own cgroup,
 * uid 1000, no new privileges, Landlock, rlimits, the host's seccomp filter),
 * the same watch of direct network attempts, the proxy bridge and the
 * checkpoint handshake (quiesce/resume, with a reseed of the kernel's RNG).
 *
 * The file audit (an audit level other than "actions"): each request gets
 * its own tracer, a fork of this agent running tracer.c (guest_trace.c).  It
 * never runs a command it cannot trace.
 *
 * Why C: the Python agent's interpreter start and imports are most of a
 * microVM's cold boot under TCG, and the image needs no python3 for it.
 */
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/random.h>
#include <linux/seccomp.h>
#include <net/if.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <utmp.h>

#define VERSION 3 /* guest/protocol.py VERSION */
#define MAX_HEADER (64 * 1024)
#define MAX_PAYLOAD (256 * 1024)
#define CHUNK (64 * 1024)
#define UID 1000
#define GID 1000
#define CGROUP "/sys/fs/cgroup/task"
#define PORT_NAME "glassroom.0"
#define SCRATCH_SERIAL "glassroom-scratch"
#define AGENT_DEV "/run/glassroom-dev"
#define SCRATCH_MNT "/run/glassroom-scratch"
#define EXIT_GRACE_MS 100
#define PTY_PENDING_MAX (1 << 20)
/* A command's stdin pipe is non-blocking, like a pty's master: what it does
 * not read yet waits here (a command that never reads must not stop the agent,
 * whose main loop would then hang in write(2) with every other request).
 * Past this, its stdin is closed (the rest is dropped, as by a reader gone). */
#define STDIN_PENDING_MAX (64 << 20) /* of the agent's memory, outside the task's cgroup */
/* After its exit, what is left in a command's pipe is sent (a pipe holds at
 * most pipe-max-size, 1 MiB); a descendant that left the process group and
 * keeps writing must not keep the agent in that drain for ever. */
#define DRAIN_MAX ((1 << 20) + CHUNK)
/* How often a blocking wait on a child (a file op, a command's start) looks
 * whether it was stopped (SIGSTOP from the task, uid 1000 like the child). */
#define CHILD_POLL_MS 200
#define MAX_PROCS 256
#define MAX_WRITES 64
#define MAX_REFUSE 16

typedef struct proc {
    int64_t rid;
    pid_t pid;
    int fd[2];            /* stdout, stderr (or the pty master, then -1) */
    const char *name[2];  /* "stdout"/"stderr" or "pty" */
    int stdin_w, tty;
    char *pending;        /* input not yet taken: pending[poff, plen) */
    size_t poff, plen, pcap;
    int stdin_eof;        /* close stdin_w once pending is written */
    int exited, status;
    struct timespec exited_at;
    gtrace *tr; /* its tracer (the file audit), until it has ended */
} proc;

typedef struct wreq {
    int64_t rid;
    char *path;
    int64_t mode;
    char *data;
    size_t len, cap;
} wreq;

static int port = -1, sig_r = -1, sig_w = -1, watch = -1;
static proc *procs[MAX_PROCS];
static wreq *writes[MAX_WRITES];
static value *cfg;        /* the host's config (kept: json_keep) */
static value *ll_cfg;     /* read/write/execute plus devices and listable, for walls.c */
static value bpf_main;    /* V_BYTES: the seccomp filter every command gets */
static int64_t refuse_nr[MAX_REFUSE], refuse_err[MAX_REFUSE];
static int nrefuse;
static char net_dir[4096];
static int quiesced;
static unsigned char *inbuf;
static size_t inlen, incap;

/* ---- small helpers ------------------------------------------------------- */

static void glog(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void glog(const char *fmt, ...) {
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(line, sizeof line, "glassroom-agent: ");
    n += vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof line - 2) n = (int)sizeof line - 2;
    line[n++] = '\n';
    if (write(2, line, (size_t)n) < 0) { /* nowhere else to say it */
    }
}

static long ms_since(const struct timespec *t) {
    struct timespec n;
    clock_gettime(CLOCK_MONOTONIC, &n);
    return (n.tv_sec - t->tv_sec) * 1000 + (n.tv_nsec - t->tv_nsec) / 1000000;
}

static int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t w = write(fd, text, strlen(text));
    int err = errno;
    close(fd);
    errno = err;
    return w == (ssize_t)strlen(text) ? 0 : -1;
}

static int exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

/* Mount options as agent.py's _mount takes them: flags by name, the rest data. */
static int do_mount(const char *src, const char *target, const char *fstype, const char *opts,
                    oserr *e) {
    static const struct { const char *name; unsigned long flag; } MS[] = {
        {"nosuid", MS_NOSUID}, {"nodev", MS_NODEV}, {"noexec", MS_NOEXEC},
        {"ro", MS_RDONLY},     {"noatime", MS_NOATIME}, {"bind", MS_BIND},
    };
    unsigned long flags = 0;
    char data[256] = "", copy[256];
    snprintf(copy, sizeof copy, "%s", opts);
    for (char *save, *o = strtok_r(copy, ",", &save); o; o = strtok_r(NULL, ",", &save)) {
        size_t k;
        for (k = 0; k < sizeof MS / sizeof MS[0]; k++)
            if (!strcmp(o, MS[k].name)) break;
        if (k < sizeof MS / sizeof MS[0]) {
            flags |= MS[k].flag;
        } else {
            if (data[0]) strncat(data, ",", sizeof data - strlen(data) - 1);
            strncat(data, o, sizeof data - strlen(data) - 1);
        }
    }
    oserr ignored; /* the image has the mount points; a tmpfs (/run) may not: made as agent.py does */
    if (!exists(target)) makedirs(target, &ignored);
    if (mount(src, target, fstype, flags, data[0] ? data : NULL) != 0) {
        int err = errno;
        oserr_msg(e, err, "mount %s on %s: %s", fstype, target, strerror(err));
        return -1;
    }
    return 0;
}

/* ---- frames to the host -------------------------------------------------- */

static void send_all(const char *p, size_t n) {
    while (n) {
        ssize_t w = write(port, p, n);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
        } else if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
            struct pollfd pfd = {port, POLLOUT, 0};
            poll(&pfd, 1, 1000);
        } else {
            return; /* the host is gone: what it misses, it cannot use */
        }
    }
}

/* b holds 8 placeholder bytes, then the JSON header. */
static void head_start(buf *b) { b_put(b, "\0\0\0\0\0\0\0\0", 8); }

static void send_head(buf *b, const void *payload, size_t n) {
    if (b->oom || !b->p || b->len - 8 > MAX_HEADER || n > MAX_PAYLOAD) {
        glog("frame too large or out of memory; dropped");
        b_free(b);
        return;
    }
    uint32_t h = (uint32_t)(b->len - 8), pl = (uint32_t)n;
    unsigned char *p = (unsigned char *)b->p;
    for (int i = 0; i < 4; i++) {
        p[i] = (unsigned char)(h >> (24 - 8 * i));
        p[4 + i] = (unsigned char)(pl >> (24 - 8 * i));
    }
    if (n) b_put(b, payload, n);
    if (!b->oom) send_all(b->p, b->len);
    b_free(b);
}

void guest_frame(const char *head, size_t hn, const char *more, size_t mn) {
    buf b = {0};
    head_start(&b);
    b_put(&b, head, hn);
    b_put(&b, more, mn);
    send_head(&b, NULL, 0);
}

static void send_simple(const char *json) {
    buf b = {0};
    head_start(&b);
    b_puts(&b, json);
    send_head(&b, NULL, 0);
}

static void send_fatal(const char *wall, const char *error) {
    buf b = {0};
    head_start(&b);
    b_puts(&b, "{\"op\":\"fatal\",\"wall\":");
    json_str(&b, wall, strlen(wall), 0);
    b_puts(&b, ",\"error\":");
    json_str(&b, error, strlen(error) > 200 ? 200 : strlen(error), 1);
    b_puts(&b, "}");
    send_head(&b, NULL, 0);
}

/* wall: the wall that stopped the request before it ran, or NULL. */
static void send_error_at(int64_t rid, long err, const char *text, const char *wall) {
    buf b = {0};
    head_start(&b);
    b_printf(&b, "{\"op\":\"error\",\"id\":%lld,\"errno\":%ld,\"error\":", (long long)rid, err);
    json_str(&b, text, strlen(text) > 200 ? 200 : strlen(text), 1);
    if (wall) {
        b_puts(&b, ",\"wall\":");
        json_str(&b, wall, strlen(wall), 0);
    }
    b_puts(&b, "}");
    send_head(&b, NULL, 0);
}

static void send_error(int64_t rid, long err, const char *text) { send_error_at(rid, err, text, NULL); }

/* A request that did not run: its tracer could not attach (no tracer, no run). */
static void send_untraced(int64_t rid, const char *why) { send_error_at(rid, EPERM, why, "audit.level"); }

static void send_done(int64_t rid, int code) {
    buf b = {0};
    head_start(&b);
    b_printf(&b, "{\"op\":\"done\",\"id\":%lld,\"code\":%d}", (long long)rid, code);
    send_head(&b, NULL, 0);
}

static void send_out(int64_t rid, const char *stream, const char *data, size_t n) {
    buf b = {0};
    head_start(&b);
    b_printf(&b, "{\"op\":\"%s\",\"id\":%lld", stream ? "out" : "data", (long long)rid);
    if (stream) b_printf(&b, ",\"stream\":\"%s\"", stream);
    b_puts(&b, "}");
    send_head(&b, data, n);
}

/* ---- the kernel's RNG and clock ------------------------------------------ */

/* Mix the host's fresh bytes into the pool and reseed the CRNG now: every
 * guest starts from one snapshot with one RNG state. */
static int reseed(const value *seed) {
    const char *hex = v_str(seed);
    size_t n = hex ? strlen(hex) : 0;
    if (n < 32 || n % 2 || n > 1024) return 0;
    unsigned char bytes[512];
    for (size_t i = 0; i < n / 2; i++) {
        unsigned int x;
        if (sscanf(hex + 2 * i, "%2x", &x) != 1) return 0;
        bytes[i] = (unsigned char)x;
    }
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        glog("reseed failed: %s", strerror(errno));
        return 0;
    }
    int ok = write(fd, bytes, n / 2) == (ssize_t)(n / 2) && ioctl(fd, RNDRESEEDCRNG) == 0;
    if (!ok) glog("reseed failed: %s", strerror(errno));
    close(fd);
    return ok;
}

static void set_clock(const value *t) {
    if (!t || (t->kind != V_OTHER && t->kind != V_INT)) return;
    double s = t->kind == V_INT ? (double)t->i : strtod(t->s, NULL);
    if (s <= 0) return;
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    clock_settime(CLOCK_REALTIME, &ts);
}

/* ---- boot ----------------------------------------------------------------- */

static int boot_mounts(oserr *e) {
    static const char *M[][4] = {
        {"proc", "/proc", "proc", "nosuid,nodev,noexec"},
        {"sys", "/sys", "sysfs", "nosuid,nodev,noexec"},
        {"cgroup2", "/sys/fs/cgroup", "cgroup2", "nosuid,nodev,noexec"},
        {"run", "/run", "tmpfs", "nosuid,nodev,mode=0755,size=1m"},
    };
    for (size_t i = 0; i < sizeof M / sizeof M[0]; i++)
        if (do_mount(M[i][0], M[i][1], M[i][2], M[i][3], e)) return -1;
    if (!exists("/dev/null") && do_mount("dev", "/dev", "devtmpfs", "nosuid,mode=0755", e))
        return -1;
    /* The kernel log and kernel addresses are not the task's to read; a value
     * that cannot be set stops the boot (the host then sees no agent). */
    if (write_file("/proc/sys/kernel/dmesg_restrict", "1") ||
        write_file("/proc/sys/kernel/kptr_restrict", "2")) {
        oserr_msg(e, errno, "sysctl: %s", strerror(errno));
        return -1;
    }
    write_file("/proc/sys/kernel/perf_event_paranoid", "3"); /* best effort */
    write_file("/proc/sys/kernel/unprivileged_bpf_disabled", "1");
    return 0;
}

static int find_port(char *out, size_t cap) {
    for (int round = 0; round < 500; round++) {
        DIR *d = opendir("/sys/class/virtio-ports");
        struct dirent *de;
        while (d && (de = readdir(d))) {
            if (de->d_name[0] == '.') continue;
            char p[512], name[64] = "";
            snprintf(p, sizeof p, "/sys/class/virtio-ports/%s/name", de->d_name);
            int fd = open(p, O_RDONLY | O_CLOEXEC);
            if (fd < 0) continue;
            ssize_t r = read(fd, name, sizeof name - 1);
            close(fd);
            if (r > 0 && name[r - 1] == '\n') r--;
            if (r == (ssize_t)strlen(PORT_NAME) && !memcmp(name, PORT_NAME, (size_t)r)) {
                snprintf(out, cap, "/dev/%s", de->d_name);
                closedir(d);
                return 0;
            }
        }
        if (d) closedir(d);
        usleep(10000);
    }
    errno = ENODEV;
    return -1;
}

/* Cover the kernel's devtmpfs with a minimal /dev for the task, once the port
 * is open: from then on the port, kmsg, mem and the disks have no name the
 * task could open.  The agent keeps the devtmpfs at AGENT_DEV (0700). */
static int task_dev(oserr *e) {
    static const struct { const char *name; unsigned maj, min; } NODES[] = {
        {"null", 1, 3}, {"zero", 1, 5}, {"full", 1, 7},
        {"random", 1, 8}, {"urandom", 1, 9}, {"tty", 5, 0},
    };
    static const char *LINKS[][2] = {
        {"fd", "/proc/self/fd"}, {"stdin", "/proc/self/fd/0"}, {"stdout", "/proc/self/fd/1"},
        {"stderr", "/proc/self/fd/2"}, {"ptmx", "pts/ptmx"},
    };
    mkdir(AGENT_DEV, 0700);
    chmod(AGENT_DEV, 0700);
    if (do_mount("dev", AGENT_DEV, "devtmpfs", "nosuid,noexec", e) ||
        do_mount("tmpfs", "/dev", "tmpfs", "nosuid,noexec,mode=0755,size=64k,nr_inodes=64", e))
        return -1;
    char p[64];
    for (size_t i = 0; i < sizeof NODES / sizeof NODES[0]; i++) {
        snprintf(p, sizeof p, "/dev/%s", NODES[i].name);
        if (mknod(p, S_IFCHR | 0666, makedev(NODES[i].maj, NODES[i].min)) || chmod(p, 0666)) {
            oserr_set(e, errno, p);
            return -1;
        }
    }
    for (size_t i = 0; i < sizeof LINKS / sizeof LINKS[0]; i++) {
        snprintf(p, sizeof p, "/dev/%s", LINKS[i][0]);
        if (symlink(LINKS[i][1], p)) {
            oserr_set(e, errno, p);
            return -1;
        }
    }
    if (mkdir("/dev/shm", 01777) || chmod("/dev/shm", 01777) || mkdir("/dev/pts", 0755)) {
        oserr_set(e, errno, "/dev/shm");
        return -1;
    }
    return do_mount("devpts", "/dev/pts", "devpts",
                    "nosuid,noexec,newinstance,ptmxmode=0666,mode=0620", e);
}

/* ---- configure: the walls of the whole guest ------------------------------ */

static int find_disk(char *out, size_t cap) {
    DIR *d = opendir("/sys/block");
    struct dirent *de;
    char best[256] = "";
    while (d && (de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        char p[512], serial[128] = "";
        snprintf(p, sizeof p, "/sys/block/%s/serial", de->d_name);
        int fd = open(p, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t r = read(fd, serial, sizeof serial - 1);
        close(fd);
        while (r > 0 && (serial[r - 1] == '\n' || serial[r - 1] == ' ')) r--;
        if (r == (ssize_t)strlen(SCRATCH_SERIAL) && !memcmp(serial, SCRATCH_SERIAL, (size_t)r) &&
            (!best[0] || strcmp(de->d_name, best) < 0))
            snprintf(best, sizeof best, "%s", de->d_name);
    }
    if (d) closedir(d);
    if (!best[0]) {
        errno = ENODEV;
        return -1;
    }
    snprintf(out, cap, AGENT_DEV "/%s", best);
    return 0;
}

/* /workspace and /tmp: dirs of the host's ext4 scratch disk, bound in place.
 * The template VM had a blank disk of the same size: its first blocks may
 * still be cached, so they are dropped (BLKFLSBUF) before the mount. */
static int scratch_mounts(oserr *e) {
    static const struct { const char *target; mode_t mode; } DIRS[] = {
        {"/workspace", 0755}, {"/tmp", 01777},
    };
    char dev[512];
    if (find_disk(dev, sizeof dev)) {
        oserr_msg(e, ENODEV, "[Errno %d] no scratch disk " SCRATCH_SERIAL, ENODEV);
        return -1;
    }
    int fd = open(dev, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || ioctl(fd, BLKFLSBUF) != 0) {
        oserr_set(e, errno, dev);
        if (fd >= 0) close(fd);
        return -1;
    }
    close(fd);
    mkdir(SCRATCH_MNT, 0700);
    /* noinit_itable: the disk is made with lazy_itable_init (_sys/scratch.py);
     * without it the kernel's ext4lazyinit thread zeroes the inode tables in
     * the background, on the task's one vCPU, and fills the sparse file. */
    if (do_mount(dev, SCRATCH_MNT, "ext4", "nosuid,nodev,noatime,noinit_itable", e)) return -1;
    for (size_t i = 0; i < sizeof DIRS / sizeof DIRS[0]; i++) {
        char src[256];
        snprintf(src, sizeof src, SCRATCH_MNT "%s", DIRS[i].target);
        if (mkdir(src, 0700) || chown(src, UID, GID) || chmod(src, DIRS[i].mode)) {
            oserr_set(e, errno, src);
            return -1;
        }
        if (do_mount(src, DIRS[i].target, "none", "bind", e)) return -1;
    }
    if (umount2(SCRATCH_MNT, MNT_DETACH) != 0) { /* only the binds remain */
        int err = errno;
        oserr_msg(e, err, "umount " SCRATCH_MNT ": %s", strerror(err));
        return -1;
    }
    return 0;
}

static int cgroup_setup(const value *c, oserr *e) {
    int64_t mem, pids;
    if (v_int(dict_get(c, "memory_bytes"), &mem) || v_int(dict_get(c, "pids"), &pids)) {
        oserr_msg(e, EINVAL, "memory_bytes and pids must be integers");
        return -1;
    }
    if (write_file("/sys/fs/cgroup/cgroup.subtree_control", "+memory +pids") ||
        (mkdir(CGROUP, 0755) && errno != EEXIST)) {
        oserr_set(e, errno, CGROUP);
        return -1;
    }
    char v[32];
    const struct { const char *name; int64_t value; } L[] = {
        {"memory.max", mem}, {"pids.max", pids}, {"memory.swap.max", 0},
    };
    for (size_t i = 0; i < sizeof L / sizeof L[0]; i++) {
        char p[128];
        snprintf(p, sizeof p, CGROUP "/%s", L[i].name);
        snprintf(v, sizeof v, "%lld", (long long)L[i].value);
        if (exists(p) && write_file(p, v)) {
            oserr_set(e, errno, p);
            return -1;
        }
    }
    return 0;
}

static int if_up(int s, const char *name) {
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", name);
    if (ioctl(s, SIOCGIFFLAGS, &ifr)) return -1;
    ifr.ifr_flags |= IFF_UP;
    return ioctl(s, SIOCSIFFLAGS, &ifr);
}

static int set_in_addr(int s, const char *ifname, unsigned long req, const char *addr) {
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", ifname);
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    sin->sin_family = AF_INET;
    if (!addr || inet_pton(AF_INET, addr, &sin->sin_addr) != 1) {
        errno = EINVAL;
        return -1;
    }
    return ioctl(s, req, &ifr);
}

/* The NIC (the only one besides lo) gets the host's address for it; the
 * egress dir becomes a tmpfs for the proxy's CA files; the bridge starts. */
static int net_up(const value *net, oserr *e) {
    char ifname[IFNAMSIZ] = "";
    DIR *d = opendir("/sys/class/net");
    struct dirent *de;
    while (d && (de = readdir(d)))
        if (de->d_name[0] != '.' && strcmp(de->d_name, "lo") && !ifname[0] &&
            strlen(de->d_name) < sizeof ifname)
            memcpy(ifname, de->d_name, strlen(de->d_name) + 1);
    if (d) closedir(d);
    if (!ifname[0]) {
        oserr_msg(e, ENODEV, "[Errno %d] no network device", ENODEV);
        return -1;
    }
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    int bad = s < 0 || set_in_addr(s, ifname, SIOCSIFADDR, v_str(dict_get(net, "addr"))) ||
              set_in_addr(s, ifname, SIOCSIFNETMASK, v_str(dict_get(net, "mask"))) ||
              if_up(s, ifname);
    int err = errno;
    if (s >= 0) close(s);
    if (bad) {
        oserr_msg(e, err, "network device %s: %s", ifname, strerror(err));
        return -1;
    }
    /* a link into /run in the image, to a dir that does not exist yet */
    const char *dir = v_str(dict_get(net, "dir"));
    ssize_t ln = dir ? readlink(dir, net_dir, sizeof net_dir - 1) : -1;
    if (ln > 0 && net_dir[0] == '/') net_dir[ln] = 0;
    else if (!dir || strlen(dir) >= sizeof net_dir || dir[0] != '/') {
        oserr_msg(e, EINVAL, "net.dir: not an absolute path");
        return -1;
    } else
        strcpy(net_dir, dir);
    if (do_mount("tmpfs", net_dir, "tmpfs", "nosuid,nodev,noexec,size=4m,mode=0755", e))
        return -1;
    int64_t lport, pport;
    const value *proxy = dict_get(net, "proxy");
    if (v_int(dict_get(net, "port"), &lport) || !proxy || proxy->kind != V_LIST ||
        proxy->len != 2 || !v_str(proxy->items[0]) || v_int(proxy->items[1], &pport) ||
        start_forwarder_tcp((int)lport, v_str(proxy->items[0]), (int)pport) < 0) {
        oserr_msg(e, EINVAL, "the proxy bridge could not start");
        return -1;
    }
    return 0;
}

static value *mkv(enum vkind k) {
    value *v = calloc(1, sizeof *v);
    if (!v) _exit(1);
    v->kind = k;
    return v;
}

static value *mkstr(const char *s) {
    value *v = mkv(V_STR);
    v->s = strdup(s);
    v->len = strlen(s);
    return v;
}

static value *mklist1(const char *s) {
    value *v = mkv(V_LIST);
    v->items = calloc(1, sizeof *v->items);
    v->items[0] = mkstr(s);
    v->len = 1;
    return v;
}

/* walls.c's Landlock config: the host's lists, /dev as devices, / listable. */
static value *landlock_cfg(const value *c) {
    static const char *keys[] = {"read", "write", "execute", "devices", "listable"};
    value *d = mkv(V_DICT);
    d->items = calloc(10, sizeof *d->items);
    d->len = 5;
    for (int i = 0; i < 5; i++) {
        d->items[2 * i] = mkstr(keys[i]);
        value *x = i < 3 ? dict_get(c, keys[i]) : mklist1(i == 3 ? "/dev" : "/");
        d->items[2 * i + 1] = x ? x : mkv(V_LIST);
    }
    return d;
}

static long landlock_abi(void) {
    long abi = syscall(SYS_landlock_create_ruleset, NULL, (size_t)0, 1u);
    return abi < 0 ? 0 : abi;
}

static void configure(value *m, const unsigned char *payload, size_t plen) {
    oserr e = {0};
    if (cfg) { /* configured once; a second config would stack walls oddly */
        send_fatal("init", "configured twice");
        return;
    }
    if (!reseed(dict_get(m, "seed"))) {
        send_fatal("rng", "cannot reseed the RNG from the host's entropy");
        return;
    }
    set_clock(dict_get(m, "time"));
    if (scratch_mounts(&e)) {
        char why[4200];
        snprintf(why, sizeof why, "scratch disk: %s", e.text);
        send_fatal("resources.disk_mib", why);
        return;
    }
    if (do_mount("tmpfs", "/dev/shm", "tmpfs", "nosuid,nodev,size=67108864,mode=1777", &e)) {
        send_fatal("init", e.text);
        return;
    }
    const value *sec = dict_get(m, "secrets");
    for (size_t i = 0; sec && sec->kind == V_LIST && i < sec->len; i++) {
        const char *t = v_str(sec->items[i]);
        if (!t || do_mount("tmpfs", t, "tmpfs", "nosuid,nodev,noexec,size=1m,mode=0700", &e) ||
            chown(t, UID, GID)) {
            send_fatal("init", t ? e.text : "secrets: not a list of paths");
            return;
        }
    }
    if (cgroup_setup(m, &e)) {
        send_fatal("cgroups", e.text);
        return;
    }
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0 || if_up(s, "lo")) {
        send_fatal("network", "cannot bring up lo");
        return;
    }
    close(s);
    const value *net = dict_get(m, "net");
    if (net && net->kind == V_DICT && net_up(net, &e)) { /* before the watch: not watched */
        send_fatal("network", e.text);
        return;
    }
    int64_t n = (int64_t)plen, t = 0;
    const value *nv = dict_get(m, "seccomp_len"), *tv = dict_get(m, "trace_len");
    if ((nv && v_int(nv, &n)) || (tv && v_int(tv, &t)) || n < 0 || t < 0 ||
        n + t > (int64_t)plen || n % 8 || t % 8) {
        send_fatal("seccomp", "seccomp_len/trace_len do not fit the payload");
        return;
    }
    const value *audit = dict_get(m, "audit");
    const char *level = audit && audit->kind == V_DICT ? v_str(dict_get(audit, "level")) : NULL;
    if (!level) level = "actions";
    if (strcmp(level, "actions")) {
        const value *names = dict_get(audit, "syscalls");
        if (!t || !names || names->kind != V_DICT || !names->len ||
            gtrace_config((const char *)payload + plen - t, (size_t)t, names)) {
            send_fatal("audit.level", "the guest cannot trace (no tracer or no filter)");
            return;
        }
    }
    const value *rf = dict_get(m, "refuse");
    for (size_t i = 0; rf && rf->kind == V_DICT && i < rf->len && nrefuse < MAX_REFUSE; i++) {
        const char *k = v_str(rf->items[2 * i]);
        int64_t err;
        if (!k || v_int(rf->items[2 * i + 1], &err)) continue;
        refuse_nr[nrefuse] = strtoll(k, NULL, 10);
        refuse_err[nrefuse++] = err;
    }
    size_t wlen = plen - (size_t)n - (size_t)t;
    if (wlen && watch < 0) {
        value w = {.kind = V_BYTES, .s = (char *)payload + n, .len = wlen};
        watch = seccomp_install(&w, SECCOMP_FILTER_FLAG_NEW_LISTENER, &e);
        if (watch < 0) {
            send_fatal("network", e.text);
            return;
        }
    }
    bpf_main.kind = V_BYTES;
    bpf_main.len = (size_t)n;
    bpf_main.s = malloc((size_t)n + 1);
    if (!bpf_main.s) _exit(1);
    memcpy(bpf_main.s, payload, (size_t)n);
    json_keep(); /* m lives on as the config */
    cfg = m;
    ll_cfg = landlock_cfg(m);
    struct utsname u;
    uname(&u);
    buf b = {0};
    head_start(&b);
    b_printf(&b, "{\"op\":\"configured\",\"landlock_abi\":%ld,\"kernel\":", landlock_abi());
    json_str(&b, u.release, strlen(u.release), 1);
    b_puts(&b, ",\"audit\":");
    json_str(&b, level, strlen(level), 1);
    b_puts(&b, "}");
    send_head(&b, NULL, 0);
}

/* ---- a child's walls -------------------------------------------------------- */

static void report(int st_w, int err, const char *text) {
    buf b = {0};
    b_printf(&b, "[%d,", err);
    json_str(&b, text, strlen(text), 1);
    b_puts(&b, "]");
    if (b.p) fd_write_all(st_w, b.p, b.len);
    b_free(&b);
}

/* In a freshly forked child: enter every in-guest wall; -1 with e set if one fails.
 * tty: a pty's slave, made the controlling terminal and 0/1/2. */
static int enter_walls(int tty, oserr *e) {
    static const int SIGS[] = {SIGCHLD, SIGPIPE, SIGINT, SIGTERM};
    for (size_t i = 0; i < sizeof SIGS / sizeof SIGS[0]; i++) signal(SIGS[i], SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    if (tty >= 0 ? login_tty(tty) : setsid() < 0) {
        oserr_set(e, errno, NULL);
        return -1;
    }
    char pid[32];
    snprintf(pid, sizeof pid, "%d", (int)getpid());
    if (write_file(CGROUP "/cgroup.procs", pid) || setgroups(0, NULL) || setgid(GID) ||
        setuid(UID)) {
        oserr_set(e, errno, NULL);
        return -1;
    }
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    if (landlock_restrict(ll_cfg, e) < 0) return -1;
    buf why = {0};
    if (apply_rlimits(dict_get(cfg, "rlimits"), &why)) {
        oserr_msg(e, -1, "%s", why.p ? why.p : "rlimits");
        b_free(&why);
        return -1;
    }
    if (bpf_main.len && seccomp_install(&bpf_main, 0, e) < 0) return -1;
    return gtrace_install(e);
}

/* ---- commands ---------------------------------------------------------------- */

static proc *find_proc(int64_t rid) {
    for (int i = 0; i < MAX_PROCS; i++)
        if (procs[i] && procs[i]->rid == rid) return procs[i];
    return NULL;
}

static int slot(void) {
    for (int i = 0; i < MAX_PROCS; i++)
        if (!procs[i]) return i;
    return -1;
}

/* In a child: close every fd from 3 up but a and b (-1: none). */
static void keep_only(int a, int b) {
    int lo = a < b ? a : b, hi = a < b ? b : a;
    if (lo < 0) lo = hi, hi = -1;
    int from = 3;
    if (lo >= 3) {
        close_range_from(from, lo);
        from = lo + 1;
    }
    if (hi >= 3) {
        close_range_from(from, hi);
        from = hi + 1;
    }
    close_range_from(from, 1 << 20);
}

static int dup_cloexec(int fd) { return fcntl(fd, F_DUPFD_CLOEXEC, 3); }

static const char *which(const char *name, const char *path) {
    static char cand[8192];
    if (strchr(name, '/')) return name;
    for (const char *d = path;;) {
        const char *end = strchr(d, ':');
        size_t dl = end ? (size_t)(end - d) : strlen(d);
        if (dl + 2 + strlen(name) < sizeof cand) {
            if (dl) memcpy(cand, d, dl);
            else cand[dl++] = '.';
            cand[dl] = '/';
            strcpy(cand + dl + 1, name);
            if (exists(cand)) return cand;
        }
        if (!end) return NULL;
        d = end + 1;
    }
}

static void exec_child(const value *m, int st_w, int tty) {
    oserr e = {0};
    if (enter_walls(tty, &e)) {
        report(st_w, e.err > 0 ? e.err : EIO, e.text);
        _exit(127);
    }
    const value *argv = dict_get(m, "argv"), *env = dict_get(m, "env");
    if (!argv || argv->kind != V_LIST || !argv->len || !env || env->kind != V_DICT) {
        report(st_w, EINVAL, "argv must be a non-empty list and env a dict");
        _exit(127);
    }
    char **av = calloc(argv->len + 1, sizeof *av), **ev = calloc(env->len + 1, sizeof *ev);
    const char *path = "/usr/bin:/bin";
    for (size_t i = 0; av && i < argv->len; i++) av[i] = (char *)(v_str(argv->items[i]) ?: "");
    for (size_t i = 0; ev && i < env->len; i++) {
        const char *k = v_str(env->items[2 * i]), *v = v_str(env->items[2 * i + 1]);
        if (!k || !v) continue;
        size_t n = strlen(k) + strlen(v) + 2;
        ev[i] = malloc(n);
        if (ev[i]) snprintf(ev[i], n, "%s=%s", k, v);
        if (!strcmp(k, "PATH")) path = v;
    }
    if (!av || !ev) {
        report(st_w, ENOMEM, "out of memory");
        _exit(127);
    }
    const char *cwd = v_str(dict_get(m, "cwd"));
    if (!cwd || chdir(cwd)) {
        if (chdir("/workspace")) { /* as agent.py: the workspace, else where it is */
        }
    }
    const char *exe = which(av[0], path);
    if (!exe) {
        report(st_w, ENOENT, "not found");
        _exit(127);
    }
    execve(exe, av, ev);
    report(st_w, errno, strerror(errno));
    _exit(127);
}

static void reap(void);
static void watch_one(void);

/* Before a read of a child's pipe that blocks the main loop (a file op, a
 * command's start): wait until the pipe has something, serving the watch
 * meanwhile (the child may make a watched call, a setuid mode: only this
 * agent can answer it).  A child that is stopped (SIGSTOP or SIGTSTP from the
 * task, whose uid it has; Landlock's signal scope, ABI 6, forbids that, older
 * kernels do not) is killed: 1, else 0. */
static int wait_child(int fd, pid_t pid, int64_t rid, gtrace **tr) {
    for (;;) {
        /* A traced child's reports are forwarded meanwhile: a full pipe would
         * stop its tracer, and so the child. */
        int tfd = tr && *tr ? gtrace_fd(*tr) : -1;
        struct pollfd pf[3] = {{fd, POLLIN, 0}, {watch, POLLIN, 0}, {tfd, POLLIN, 0}};
        int r = poll(pf, 3, CHILD_POLL_MS);
        if (r < 0 && errno != EINTR) return 0;
        if (r > 0 && tfd >= 0 && pf[2].revents && gtrace_read(rid, *tr)) *tr = NULL;
        if (r > 0 && pf[0].revents) return 0;
        if (r > 0 && watch >= 0 && pf[1].revents) watch_one();
        siginfo_t si;
        memset(&si, 0, sizeof si);
        if (waitid(P_PID, (id_t)pid, &si, WSTOPPED | WNOHANG | WNOWAIT) == 0 && si.si_pid == pid) {
            glog("child %d was stopped (by the task) during a request; killed", (int)pid);
            kill(pid, SIGKILL);
            return 1;
        }
    }
}

static void exec_op(value *m, int64_t rid) {
    if (!cfg) {
        send_error(rid, EAGAIN, "not configured");
        return;
    }
    int k = slot();
    if (k < 0) {
        send_error(rid, EAGAIN, "too many commands at once");
        return;
    }
    int in_r, in_w, out_r, out_w, err_r, err_w, st[2], master = -1, slave = -1;
    const value *pty = dict_get(m, "pty");
    if (pty && pty->kind == V_LIST) {
        if (pty->len != 2 || openpty(&master, &slave, NULL, NULL, NULL)) {
            int err = pty->len != 2 ? EINVAL : errno;
            char why[256];
            snprintf(why, sizeof why, "pty: %s", strerror(err));
            send_error(rid, err, why);
            return;
        }
        fcntl(master, F_SETFD, FD_CLOEXEC);
        fcntl(slave, F_SETFD, FD_CLOEXEC);
        if (fchown(slave, UID, GID) || set_winsize(master, pty->items[0], pty->items[1])) {
            int err = errno;
            char why[256];
            snprintf(why, sizeof why, "pty: %s", strerror(err));
            close(master);
            close(slave);
            send_error(rid, err, why);
            return;
        }
        /* the command reads and writes the slave; the agent keeps the master */
        in_r = slave, in_w = dup_cloexec(master), out_r = master, out_w = dup_cloexec(slave);
        err_r = dup_cloexec(master), err_w = dup_cloexec(slave);
    } else {
        int a[2] = {-1, -1}, b[2] = {-1, -1}, c[2] = {-1, -1};
        if (pipe2(a, O_CLOEXEC) || pipe2(b, O_CLOEXEC) || pipe2(c, O_CLOEXEC)) {
            int err = errno;
            for (int i = 0; i < 2; i++) { /* none of them leaks */
                if (a[i] >= 0) close(a[i]);
                if (b[i] >= 0) close(b[i]);
                if (c[i] >= 0) close(c[i]);
            }
            send_error(rid, err, strerror(err));
            return;
        }
        in_r = a[0], in_w = a[1], out_r = b[0], out_w = b[1], err_r = c[0], err_w = c[1];
    }
    if (pipe2(st, O_CLOEXEC)) {
        int err = errno;
        int fds[6] = {in_r, in_w, out_r, out_w, err_r, err_w};
        for (int i = 0; i < 6; i++)
            if (fds[i] >= 0) close(fds[i]);
        send_error(rid, err, strerror(err));
        return;
    }
    int gate[2];
    if (gate_open(gate)) {
        int err = errno;
        int fds[8] = {in_r, in_w, out_r, out_w, err_r, err_w, st[0], st[1]};
        for (int i = 0; i < 8; i++)
            if (fds[i] >= 0) close(fds[i]);
        send_error(rid, err, strerror(err));
        return;
    }
    pid_t pid = fork();
    if (pid == 0) {
        gate_wait(gate); /* the file audit: until the tracer holds it */
        if (slave < 0 && (dup2(in_r, 0) < 0 || dup2(out_w, 1) < 0 || dup2(err_w, 2) < 0))
            _exit(127);
        /* nothing of the agent's: only 0/1/2, the status pipe and the pty's slave */
        keep_only(st[1], slave);
        exec_child(m, st[1], slave);
    }
    int err = errno;
    close(in_r);
    close(out_w);
    close(err_w);
    close(st[1]);
    if (pid < 0) {
        close(in_w);
        close(out_r);
        close(err_r);
        close(st[0]);
        if (gate[0] >= 0) close(gate[0]), close(gate[1]);
        send_error(rid, err, strerror(err));
        return;
    }
    gtrace *tr = NULL;
    char why[512];
    if (gtrace_start(pid, gate, &tr, why, sizeof why)) {
        close(in_w);
        close(out_r);
        close(err_r);
        close(st[0]);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) { /* it died at the closed gate */
        }
        send_untraced(rid, why);
        return;
    }
    char rep[4400];
    size_t rn = 0;
    int stopped = 0;
    for (;;) {
        stopped |= wait_child(st[0], pid, rid, &tr);
        ssize_t r = read(st[0], rep + rn, sizeof rep - 1 - rn);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        rn += (size_t)r;
        if (rn >= sizeof rep - 1) break;
    }
    close(st[0]);
    if (stopped && !rn) { /* it never started: killed where it was stopped */
        rn = (size_t)snprintf(rep, sizeof rep, "[%d,\"stopped before it started\"]", EINTR);
    }
    if (rn) {
        close(in_w);
        close(out_r);
        close(err_r);
        if (tr) gtrace_drain(rid, tr); /* its reports (the failed execve) come first */
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
        rep[rn] = 0;
        value *r = json_load(rep, rn);
        int64_t code = EIO;
        const char *text = "the command could not start";
        if (r && r->kind == V_LIST && r->len == 2 && !v_int(r->items[0], &code) &&
            v_str(r->items[1]))
            text = v_str(r->items[1]);
        send_error(rid, (long)code, text);
        return;
    }
    proc *p = calloc(1, sizeof *p);
    if (!p) _exit(1);
    p->rid = rid;
    p->pid = pid;
    p->tr = tr;
    p->stdin_w = in_w;
    fcntl(in_w, F_SETFL, fcntl(in_w, F_GETFL) | O_NONBLOCK);
    fcntl(out_r, F_SETFL, fcntl(out_r, F_GETFL) | O_NONBLOCK);
    fcntl(err_r, F_SETFL, fcntl(err_r, F_GETFL) | O_NONBLOCK);
    if (slave >= 0) { /* one output stream; err_r is a spare master, kept to resize */
        p->fd[0] = out_r, p->name[0] = "pty", p->fd[1] = -1, p->tty = err_r;
    } else {
        p->fd[0] = out_r, p->name[0] = "stdout", p->fd[1] = err_r, p->name[1] = "stderr";
        p->tty = -1;
    }
    procs[k] = p;
    buf b = {0};
    head_start(&b);
    b_printf(&b, "{\"op\":\"started\",\"id\":%lld,\"pid\":%d}", (long long)rid, (int)pid);
    send_head(&b, NULL, 0);
    reap();
}

static void close_stdin(proc *p) {
    if (p->stdin_w >= 0) close(p->stdin_w);
    p->stdin_w = -1;
    free(p->pending);
    p->pending = NULL;
    p->poff = p->plen = p->pcap = 0;
}

/* Type a command's pending input as far as its pty or pipe takes it now
 * (stdin_w is non-blocking); then close it if the host said eof. */
static void feed(proc *p) {
    while (p->stdin_w >= 0 && p->plen > p->poff) {
        size_t left = p->plen - p->poff;
        ssize_t w = write(p->stdin_w, p->pending + p->poff, left > CHUNK ? CHUNK : left);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            if (p->tty < 0) { /* EPIPE: no one reads it any more */
                close_stdin(p);
                return;
            }
            break; /* a pty: dropped, as agent.py does */
        }
        p->poff += (size_t)w;
    }
    p->poff = p->plen = 0;
    if (p->stdin_eof && p->stdin_w >= 0) close_stdin(p);
}

/* Append to a command's pending input; -1 if it would pass max. */
static int queue_input(proc *p, const unsigned char *d, size_t n, size_t max) {
    if (p->poff && p->poff >= p->plen - p->poff) { /* amortized: at most half moves */
        memmove(p->pending, p->pending + p->poff, p->plen - p->poff);
        p->plen -= p->poff;
        p->poff = 0;
    }
    if (p->plen - p->poff + n > max) return -1;
    if (p->plen + n > p->pcap) {
        size_t cap = (p->plen + n) + (p->plen + n) / 2 + CHUNK;
        char *more = realloc(p->pending, cap);
        if (!more) return -1;
        p->pending = more;
        p->pcap = cap;
    }
    if (n) memcpy(p->pending + p->plen, d, n);
    p->plen += n;
    return 0;
}

static void reap(void) {
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid <= 0) return;
        if (gtrace_reaped(pid, status)) continue;
        for (int i = 0; i < MAX_PROCS; i++) {
            proc *p = procs[i];
            if (p && p->pid == pid && !p->exited) {
                p->exited = 1;
                p->status = status;
                clock_gettime(CLOCK_MONOTONIC, &p->exited_at);
                kill(-pid, SIGKILL); /* nothing of the command may outlive it */
            }
        }
    }
}

static void pump(proc *p, int k) {
    static char chunk[CHUNK];
    ssize_t r = read(p->fd[k], chunk, sizeof chunk);
    if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (r > 0) {
        send_out(p->rid, p->name[k], chunk, (size_t)r);
        return;
    }
    close(p->fd[k]);
    p->fd[k] = -1;
}

static int64_t read_key(const char *path, const char *key) {
    char text[4096];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0) return 0;
    text[n] = 0;
    size_t kl = strlen(key);
    for (char *line = text; line && *line;) {
        if (!strncmp(line, key, kl) && line[kl] == ' ') return strtoll(line + kl + 1, NULL, 10);
        line = strchr(line, '\n');
        if (line) line++;
    }
    return 0;
}

static void finish(int i) {
    proc *p = procs[i];
    static char chunk[CHUNK];
    for (int k = 0; k < 2; k++) {
        size_t drained = 0;
        while (p->fd[k] >= 0 && drained < DRAIN_MAX) { /* drain what is left, bounded */
            ssize_t r = read(p->fd[k], chunk, sizeof chunk);
            if (r <= 0) break;
            drained += (size_t)r;
            send_out(p->rid, p->name[k], chunk, (size_t)r);
        }
        if (p->fd[k] >= 0) close(p->fd[k]);
    }
    close_stdin(p);
    if (p->tty >= 0) close(p->tty);
    buf b = {0};
    head_start(&b);
    b_printf(&b, "{\"op\":\"exit\",\"id\":%lld,\"code\":", (long long)p->rid);
    if (WIFEXITED(p->status)) b_printf(&b, "%d", WEXITSTATUS(p->status));
    else b_puts(&b, "null");
    b_puts(&b, ",\"signal\":");
    if (WIFSIGNALED(p->status)) b_printf(&b, "%d", WTERMSIG(p->status));
    else b_puts(&b, "null");
    b_printf(&b, ",\"oom_kill\":%lld,\"pids_max_hits\":%lld",
             (long long)read_key(CGROUP "/memory.events", "oom_kill"),
             (long long)read_key(CGROUP "/pids.events", "max"));
    struct statvfs st;
    if (statvfs("/workspace", &st) == 0) {
        unsigned long long total = (unsigned long long)st.f_blocks * st.f_frsize;
        b_printf(&b, ",\"workspace\":[%llu,%llu]",
                 total - (unsigned long long)st.f_bavail * st.f_frsize, total);
    }
    b_puts(&b, "}");
    free(p);
    procs[i] = NULL;
    send_head(&b, NULL, 0);
}

/* ---- files -------------------------------------------------------------------- */

static int file_child(const char *kind, const char *path, int64_t max, int64_t mode,
                      const char *data, size_t dlen, int w) {
    oserr e = {0};
    if (enter_walls(-1, &e)) return e.err > 0 ? e.err : EIO;
    static char chunk[CHUNK];
    if (!strcmp(kind, "read")) {
        int fd = open_regular(path, O_RDONLY, 0, &e);
        if (fd < 0) return e.err > 0 ? e.err : EIO;
        int64_t left = max > 0 ? max : INT64_MAX;
        while (left > 0) {
            ssize_t r = read(fd, chunk, left < CHUNK ? (size_t)left : CHUNK);
            if (r < 0) return errno;
            if (r == 0) break;
            if (fd_write_all(w, chunk, (size_t)r)) return errno;
            left -= r;
        }
        return 0;
    }
    if (!strcmp(kind, "write")) {
        int fd = open_regular(path, O_WRONLY | O_CREAT | O_TRUNC, (mode_t)mode, &e);
        if (fd < 0) return e.err > 0 ? e.err : EIO;
        if (fd_write_all(fd, data, dlen) || fchmod(fd, (mode_t)mode) || close(fd)) return errno;
        return 0;
    }
    if (!strcmp(kind, "list")) {
        buf out = {0};
        if (list_dir(path, &out, &e)) return e.err > 0 ? e.err : EIO;
        return fd_write_all(w, out.p ? out.p : "[]", out.p ? out.len : 2) ? errno : 0;
    }
    if (!strcmp(kind, "remove")) return remove_tree(path, &e) ? (e.err > 0 ? e.err : EIO) : 0;
    if (!strcmp(kind, "mkdir")) return makedirs(path, &e) ? (e.err > 0 ? e.err : EIO) : 0;
    return EINVAL;
}

static void file_op(int64_t rid, const char *kind, const char *path, int64_t max, int64_t mode,
                    const char *data, size_t dlen) {
    if (!cfg) {
        send_done(rid, EAGAIN);
        return;
    }
    int pfd[2], gate[2];
    if (pipe2(pfd, O_CLOEXEC)) {
        send_done(rid, errno);
        return;
    }
    if (gate_open(gate)) {
        close(pfd[0]);
        close(pfd[1]);
        send_done(rid, errno);
        return;
    }
    pid_t pid = fork();
    if (pid == 0) {
        gate_wait(gate); /* the file audit: until the tracer holds it */
        keep_only(pfd[1], -1);
        _exit(file_child(kind, path, max, mode, data, dlen, pfd[1]) & 0xFF);
    }
    close(pfd[1]);
    if (pid < 0) {
        int err = errno;
        close(pfd[0]);
        if (gate[0] >= 0) close(gate[0]), close(gate[1]);
        send_done(rid, err);
        return;
    }
    gtrace *tr = NULL;
    char why[512];
    if (gtrace_start(pid, gate, &tr, why, sizeof why)) {
        close(pfd[0]);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) { /* it died at the closed gate */
        }
        send_untraced(rid, why);
        return;
    }
    static char chunk[CHUNK];
    for (;;) {
        wait_child(pfd[0], pid, rid, &tr);
        ssize_t r = read(pfd[0], chunk, sizeof chunk);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        send_out(rid, NULL, chunk, (size_t)r);
    }
    close(pfd[0]);
    if (tr) gtrace_drain(rid, tr);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    send_done(rid, WIFEXITED(status) ? WEXITSTATUS(status) : EIO);
}

static wreq **find_write(int64_t rid) {
    for (int i = 0; i < MAX_WRITES; i++)
        if (writes[i] && writes[i]->rid == rid) return &writes[i];
    return NULL;
}

static void drop_write(wreq **w) {
    free((*w)->path);
    free((*w)->data);
    free(*w);
    *w = NULL;
}

static void netfile(const value *m, const unsigned char *payload, size_t n) {
    const char *name = v_str(dict_get(m, "name"));
    if (!name || !net_dir[0]) return;
    const char *base = strrchr(name, '/');
    base = base ? base + 1 : name;
    size_t bl = strlen(base);
    if (bl < 4 || strcmp(base + bl - 4, ".pem")) return;
    char p[4200];
    snprintf(p, sizeof p, "%s/%s", net_dir, base);
    const value *start = dict_get(m, "start");
    int trunc = start && start->kind == V_BOOL && start->i;
    int fd = open(p, O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW | (trunc ? O_TRUNC : O_APPEND),
                  0644);
    if (fd < 0) return;
    fd_write_all(fd, (const char *)payload, n);
    fchmod(fd, 0644);
    close(fd);
}

/* ---- direct network attempts (seccomp user notification) ------------------------- */

static int read_mem(pid_t pid, uint64_t addr, void *out, size_t n) {
    char p[64];
    snprintf(p, sizeof p, "/proc/%d/mem", (int)pid);
    int fd = open(p, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t r = pread(fd, out, n, (off_t)addr);
    close(fd);
    return (int)r;
}

/* The socket's protocol, from its sockfs xattr through /proc/PID/fd/N: never
 * a copy of the task's fd (pidfd_getfd) here.  The task may close its own
 * while the agent holds the copy; the agent's close is then the last one,
 * and a TCP socket with SO_LINGER and unsent data blocks that close for as
 * long as the task set (the whole agent with it). */
static const char *sock_proto(pid_t pid, int fd, char *other) {
    static const char *const MAP[][2] = {
        {"TCP", "tcp"}, {"TCPv6", "tcp"}, {"MPTCP", "tcp"}, {"MPTCPv6", "tcp"},
        {"UDP", "udp"}, {"UDPv6", "udp"}, {"UDP-Lite", "udp"}, {"UDPLITEv6", "udp"},
        {"PING", "udp"}, {"PINGv6", "udp"}, {"RAW", "raw"}, {"RAWv6", "raw"},
    };
    char p[64], name[32];
    (void)other;
    snprintf(p, sizeof p, "/proc/%d/fd/%d", (int)pid, fd);
    ssize_t n = getxattr(p, "system.sockprotoname", name, sizeof name - 1);
    if (n <= 0) return "unknown";
    name[n] = 0;
    for (size_t i = 0; i < sizeof MAP / sizeof MAP[0]; i++)
        if (!strcmp(name, MAP[i][0])) return MAP[i][1];
    return "unknown";
}

/* Describe a watched call FOR LOGGING ONLY (the host treats it as a claim). */
static int describe(pid_t pid, int nr, const uint64_t *args, buf *b) {
    if (nr == 41) { /* socket: only raw and packet ones are watched */
        const char *kind = args[0] == 17 ? "packet" : "raw";
        b_printf(b, ",\"syscall\":\"socket\",\"what\":\"%s socket\",\"family\":\"%llu\","
                    "\"pid\":%d,\"destination\":\"%s socket\"",
                 kind, (unsigned long long)args[0], (int)pid, kind);
        return 1;
    }
    unsigned char raw[128];
    int n;
    if (nr == 42) n = read_mem(pid, args[1], raw, (args[2] & 0xFFFFFFFF) < 128 ? args[2] & 0xFFFFFFFF : 128);
    else if (nr == 44) n = read_mem(pid, args[4], raw, (args[5] & 0xFFFFFFFF) < 128 ? args[5] & 0xFFFFFFFF : 128);
    else {
        struct __attribute__((packed)) { uint64_t ptr; uint32_t len; } hdr;
        if (read_mem(pid, args[1], &hdr, sizeof hdr) != (int)sizeof hdr || !hdr.ptr) return 0;
        n = read_mem(pid, hdr.ptr, raw, hdr.len < 128 ? hdr.len : 128);
    }
    if (n < 2) return 0;
    int family = raw[0] | raw[1] << 8, port;
    char addr[INET6_ADDRSTRLEN];
    const char *fam;
    if (family == AF_INET && n >= 8) {
        if (raw[4] == 127) return 0;
        inet_ntop(AF_INET, raw + 4, addr, sizeof addr);
        fam = "inet";
    } else if (family == AF_INET6 && n >= 24) {
        static const unsigned char lo6[16] = {[15] = 1};
        static const unsigned char mapped[12] = {[10] = 0xFF, [11] = 0xFF};
        if (!memcmp(raw + 8, lo6, 16) || (!memcmp(raw + 8, mapped, 12) && raw[20] == 127))
            return 0;
        inet_ntop(AF_INET6, raw + 8, addr, sizeof addr);
        fam = "inet6";
    } else {
        return 0;
    }
    port = raw[2] << 8 | raw[3];
    char other[16];
    const char *nm = nr == 42 ? "connect" : nr == 44 ? "sendto" : nr == 46 ? "sendmsg" : nr == 307 ? "sendmmsg" : NULL;
    char nrs[16];
    if (!nm) {
        snprintf(nrs, sizeof nrs, "%d", nr);
        nm = nrs;
    }
    b_printf(b, ",\"syscall\":\"%s\",\"family\":\"%s\",\"address\":\"%s\",\"port\":%d,"
                "\"protocol\":\"%s\",\"pid\":%d,\"destination\":\"%s%s%s:%d\"",
             nm, fam, addr, port, sock_proto(pid, (int)(args[0] & 0xFFFFFFFF), other), (int)pid,
             fam[4] ? "[" : "", addr, fam[4] ? "]" : "", port);
    return 1;
}

static void watch_one(void) {
    struct seccomp_notif req;
    memset(&req, 0, sizeof req);
    if (ioctl(watch, SECCOMP_IOCTL_NOTIF_RECV, &req)) return;
    struct seccomp_notif_resp resp = {.id = req.id};
    for (int i = 0; i < nrefuse; i++)
        if (refuse_nr[i] == req.data.nr) { /* a setuid/setgid mode: refused, never continued */
            resp.error = (int32_t)refuse_err[i];
            ioctl(watch, SECCOMP_IOCTL_NOTIF_SEND, &resp);
            buf b = {0};
            head_start(&b);
            b_printf(&b, "{\"op\":\"refused\",\"nr\":%d,\"pid\":%u}", req.data.nr, req.pid);
            send_head(&b, NULL, 0);
            return;
        }
    buf b = {0};
    head_start(&b);
    b_puts(&b, "{\"op\":\"netdirect\"");
    int said = describe((pid_t)req.pid, req.data.nr, (const uint64_t *)req.data.args, &b);
    resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE; /* logging only: never block the call */
    ioctl(watch, SECCOMP_IOCTL_NOTIF_SEND, &resp);
    if (!said) {
        b_free(&b);
        return;
    }
    b_puts(&b, "}");
    send_head(&b, NULL, 0);
}

/* ---- requests -------------------------------------------------------------------- */

static void resume(const value *m) {
    int reseeded = reseed(dict_get(m, "seed"));
    set_clock(dict_get(m, "time"));
    buf b = {0};
    head_start(&b);
    b_printf(&b, "{\"op\":\"resumed\",\"version\":%d,\"reseeded\":%d}", VERSION, reseeded);
    send_head(&b, NULL, 0);
}

static void handle(value *m, const unsigned char *payload, size_t plen) {
    const char *op = v_str(dict_get(m, "op"));
    int64_t rid = 0;
    int has_id = !v_int(dict_get(m, "id"), &rid);
    if (!op) return;
    if (quiesced) { /* until resume: frames before it are not the new host's */
        if (!strcmp(op, "resume")) {
            quiesced = 0;
            resume(m);
        } else {
            glog("dropped %.20s while quiesced", op);
        }
        return;
    }
    if (!strcmp(op, "quiesce")) {
        /* The host stops and saves the VM while this agent sends nothing: the
         * saved channel sits between two frames both ways.  Output and exits
         * wait in their pipes; a VM restored from it wakes up right here. */
        quiesced = 1;
        send_simple("{\"op\":\"quiesced\"}");
        return;
    }
    if (!strcmp(op, "hello")) {
        buf b = {0};
        head_start(&b);
        b_printf(&b, "{\"op\":\"ready\",\"version\":%d}", VERSION);
        send_head(&b, NULL, 0);
        return;
    }
    if (!strcmp(op, "config")) {
        configure(m, payload, plen);
        return;
    }
    if (!has_id && strcmp(op, "netfile")) {
        send_error(0, EIO, "a request without an id");
        return;
    }
    if (!strcmp(op, "exec")) {
        exec_op(m, rid);
    } else if (!strcmp(op, "stdin")) {
        proc *p = find_proc(rid);
        if (!p || p->stdin_w < 0) return;
        if (p->tty >= 0) { /* a pty: a chunk past the bound is dropped (agent.py) */
            if (plen) queue_input(p, payload, plen, PTY_PENDING_MAX);
            feed(p);
            return;
        }
        if (plen && queue_input(p, payload, plen, STDIN_PENDING_MAX)) {
            glog("stdin of request %lld: more than %d MiB not taken; closed", (long long)rid,
                 STDIN_PENDING_MAX >> 20);
            close_stdin(p);
            return;
        }
        const value *eof = dict_get(m, "eof");
        if (eof && eof->kind == V_BOOL && eof->i) p->stdin_eof = 1;
        feed(p);
    } else if (!strcmp(op, "resize")) {
        proc *p = find_proc(rid);
        if (p && p->tty >= 0) set_winsize(p->tty, dict_get(m, "rows"), dict_get(m, "cols"));
    } else if (!strcmp(op, "signal")) {
        proc *p = find_proc(rid);
        int64_t sig;
        if (p && !p->exited && !v_int(dict_get(m, "sig"), &sig) && sig > 0 && sig < 65)
            kill(-p->pid, (int)sig);
    } else if (!strcmp(op, "file")) {
        const char *kind = v_str(dict_get(m, "kind")), *path = v_str(dict_get(m, "path"));
        int64_t max = 0, mode = 0644;
        v_int(dict_get(m, "max"), &max);
        v_int(dict_get(m, "mode"), &mode);
        if (!kind || !path || strlen(path) != dict_get(m, "path")->len) {
            send_done(rid, EINVAL);
            return;
        }
        if (strcmp(kind, "write")) {
            file_op(rid, kind, path, max, mode, NULL, 0);
            return;
        }
        int i;
        for (i = 0; i < MAX_WRITES && writes[i]; i++) {
        }
        if (i == MAX_WRITES || find_write(rid)) {
            send_done(rid, EAGAIN);
            return;
        }
        writes[i] = calloc(1, sizeof *writes[i]);
        if (!writes[i] || !(writes[i]->path = strdup(path))) _exit(1);
        writes[i]->rid = rid;
        writes[i]->mode = mode;
    } else if (!strcmp(op, "netfile")) {
        netfile(m, payload, plen);
    } else if (!strcmp(op, "data")) {
        wreq **w = find_write(rid);
        if (!w) return;
        int64_t limit = 1LL << 30;
        v_int(dict_get(cfg, "disk_bytes"), &limit);
        if ((*w)->len + plen > (size_t)limit) {
            drop_write(w);
            send_done(rid, EFBIG);
            return;
        }
        if ((*w)->len + plen > (*w)->cap) {
            size_t cap = ((*w)->len + plen) + ((*w)->len + plen) / 2 + CHUNK;
            char *more = realloc((*w)->data, cap);
            if (!more) {
                drop_write(w);
                send_done(rid, ENOMEM);
                return;
            }
            (*w)->data = more;
            (*w)->cap = cap;
        }
        memcpy((*w)->data + (*w)->len, payload, plen);
        (*w)->len += plen;
    } else if (!strcmp(op, "eof")) {
        wreq **w = find_write(rid);
        if (!w) return;
        file_op(rid, "write", (*w)->path, 0, (*w)->mode, (*w)->data ? (*w)->data : "", (*w)->len);
        drop_write(w);
    }
}

static uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Frames from the host: whole ones are handled in order; a frame whose
 * lengths exceed the bounds or whose header is not a JSON object resets the
 * stream (it cannot be resynchronized), as agent.py's Decoder does. */
static void read_port(void) {
    if (incap - inlen < (1 << 16)) {
        size_t cap = incap ? incap * 2 : (1 << 17);
        unsigned char *more = realloc(inbuf, cap);
        if (!more) return;
        inbuf = more;
        incap = cap;
    }
    ssize_t r = read(port, inbuf + inlen, 1 << 16);
    if (r < 0) return;
    if (r == 0) { /* the host side is not connected (yet, or any more) */
        usleep(10000);
        return;
    }
    inlen += (size_t)r;
    size_t off = 0;
    while (inlen - off >= 8) {
        uint32_t h = be32(inbuf + off), n = be32(inbuf + off + 4);
        if (h > MAX_HEADER || n > MAX_PAYLOAD) {
            glog("bad frame from host: frame lengths %u+%u exceed the bounds", h, n);
            inlen = off = 0;
            break;
        }
        if (inlen - off < 8 + (size_t)h + n) break;
        const unsigned char *hp = inbuf + off + 8;
        value *m = json_load((const char *)hp, h);
        off += 8 + (size_t)h + n;
        if (!m || m->kind != V_DICT) {
            glog("bad frame from host: malformed header");
            json_free_all();
            inlen = off = 0;
            break;
        }
        handle(m, hp + h, n);
        json_free_all();
    }
    if (off) {
        memmove(inbuf, inbuf + off, inlen - off);
        inlen -= off;
    }
    if (incap > (1 << 20) && inlen < (1 << 16)) { /* give a large frame's room back */
        unsigned char *less = realloc(inbuf, 1 << 17);
        if (less) {
            inbuf = less;
            incap = 1 << 17;
        }
    }
}

static void on_sigchld(int sig) {
    (void)sig;
    int e = errno;
    if (write(sig_w, "c", 1) < 0) { /* full: a wake-up is pending anyway */
    }
    errno = e;
}

static void loop(void) {
    static struct pollfd pfd[3 + 4 * MAX_PROCS];
    static proc *who[3 + 4 * MAX_PROCS];
    static int what[3 + 4 * MAX_PROCS];
    for (;;) {
        nfds_t n = 0;
        int pending = 0;
        pfd[n++] = (struct pollfd){port, POLLIN, 0};
        pfd[n++] = (struct pollfd){sig_r, POLLIN, 0};
        if (watch >= 0) pfd[n++] = (struct pollfd){watch, POLLIN, 0};
        size_t fixed = n;
        for (int i = 0; i < MAX_PROCS && !quiesced; i++) {
            proc *p = procs[i];
            if (!p) continue;
            if (p->exited) pending = 1;
            for (int k = 0; k < 2; k++)
                if (p->fd[k] >= 0) {
                    who[n] = p, what[n] = k;
                    pfd[n++] = (struct pollfd){p->fd[k], POLLIN, 0};
                }
            if (p->plen > p->poff && p->stdin_w >= 0) {
                who[n] = p, what[n] = 2;
                pfd[n++] = (struct pollfd){p->stdin_w, POLLOUT, 0};
            }
            if (p->tr) {
                who[n] = p, what[n] = 3;
                pfd[n++] = (struct pollfd){gtrace_fd(p->tr), POLLIN, 0};
            }
        }
        if (quiesced) n = 1; /* only the host's resume until then */
        int r = poll(pfd, n, quiesced ? 1000 : pending ? EXIT_GRACE_MS / 2 : -1);
        if (r < 0 && errno != EINTR) _exit(1);
        if (r > 0) {
            if (pfd[1].revents && !quiesced) {
                char drain[512];
                while (read(sig_r, drain, sizeof drain) > 0) {
                }
                reap();
            }
            if (watch >= 0 && fixed > 2 && pfd[2].revents && !quiesced) watch_one();
            for (nfds_t i = fixed; i < n; i++) {
                if (!pfd[i].revents) continue;
                proc *p = who[i];
                int live = 0;
                for (int j = 0; j < MAX_PROCS; j++) live |= procs[j] == p;
                if (!live) continue;
                if (what[i] == 2) feed(p);
                else if (what[i] == 3) {
                    if (p->tr && gtrace_fd(p->tr) == pfd[i].fd && gtrace_read(p->rid, p->tr))
                        p->tr = NULL;
                } else if (p->fd[what[i]] == pfd[i].fd) pump(p, what[i]);
            }
            if (pfd[0].revents) read_port();
        }
        if (quiesced) continue;
        for (int i = 0; i < MAX_PROCS; i++) {
            proc *p = procs[i];
            if (!p || !p->exited) continue;
            if (p->tr) { /* its calls are all reported before its exit is */
                if (!gtrace_nudge(p->tr, ms_since(&p->exited_at))) continue;
                gtrace_end(p->rid, p->tr);
                p->tr = NULL;
            }
            if ((p->fd[0] < 0 && p->fd[1] < 0) || ms_since(&p->exited_at) > EXIT_GRACE_MS)
                finish(i);
        }
    }
}

/* Read at boot, before the booted-idle snapshot is taken, so that a restored
 * guest's first command finds the loader and libc in its page cache (under
 * TCG, reading them from the image is most of a first command's ~0.3 s). */
static void warm(void) {
    static const char *FILES[] = {"/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libc.so.6"};
    static char chunk[1 << 16];
    for (size_t i = 0; i < sizeof FILES / sizeof FILES[0]; i++) {
        int fd = open(FILES[i], O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        while (read(fd, chunk, sizeof chunk) > 0) {
        }
        close(fd);
    }
}

int guest_main(void) {
    clearenv();
    umask(022);
    /* As CPython does at start-up (agent.py's commands inherit it): a write to
     * a closed pipe or past RLIMIT_FSIZE fails (EPIPE, EFBIG). */
    signal(SIGPIPE, SIG_IGN);
    signal(SIGXFSZ, SIG_IGN);
    oserr e = {0};
    char dev[300];
    if (boot_mounts(&e) || (find_port(dev, sizeof dev) && (oserr_set(&e, errno, PORT_NAME), 1)) ||
        (port = open(dev, O_RDWR | O_CLOEXEC | O_NONBLOCK)) < 0 ||
        (port >= 0 && task_dev(&e))) {
        if (port < 0 && !e.text[0]) oserr_set(&e, errno, dev);
        glog("boot failed: %s", e.text);
        /* RB_AUTOBOOT: with reboot=t and -no-reboot QEMU exits, so the host
         * sees the VM end (power-off would need ACPI). */
        reboot(RB_AUTOBOOT);
        _exit(1);
    }
    warm();
    int sp[2];
    if (pipe2(sp, O_CLOEXEC | O_NONBLOCK)) _exit(1);
    sig_r = sp[0], sig_w = sp[1];
    struct sigaction sa = {0};
    sa.sa_handler = on_sigchld;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, NULL);
    loop();
    return 0;
}
