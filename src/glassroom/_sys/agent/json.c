/* Output: a growable buffer, JSON strings as Python's encode_basestring_ascii,
 * and Python's repr() and str(OSError) texts (tests compare error messages). */
#include "agent.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void b_put(buf *b, const void *s, size_t n) {
    if (b->oom) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

void b_puts(buf *b, const char *s) { b_put(b, s, strlen(s)); }

void b_printf(buf *b, const char *fmt, ...) {
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n > 0) b_put(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

void b_free(buf *b) {
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
    b->oom = 0;
}

/* One code point of strict UTF-8 (as Python decodes: no surrogates, no
 * overlongs).  Returns its length, or -(length of the invalid maximal subpart). */
static int utf8_next(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    int need;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c >= 0xE0 && c <= 0xEF) {
        need = 2;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 3;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else
        return -1;
    uint32_t v = c & (0x3F >> need);
    for (int k = 1; k <= need; k++) {
        if ((size_t)k >= n) return -k;
        unsigned d = s[k];
        if (d < lo || d > hi) return -k;
        lo = 0x80;
        hi = 0xBF;
        v = v << 6 | (d & 0x3F);
    }
    *cp = v;
    return need + 1;
}

static void u_escape(buf *b, uint32_t cp) {
    if (cp >= 0x10000) {
        cp -= 0x10000;
        b_printf(b, "\\u%04x\\u%04x", 0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF));
    } else {
        b_printf(b, "\\u%04x", cp);
    }
}

/* One code point of a str, as encode_basestring_ascii writes it. */
static void json_cp(buf *b, uint32_t cp) {
    switch (cp) {
    case '"': b_puts(b, "\\\""); break;
    case '\\': b_puts(b, "\\\\"); break;
    case '\n': b_puts(b, "\\n"); break;
    case '\r': b_puts(b, "\\r"); break;
    case '\t': b_puts(b, "\\t"); break;
    case '\b': b_puts(b, "\\b"); break;
    case '\f': b_puts(b, "\\f"); break;
    default:
        if (cp >= 0x20 && cp <= 0x7E) {
            char c = (char)cp;
            b_put(b, &c, 1);
        } else {
            u_escape(b, cp);
        }
    }
}

void json_str(buf *b, const char *str, size_t n, int surrogateescape) {
    const unsigned char *s = (const unsigned char *)str;
    b_put(b, "\"", 1);
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        int k = utf8_next(s + i, n - i, &cp);
        if (k < 0) {
            if (surrogateescape)
                for (int j = 0; j < -k; j++) b_printf(b, "\\u%04x", 0xDC00 + s[i + j]);
            else
                b_puts(b, "\\ufffd");
            i += (size_t)-k;
            continue;
        }
        i += (size_t)k;
        json_cp(b, cp);
    }
    b_put(b, "\"", 1);
}

size_t text_chars(const char *str, size_t n) {
    const unsigned char *s = (const unsigned char *)str;
    size_t chars = 0;
    for (size_t i = 0; i < n; chars++) {
        uint32_t cp;
        int k = utf8_next(s + i, n - i, &cp);
        if (k < 0) {
            chars += 3; /* \xNN */
            i++;
        } else {
            i += (size_t)k;
        }
    }
    return chars;
}

void json_str_text(buf *b, const char *str, size_t n, long limit) {
    const unsigned char *s = (const unsigned char *)str;
    long chars = 0;
    b_put(b, "\"", 1);
    for (size_t i = 0; i < n && (limit < 0 || chars < limit);) {
        uint32_t cp;
        int k = utf8_next(s + i, n - i, &cp);
        if (k < 0) { /* each undecodable byte is the 4 characters \xNN */
            char hex[5];
            snprintf(hex, sizeof hex, "x%02x", s[i]);
            json_cp(b, '\\');
            chars++;
            for (int j = 0; j < 3 && (limit < 0 || chars < limit); j++, chars++) json_cp(b, (uint32_t)hex[j]);
            i++;
            continue;
        }
        i += (size_t)k;
        json_cp(b, cp);
        chars++;
    }
    b_put(b, "\"", 1);
}

/* Close to str.isprintable() for what a path holds: C0/C1 controls, the
 * soft hyphen, format characters, line/paragraph separators, private use. */
static int printable(uint32_t cp) {
    if (cp < 0x20 || (cp >= 0x7F && cp <= 0xA0) || cp == 0xAD) return 0;
    if ((cp >= 0x200B && cp <= 0x200F) || (cp >= 0x2028 && cp <= 0x202E) ||
        (cp >= 0x2060 && cp <= 0x206F) || cp == 0xFEFF || (cp >= 0xE000 && cp <= 0xF8FF) ||
        (cp >= 0xFFF0 && cp <= 0xFFFB) || cp >= 0xF0000)
        return 0;
    return 1;
}

