/* JSON text to values, for the frames the microVM host sends the guest agent.
 *
 * The host is trusted, but the parser is bounded anyway (depth, size): a bug
 * on either side must end in a refused frame, never in a wild read.  Written
 * here rather than taken from a library because the agent is one static
 * binary with no dependency, and it needs exactly what `json.dumps` of the
 * host's dicts produces: objects, arrays, strings (ASCII with \u escapes),
 * integers, floats (kept as their text), true/false/null.
 */
#include "agent.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define alloc arena_alloc /* marshal.c's arena */

void json_free_all(void) { marshal_free_all(); }

/* What was loaded so far stays (the guest's config lives as long as the agent). */
void json_keep(void) { arena_keep(); }

typedef struct {
    const char *p, *end;
} jr;

static value *mk(enum vkind k) {
    value *v = alloc(sizeof *v);
    if (v) v->kind = k;
    return v;
}

static void ws(jr *r) {
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r'))
        r->p++;
}

static int hex4(const char *s, uint32_t *out) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (uint32_t)(c - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

static size_t put_utf8(char *o, uint32_t cp) {
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | cp >> 6);
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | cp >> 12);
        o[1] = (char)(0x80 | (cp >> 6 & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | cp >> 18);
    o[1] = (char)(0x80 | (cp >> 12 & 0x3F));
    o[2] = (char)(0x80 | (cp >> 6 & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* A string: the output is never longer than the input (an escape of 6 or 12
 * characters gives at most 4 bytes), so one allocation of the input's size. */
static value *str(jr *r) {
    r->p++; /* the quote */
    const char *s = r->p;
    while (r->p < r->end && *r->p != '"') r->p += (*r->p == '\\') ? 2 : 1;
    if (r->p >= r->end) return NULL;
    size_t n = (size_t)(r->p - s);
    r->p++;
    value *v = mk(V_STR);
    char *o = v ? alloc(n) : NULL;
    if (!o) return NULL;
    size_t j = 0;
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20) return NULL;
        if (c != '\\') {
            o[j++] = (char)c;
            i++;
            continue;
        }
        char e = s[i + 1];
        i += 2;
        switch (e) {
        case '"': o[j++] = '"'; break;
        case '\\': o[j++] = '\\'; break;
        case '/': o[j++] = '/'; break;
        case 'b': o[j++] = '\b'; break;
        case 'f': o[j++] = '\f'; break;
        case 'n': o[j++] = '\n'; break;
        case 'r': o[j++] = '\r'; break;
        case 't': o[j++] = '\t'; break;
        case 'u': {
            uint32_t cp, lo;
            if (i + 4 > n || hex4(s + i, &cp)) return NULL;
            i += 4;
            if (cp >= 0xD800 && cp < 0xDC00 && i + 6 <= n && s[i] == '\\' && s[i + 1] == 'u' &&
                !hex4(s + i + 2, &lo) && lo >= 0xDC00 && lo < 0xE000) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                i += 6;
            } else if (cp >= 0xDC80 && cp <= 0xDCFF) { /* surrogateescape: the byte */
                o[j++] = (char)(cp - 0xDC00);
                break;
            } else if (cp >= 0xD800 && cp < 0xE000) {
                cp = 0xFFFD; /* a lone surrogate names no file-system byte */
            }
            j += put_utf8(o + j, cp);
            break;
        }
        default: return NULL;
        }
    }
    o[j] = 0;
    v->s = o;
    v->len = j;
    return v;
}

static value *num(jr *r) {
    const char *s = r->p;
    int flt = 0;
    if (r->p < r->end && *r->p == '-') r->p++;
    while (r->p < r->end) {
        char c = *r->p;
        if (c >= '0' && c <= '9') r->p++;
        else if (c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-') {
            flt = 1;
            r->p++;
        } else break;
    }
    size_t n = (size_t)(r->p - s);
    if (n == 0 || n > 64) return NULL;
    char text[72];
    memcpy(text, s, n);
    text[n] = 0;
    value *v = mk(flt ? V_OTHER : V_INT);
    if (!v) return NULL;
    if (flt) {
        v->s = alloc(n);
        if (!v->s) return NULL;
        memcpy(v->s, text, n);
        v->len = n;
        return v;
    }
    char *endp;
    errno = 0;
    long long x = strtoll(text, &endp, 10);
    if (*endp) return NULL;
    if (errno == ERANGE) v->big = 1;
    v->i = x;
    return v;
}

static value *item(jr *r, int depth);

/* Items of an array or object, gathered in a list, then copied into one block. */
static value *seq(jr *r, int depth, int object) {
    char close = object ? '}' : ']';
    r->p++;
    value *v = mk(object ? V_DICT : V_LIST);
    if (!v) return NULL;
    size_t cap = 8, n = 0;
    value **items = alloc(cap * sizeof *items);
    if (!items) return NULL;
    ws(r);
    if (r->p < r->end && *r->p == close) {
        r->p++;
        v->items = items;
        return v;
    }
    for (;;) {
        if (n + 2 > cap) {
            value **more = alloc(2 * cap * sizeof *more);
            if (!more) return NULL;
            memcpy(more, items, n * sizeof *items);
            items = more;
            cap *= 2;
        }
        ws(r);
        if (object) {
            if (r->p >= r->end || *r->p != '"') return NULL;
            value *k = str(r);
            if (!k) return NULL;
            items[n++] = k;
            ws(r);
            if (r->p >= r->end || *r->p != ':') return NULL;
            r->p++;
        }
        value *x = item(r, depth + 1);
        if (!x) return NULL;
        items[n++] = x;
        ws(r);
        if (r->p >= r->end) return NULL;
        if (*r->p == ',') {
            r->p++;
            continue;
        }
        if (*r->p != close) return NULL;
        r->p++;
        break;
    }
    v->items = items;
    v->len = object ? n / 2 : n;
    return v;
}

static int word(jr *r, const char *w) {
    size_t n = strlen(w);
    if ((size_t)(r->end - r->p) < n || memcmp(r->p, w, n)) return 0;
    r->p += n;
    return 1;
}

static value *item(jr *r, int depth) {
    if (depth > MAX_DEPTH) return NULL;
    ws(r);
    if (r->p >= r->end) return NULL;
    char c = *r->p;
    if (c == '{') return seq(r, depth, 1);
    if (c == '[') return seq(r, depth, 0);
    if (c == '"') return str(r);
    if (c == '-' || (c >= '0' && c <= '9')) return num(r);
    value *v;
    if (word(r, "true")) {
        if ((v = mk(V_BOOL))) v->i = 1;
        return v;
    }
    if (word(r, "false")) return mk(V_BOOL);
    if (word(r, "null")) return mk(V_NONE);
    return NULL;
}

value *json_load(const char *text, size_t n) {
    if (n > MAX_MSG) return NULL;
    jr r = {text, text + n};
    value *v = item(&r, 0);
    if (!v) return NULL;
    ws(&r);
    return r.p == r.end ? v : NULL;
}
