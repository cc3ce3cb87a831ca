/* File operations (as sandbox_init.py's _file_body): run in a child, so they
 * see exactly the sandbox's view, under every wall. */
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int clean(const value *v) { return v && v->kind == V_STR && strlen(v->s) == v->len; }

/* open_regular: O_NONBLOCK open (a FIFO never blocks it), then the type of
 * what was opened, from the fd; only a regular file goes on. */
int open_regular(const char *path, int flags, mode_t mode, oserr *e) {
    flags |= O_NONBLOCK | O_CLOEXEC | O_NOCTTY;
    int fd = open(path, flags, mode);
    if (fd < 0) {
        if (errno == ENXIO) oserr_msg(e, ENXIO, "not a regular file; refused");
        else oserr_set(e, errno, path);
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        oserr_set(e, errno, NULL);
        close(fd);
        return -1;
    }
    mode_t kind = st.st_mode & S_IFMT;
    if (kind == S_IFDIR) {
        oserr_msg(e, EISDIR, "is a directory");
        close(fd);
        return -1;
    }
    if (kind != S_IFREG) {
        const char *what = kind == S_IFIFO    ? "a FIFO"
                           : kind == S_IFSOCK ? "a socket"
                           : kind == S_IFCHR  ? "a character device"
                           : kind == S_IFBLK  ? "a block device"
                                              : "a special file";
        oserr_msg(e, ENXIO, "not a regular file (%s); refused", what);
        close(fd);
        return -1;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0) {
        oserr_set(e, errno, NULL);
        close(fd);
        return -1;
    }
    return fd;
}