void py_repr(buf *b, const char *str, size_t n) {
    const unsigned char *s = (const unsigned char *)str;
    int single = 0, dbl = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\'') single = 1;
        if (s[i] == '"') dbl = 1;
    }
    char q = single && !dbl ? '"' : '\'';
    b_put(b, &q, 1);
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        int k = utf8_next(s + i, n - i, &cp);
        if (k < 0) { /* surrogateescape: each byte is a lone surrogate */
            for (int j = 0; j < -k; j++) b_printf(b, "\\udc%02x", s[i + j]);
            i += (size_t)-k;
            continue;
        }
        if (cp == (uint32_t)q || cp == '\\') {
            b_put(b, "\\", 1);
            b_put(b, s + i, 1);
        } else if (cp == '\t') b_puts(b, "\\t");
        else if (cp == '\n') b_puts(b, "\\n");
        else if (cp == '\r') b_puts(b, "\\r");
        else if (printable(cp)) b_put(b, s + i, (size_t)k);
        else if (cp < 0x100) b_printf(b, "\\x%02x", cp);
        else if (cp < 0x10000) b_printf(b, "\\u%04x", cp);
        else b_printf(b, "\\U%08x", cp);
        i += (size_t)k;
    }
    b_put(b, &q, 1);
}

/* repr() of a marshal value.  Bounded like Python's own repr of a container
 * that holds itself ("[...]"): marshal back-references can make a list that
 * contains itself, or a shared list reached 2^32 times through 32 levels, so
 * the containers being printed are tracked and the text stops at REPR_MAX. */
#define REPR_MAX 4096
static const value *repr_stack[MAX_DEPTH + 2];

static void repr_at(buf *b, const value *v, int depth) {
    if (b->len > REPR_MAX) return;
    if (!v) {
        b_puts(b, "None");
        return;
    }
    if (v->kind == V_LIST || v->kind == V_DICT) {
        int seen = depth > MAX_DEPTH;
        for (int i = 0; i < depth && !seen; i++) seen = repr_stack[i] == v;
        if (seen) {
            b_puts(b, v->kind == V_LIST ? "[...]" : "{...}");
            return;
        }
        repr_stack[depth] = v;
    }
    switch (v->kind) {
    case V_NONE: b_puts(b, "None"); break;
    case V_BOOL: b_puts(b, v->i ? "True" : "False"); break;
    case V_INT: b_printf(b, "%lld", (long long)v->i); break;
    case V_STR: py_repr(b, v->s, v->len); break;
    case V_BYTES:
        b_puts(b, "b");
        py_repr(b, v->s, v->len);
        break;
    case V_LIST:
        b_puts(b, "[");
        for (size_t i = 0; i < v->len && b->len <= REPR_MAX; i++) {
            if (i) b_puts(b, ", ");
            repr_at(b, v->items[i], depth + 1);
        }
        b_puts(b, "]");
        break;
    case V_DICT:
        b_puts(b, "{");
        for (size_t i = 0; i < v->len && b->len <= REPR_MAX; i++) {
            if (i) b_puts(b, ", ");
            repr_at(b, v->items[2 * i], depth + 1);
            b_puts(b, ": ");
            repr_at(b, v->items[2 * i + 1], depth + 1);
        }
        b_puts(b, "}");
        break;
    default: b_puts(b, "<object>");
    }
}

void py_repr_value(buf *b, const value *v) {
    size_t start = b->len;
    repr_at(b, v, 0);
    if (b->len - start > REPR_MAX) {
        b->len = start + REPR_MAX;
        b_puts(b, "...");
    }
}

static void set_text(oserr *e, buf *b) {
    size_t n = b->len < sizeof e->text - 1 ? b->len : sizeof e->text - 1;
    if (b->p) memcpy(e->text, b->p, n);
    e->text[n] = 0;
    b_free(b);
}

void oserr_set(oserr *e, int err, const char *filename) {
    buf b = {0};
    e->err = err;
    b_printf(&b, "[Errno %d] %s", err, strerror(err));
    if (filename) {
        b_puts(&b, ": ");
        py_repr(&b, filename, strlen(filename));
    }
    set_text(e, &b);
}

void oserr_msg(oserr *e, int err, const char *fmt, ...) {
    char tmp[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    buf b = {0};
    e->err = err;
    b_printf(&b, "[Errno %d] ", err);
    b_puts(&b, tmp);
    set_text(e, &b);
}
