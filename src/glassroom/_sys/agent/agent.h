/* glassroom-init: the compiled in-sandbox init of the namespaces tier.
 *
 * A drop-in for _sys/sandbox_init.py (with landlock.py and init_net.py): the
 * same wire protocol on the same fd (marshal dicts in, JSON objects out, one
 * SOCK_SEQPACKET datagram each), the same walls in the same order, the same
 * replies and error texts.  Static: it needs nothing of the sandbox's /usr.
 */
#ifndef GLASSROOM_AGENT_H
#define GLASSROOM_AGENT_H

#define _GNU_SOURCE
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define MAX_MSG (1 << 20)
#define MAX_DEPTH 32
#define MAX_FDS 8

/* ---- values decoded from marshal (marshal.c) ---- */
enum vkind { V_NONE, V_BOOL, V_INT, V_STR, V_BYTES, V_LIST, V_DICT, V_OTHER };

typedef struct value {
    enum vkind kind;
    int64_t i;        /* V_INT, V_BOOL; a long beyond int64 saturates, `big` set */
    int big;
    char *s;          /* V_STR: file-system bytes (lone surrogates U+DC80..DCFF -> the byte) */
    size_t len;       /* V_STR/V_BYTES bytes; V_LIST/V_DICT items */
    struct value **items; /* V_LIST: len items; V_DICT: 2*len (key, value) */
} value;

/* Parse one marshal datagram; NULL if malformed (bounded: size, depth, counts). */
value *marshal_load(const unsigned char *buf, size_t n);
void marshal_free_all(void); /* frees every value of the last load */
void *arena_alloc(size_t n);  /* zeroed, n + 1 bytes; freed by marshal_free_all */
void arena_keep(void);        /* what was allocated so far is never freed */
value *dict_get(const value *d, const char *key);
int v_int(const value *v, int64_t *out); /* 0 ok, -1 not an int */
const char *v_str(const value *v);        /* NUL-terminated, or NULL */

/* ---- output buffer and JSON (json.c) ---- */
typedef struct buf {
    char *p;
    size_t len, cap;
    int oom;
} buf;