int fd_write_all(int fd, const char *p, size_t n) {
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

static char *join(const char *dir, const char *name) {
    size_t dl = strlen(dir), nl = strlen(name);
    char *p = malloc(dl + nl + 2);
    if (!p) return NULL;
    memcpy(p, dir, dl);
    size_t j = dl;
    if (dl && dir[dl - 1] != '/') p[j++] = '/';
    memcpy(p + j, name, nl + 1);
    return p;
}

static const char *entry_type(mode_t mode) {
    switch (mode & S_IFMT) {
    case S_IFDIR: return "dir";
    case S_IFLNK: return "symlink";
    case S_IFREG: return "file";
    default: return "other";
    }
}

int list_dir(const char *path, buf *out, oserr *e) {
    DIR *d = opendir(path);
    if (!d) {
        oserr_set(e, errno, path);
        return -1;
    }
    b_puts(out, "[");
    int first = 1;
    for (;;) {
        errno = 0;
        struct dirent *de = readdir(d);
        if (!de) {
            if (errno) {
                oserr_set(e, errno, path);
                closedir(d);
                return -1;
            }
            break;
        }
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        char *full = join(path, de->d_name);
        struct stat st;
        if (!full || lstat(full, &st) != 0) {
            int err = full ? errno : ENOMEM;
            if (err == ENOENT) { /* removed or renamed while listed: not there any more */
                free(full);
                continue;
            }
            oserr_set(e, err, full);
            free(full);
            closedir(d);
            return -1;
        }
        free(full);
        if (!first) b_puts(out, ",");
        first = 0;
        b_puts(out, "{\"name\":");
        json_str(out, de->d_name, strlen(de->d_name), 1);
        b_printf(out, ",\"type\":\"%s\",\"size\":%lld}", entry_type(st.st_mode),
                 (long long)st.st_size);
    }
    closedir(d);
    b_puts(out, "]");
    if (out->oom) {
        oserr_set(e, ENOMEM, NULL);
        return -1;
    }
    return 0;
}

static int is_dir(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/* posixpath.split */
static void split(const char *p, char **head, char **tail) {
    const char *slash = strrchr(p, '/');
    size_t i = slash ? (size_t)(slash - p) + 1 : 0;
    *head = strndup(p, i);
    *tail = strdup(p + i);
    if (!*head || !*tail) return;
    size_t h = strlen(*head), all = 1;
    for (size_t k = 0; k < h; k++)
        if ((*head)[k] != '/') all = 0;
    if (h && !all)
        while (h && (*head)[h - 1] == '/') (*head)[--h] = 0;
}

/* os.makedirs(name, exist_ok=True) */
int makedirs(const char *name, oserr *e) {
    char *head, *tail;
    split(name, &head, &tail);
    if (!head || !tail) {
        oserr_set(e, ENOMEM, NULL);
        return -1;
    }
    if (!*tail) {
        char *h2, *t2;
        split(head, &h2, &t2);
        free(head);
        free(tail);
        head = h2;
        tail = t2;
        if (!head || !tail) {
            oserr_set(e, ENOMEM, NULL);
            return -1;
        }
    }
    struct stat st;
    if (*head && *tail && stat(head, &st) != 0) {
        if (makedirs(head, e) != 0 && e->err != EEXIST) {
            free(head);
            free(tail);
            return -1;
        }
        if (!strcmp(tail, ".")) { /* xxx/newdir/. exists if xxx/newdir exists */
            free(head);
            free(tail);
            return 0;
        }
    }
    free(head);
    free(tail);
    if (mkdir(name, 0777) != 0) {
        int err = errno;
        if (!is_dir(name)) {
            oserr_set(e, err, name);
            return -1;
        }
    }
    return 0;
}

/* rmtree without following symlinks */
int remove_tree(const char *path, oserr *e) {
    if (unlink(path) == 0) return 0;
    int err = errno;
    if (err == EPERM || err == EACCES) {
        struct stat st;
        if (!is_dir(path) || (lstat(path, &st) == 0 && S_ISLNK(st.st_mode))) {
            oserr_set(e, err, path);
            return -1;
        }
    } else if (err != EISDIR) {
        oserr_set(e, err, path);
        return -1;
    }
    DIR *d = opendir(path);
    if (!d) {
        oserr_set(e, errno, path);
        return -1;
    }
    size_t n = 0, cap = 16;
    char **names = malloc(cap * sizeof *names);
    int *dirs = malloc(cap * sizeof *dirs);
    for (;;) {
        if (!names || !dirs) {
            closedir(d);
            oserr_set(e, ENOMEM, NULL);
            return -1;
        }
        errno = 0;
        struct dirent *de = readdir(d);
        if (!de) {
            if (errno) {
                oserr_set(e, errno, path);
                closedir(d);
                return -1;
            }
            break;
        }
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        if (n == cap) {
            cap *= 2;
            names = realloc(names, cap * sizeof *names);
            dirs = realloc(dirs, cap * sizeof *dirs);
            if (!names || !dirs) continue;
        }
        names[n] = join(path, de->d_name);
        if (!names[n]) continue;
        if (de->d_type == DT_UNKNOWN) {
            struct stat st;
            dirs[n] = lstat(names[n], &st) == 0 && S_ISDIR(st.st_mode);
        } else {
            dirs[n] = de->d_type == DT_DIR;
        }
        n++;
    }
    closedir(d);
    for (size_t i = 0; i < n; i++) {
        if (dirs[i]) {
            if (remove_tree(names[i], e)) return -1;
        } else if (unlink(names[i]) != 0) {
            oserr_set(e, errno, names[i]);
            return -1;
        }
    }
    if (rmdir(path) != 0) {
        oserr_set(e, errno, path);
        return -1;
    }
    return 0;
}

void file_body(const value *msg, int errw, const int *fds, int nfds, oserr *e) {
    const value *kind = dict_get(msg, "kind"), *pv = dict_get(msg, "path");
    int pipe = nfds ? fds[0] : -1;
    e->err = -1;
    if (!kind || kind->kind != V_STR || !clean(pv)) return;
    const char *path = pv->s, *k = kind->s;
    static char chunk[1 << 16];
    if (!strcmp(k, "read")) {
        int fd = open_regular(path, O_RDONLY, 0, e);
        if (fd < 0) return;
        int64_t limit;
        if (v_int(dict_get(msg, "max"), &limit)) _exit(127);
        close(errw);
        while (limit > 0) {
            ssize_t r = read(fd, chunk, limit < (int64_t)sizeof chunk ? (size_t)limit : sizeof chunk);
            if (r < 0) _exit(errno & 0xFF);
            if (r == 0) break;
            limit -= r;
            if (fd_write_all(pipe, chunk, (size_t)r)) _exit(errno & 0xFF);
        }
        _exit(0);
    } else if (!strcmp(k, "write")) {
        int64_t mode = 0644;
        const value *mv = dict_get(msg, "mode");
        if (mv && v_int(mv, &mode)) return;
        int fd = open_regular(path, O_WRONLY | O_CREAT | O_TRUNC, (mode_t)mode, e);
        if (fd < 0) return;
        close(errw);
        for (;;) {
            ssize_t r = read(pipe, chunk, sizeof chunk);
            if (r < 0) _exit(errno & 0xFF);
            if (r == 0) break;
            if (fd_write_all(fd, chunk, (size_t)r)) _exit(errno & 0xFF);
        }
        if (close(fd) != 0) _exit(errno & 0xFF);
        _exit(0);
    } else if (!strcmp(k, "list")) {
        buf out = {0};
        if (list_dir(path, &out, e)) return;
        close(errw);
        if (fd_write_all(pipe, out.p, out.len)) _exit(errno & 0xFF);
        _exit(0);
    } else if (!strcmp(k, "mkdir")) {
        if (makedirs(path, e)) return;
        close(errw);
        _exit(0);
    } else if (!strcmp(k, "remove")) {
        if (remove_tree(path, e)) return;
        close(errw);
        _exit(0);
    }
    buf b = {0};
    py_repr_value(&b, kind);
    oserr_msg(e, EINVAL, "unknown file op %s", b.p ? b.p : "");
    b_free(&b);
}
