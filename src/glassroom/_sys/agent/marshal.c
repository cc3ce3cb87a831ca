/* A bounded reader of Python's marshal format (the types the supervisor sends). */
#include "agent.h"

#include <stdlib.h>
#include <string.h>

#define FLAG_REF 0x80
#define MAX_REFS 65536

/* Every value of a load comes from one arena, freed at once after the message
 * (jsonin.c's loads share it). */
struct chunk { struct chunk *next; };
static struct chunk *arena;

void *arena_alloc(size_t n) {
    struct chunk *c = malloc(sizeof *c + n + 1);
    if (!c) return NULL;
    c->next = arena;
    arena = c;
    memset(c + 1, 0, n + 1);
    return c + 1;
}

void arena_keep(void) { arena = NULL; }

void marshal_free_all(void) {
    while (arena) {
        struct chunk *n = arena->next;
        free(arena);
        arena = n;
    }
}

#define alloc arena_alloc

typedef struct {
    const unsigned char *p, *end;
    value **refs;
    size_t nrefs;
} reader;

static int r_u32(reader *r, uint32_t *out) {
    if (r->end - r->p < 4) return -1;
    *out = (uint32_t)r->p[0] | (uint32_t)r->p[1] << 8 | (uint32_t)r->p[2] << 16 |
           (uint32_t)r->p[3] << 24;
    r->p += 4;
    return 0;
}

static value *new_value(enum vkind k) {
    value *v = alloc(sizeof *v);
    if (v) v->kind = k;
    return v;
}

/* UTF-8 (surrogatepass, as marshal writes) to file-system bytes: U+DC80..U+DCFF,
 * what os.fsdecode made of an undecodable byte, becomes that byte again. */
static value *make_str(const unsigned char *s, size_t n, int utf8) {
    value *v = new_value(V_STR);
    if (!v) return NULL;
    char *o = alloc(n);
    if (!o) return NULL;
    size_t j = 0;
    for (size_t i = 0; i < n;) {
        if (utf8 && s[i] == 0xED && i + 2 < n && (s[i + 1] == 0xB2 || s[i + 1] == 0xB3) &&
            (s[i + 2] & 0xC0) == 0x80) {
            unsigned cp = 0xD000u | (unsigned)(s[i + 1] & 0x3F) << 6 | (s[i + 2] & 0x3F);
            if (cp >= 0xDC80 && cp <= 0xDCFF) {
                o[j++] = (char)(cp & 0xFF);
                i += 3;
                continue;
            }
        }
        o[j++] = (char)s[i++];
    }
    o[j] = 0;
    v->s = o;
    v->len = j;
    return v;
}

static value *r_object(reader *r, int depth);

static value *r_seq(reader *r, value *v, size_t n, int depth) {
    if (n > (size_t)(r->end - r->p)) return NULL; /* every item takes a byte at least */
    v->kind = V_LIST;
    v->len = n;
    v->items = alloc(sizeof(value *) * (n ? n : 1));
    if (!v->items) return NULL;
    for (size_t i = 0; i < n; i++)
        if (!(v->items[i] = r_object(r, depth + 1))) return NULL;
    return v;
}