void b_put(buf *b, const void *s, size_t n);
void b_puts(buf *b, const char *s);
void b_printf(buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void b_free(buf *b);
/* JSON string of bytes, as Python's encode_basestring_ascii of a str.
 * surrogateescape: undecodable bytes become \udcXX (os.fsdecode); else U+FFFD
 * (bytes.decode(errors="replace")). */
void json_str(buf *b, const char *s, size_t n, int surrogateescape);
/* JSON string of bytes.decode("utf-8", "backslashreplace") (the tracer's one
 * decoding of names), cut to `limit` characters of that text unless limit < 0. */
void json_str_text(buf *b, const char *s, size_t n, long limit);
size_t text_chars(const char *s, size_t n); /* the length of that text */
/* Python's repr() of a str given as file-system bytes (surrogateescape). */
void py_repr(buf *b, const char *s, size_t n);
/* Python's repr() of a marshal value (for "unknown op ..."). */
void py_repr_value(buf *b, const value *v);

/* ---- an OSError, as Python's str(exc) ---- */
typedef struct oserr {
    int err;
    char text[4096]; /* str(exc) */
} oserr;

void oserr_set(oserr *e, int err, const char *filename); /* strerror + filename repr */
void oserr_msg(oserr *e, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* ---- main.c ---- */
extern int ctl_fd;
void send_json(buf *b); /* sends and frees; on failure: shutdown */
void close_range_from(int low, int high); /* close [low, high) */
int set_winsize(int master, const value *rows, const value *cols); /* TIOCSWINSZ; EINVAL out of range */

/* ---- walls.c ---- */
int landlock_restrict(const value *cfg, oserr *e);  /* ABI, or -1 with e set */
int apply_rlimits(const value *rl, buf *why);       /* 0, or -1 with why = "NAME: error" */
int seccomp_install(const value *bpf, unsigned flags, oserr *e); /* fd (or 0), -1 */

/* ---- net.c ---- */
pid_t start_forwarder(int port, const char *path);
pid_t start_forwarder_tcp(int port, const char *host, int hport);

/* ---- run.c ---- */
/* Child bodies: return only on an error before the op started (e set, or
 * e->err == -1: a non-OSError failure, exit 127). */
void exec_body(const value *msg, int errw, const int *fds, int nfds, oserr *e);
void pty_body(const value *msg, int errw, const int *fds, int nfds, oserr *e);

/* ---- files.c ---- */
void file_body(const value *msg, int errw, const int *fds, int nfds, oserr *e);
/* Its pieces, for the guest agent's file ops (guest.c). */
int open_regular(const char *path, int flags, mode_t mode, oserr *e); /* fd, or -1 */
int list_dir(const char *path, buf *out, oserr *e); /* a JSON list of {name, type, size} */
int makedirs(const char *name, oserr *e);             /* exist_ok */
int remove_tree(const char *path, oserr *e);          /* a file, a link, or a whole tree */
int fd_write_all(int fd, const char *p, size_t n);

/* ---- stream.c: the gVisor tier's init (fd 0/1 framed, as _sys/init_stream.py) ---- */
int stream_main(void);

/* ---- tracer.c: the file audit's tracer (as _sys/tracer.py), selected by --tracer ---- */
int tracer_main(void);
/* In a fork of the guest agent (fds: only out and ctl): follow target's tree,
 * one JSON line per call to out; EOF on ctl kills every tracee left.  The
 * exit status for the agent. */
int tracer_guest(pid_t target, const value *names, int out, int ctl);

/* ---- guest.c: the microVM tier's guest agent, pid 1 (as guest/agent.py) ---- */
int guest_main(void);
/* One frame to the host: the JSON header head + more, no payload. */
void guest_frame(const char *head, size_t hn, const char *more, size_t mn);

/* ---- guest_trace.c: the guest's file audit, one tracer per request ---- */
typedef struct gtrace gtrace;
int gtrace_config(const char *bpf, size_t n, const value *names); /* the audit is on */
int gtrace_install(oserr *e); /* in a child, after its other walls: the trace filter */
int gate_open(int g[2]);      /* (-1, -1) without an audit */
void gate_wait(int g[2]);     /* in the child: until the tracer holds it, or _exit(125) */
/* The parent's side: fork the tracer, wait until it seized pid, open the gate.
 * 0 (*out: the tracer, or NULL untraced) or -1 with why. */
int gtrace_start(pid_t pid, int g[2], gtrace **out, char *why, size_t cap);
int gtrace_fd(const gtrace *t);
int gtrace_read(int64_t rid, gtrace *t);      /* forward what it wrote; 1: it ended (freed) */
int gtrace_nudge(gtrace *t, long since_ms);   /* after the exit; 1: give up waiting */
void gtrace_end(int64_t rid, gtrace *t);      /* reap it, say if it ended badly; frees */
void gtrace_drain(int64_t rid, gtrace *t);    /* until it ends (bounded); frees */
int gtrace_reaped(pid_t pid, int status);     /* reap(): 1 if pid was a tracer */

/* ---- jsonin.c: JSON text to values (the microVM host's frames; trusted, bounded) ---- */
/* A JSON float becomes V_OTHER with s = its text.  Strings: \udc80..\udcff
 * alone is that byte (os.fsdecode's surrogateescape), as marshal.c does. */
value *json_load(const char *text, size_t n);
void json_free_all(void);
void json_keep(void); /* what was loaded so far is never freed */

/* ---- walls.c: what the Python inits raise past their handlers ---- */
/* type(v).__name__ of a marshal value */
const char *py_type(const value *v);
/* The traceback CPython prints for an exception the init does not catch (its
 * last line is `fmt`: the host shows it), then exit status 1, no reply. */
void py_raise(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

#endif