static value *r_object(reader *r, int depth) {
    if (depth > MAX_DEPTH || r->p >= r->end) return NULL;
    int code = *r->p++;
    int flag = code & FLAG_REF;
    code &= ~FLAG_REF;
    size_t idx = 0;
    if (flag) {
        if (r->nrefs >= MAX_REFS) return NULL;
        idx = r->nrefs++;
        r->refs[idx] = NULL;
    }
    value *v = NULL;
    uint32_t n;
    switch (code) {
    case 'N': v = new_value(V_NONE); break;
    case 'F': case 'T':
        if ((v = new_value(V_BOOL))) v->i = code == 'T';
        break;
    case 'i':
        if (r_u32(r, &n)) return NULL;
        if ((v = new_value(V_INT))) v->i = (int32_t)n;
        break;
    case 'l': {
        if (r_u32(r, &n)) return NULL;
        int32_t sn = (int32_t)n;
        uint32_t cnt = sn < 0 ? (uint32_t)(-(int64_t)sn) : (uint32_t)sn;
        if (cnt > 1000 || (size_t)(r->end - r->p) < 2 * (size_t)cnt) return NULL;
        if (!(v = new_value(V_INT))) return NULL;
        uint64_t acc = 0;
        for (uint32_t k = 0; k < cnt; k++) {
            unsigned d = r->p[2 * k] | (unsigned)r->p[2 * k + 1] << 8;
            if (d > 0x7FFF) return NULL;
            if (k >= 5 || (k == 4 && d > 7)) v->big = 1; /* beyond 63 bits */
            else acc |= (uint64_t)d << (15 * k);
        }
        r->p += 2 * (size_t)cnt;
        if (v->big) acc = INT64_MAX;
        v->i = sn < 0 ? -(int64_t)acc : (int64_t)acc;
        break;
    }
    case 'z': case 'Z':
        if (r->p >= r->end) return NULL;
        n = *r->p++;
        if (n > (size_t)(r->end - r->p)) return NULL;
        v = make_str(r->p, n, 0);
        r->p += n;
        break;
    case 'a': case 'A': case 'u': case 't': case 's':
        if (r_u32(r, &n) || n > (size_t)(r->end - r->p)) return NULL;
        v = make_str(r->p, n, code == 'u' || code == 't');
        if (v && code == 's') v->kind = V_BYTES;
        r->p += n;
        break;
    case 'r':
        if (r_u32(r, &n) || n >= r->nrefs || !r->refs[n]) return NULL;
        return r->refs[n];
    case ')': case '(': case '[': case '<': case '>':
        if (code == ')') {
            if (r->p >= r->end) return NULL;
            n = *r->p++;
        } else if (r_u32(r, &n)) {
            return NULL;
        }
        if (!(v = new_value(V_LIST))) return NULL;
        if (flag) r->refs[idx] = v;
        if (code == '<' || code == '>') v->kind = V_OTHER; /* a set: kept opaque */
        if (!r_seq(r, v, n, depth)) return NULL;
        if (code == '<' || code == '>') v->kind = V_OTHER;
        return v;
    case '{': {
        if (!(v = new_value(V_DICT))) return NULL;
        if (flag) r->refs[idx] = v;
        size_t cap = 8, cnt = 0;
        value **items = alloc(sizeof(value *) * 2 * cap);
        if (!items) return NULL;
        for (;;) {
            if (r->p >= r->end) return NULL;
            if (*r->p == '0') {
                r->p++;
                break;
            }
            value *k = r_object(r, depth + 1);
            if (!k) return NULL;
            value *val = r_object(r, depth + 1);
            if (!val) return NULL;
            if (cnt == cap) {
                value **bigger = alloc(sizeof(value *) * 4 * cap);
                if (!bigger) return NULL;
                memcpy(bigger, items, sizeof(value *) * 2 * cap);
                items = bigger;
                cap *= 2;
            }
            items[2 * cnt] = k;
            items[2 * cnt + 1] = val;
            cnt++;
        }
        v->items = items;
        v->len = cnt;
        return v;
    }
    default:
        return NULL; /* floats, code objects, ...: never sent */
    }
    if (v && flag) r->refs[idx] = v;
    return v;
}

value *marshal_load(const unsigned char *data, size_t n) {
    static value *refs[MAX_REFS];
    if (n > MAX_MSG) return NULL;
    reader r = {data, data + n, refs, 0};
    value *v = r_object(&r, 0);
    if (v && r.p != r.end) return NULL;
    return v;
}

static int key_is(const value *k, const char *key) {
    return k->kind == V_STR && k->len == strlen(key) && memcmp(k->s, key, k->len) == 0;
}

value *dict_get(const value *d, const char *key) {
    if (!d || d->kind != V_DICT) return NULL;
    value *found = NULL;
    for (size_t i = 0; i < d->len; i++) /* the last one wins, as in a dict display */
        if (key_is(d->items[2 * i], key)) found = d->items[2 * i + 1];
    return found;
}

int v_int(const value *v, int64_t *out) {
    if (!v || (v->kind != V_INT && v->kind != V_BOOL)) return -1;
    *out = v->i;
    return 0;
}

const char *v_str(const value *v) {
    return v && v->kind == V_STR ? v->s : NULL;
}
