/*
 * bench/loadgen.c - C port of bench/loadgen.py, the WebSocket load generator of
 * `scripts/bench`: many sessions, paced binary echo traffic.
 *
 * It mirrors loadgen.py: the same options, phases, pacing, checks and the same JSON
 * object on stdout (every key, same meanings and rounding), plus "impl": "c".
 * loadgen.py stays the reference, and the fallback when no C compiler is present;
 * this port exists because the Python one saturates its core at ~200 sessions on a
 * 2-core machine, which distorts tail-latency figures.
 *
 * One process, one level-triggered epoll loop, raw non-blocking sockets, one shared
 * receive buffer. Every session gets one random masking key and a frame template
 * (header + 16-byte prefix + filler, the filler masked once up front); per message
 * only the prefix (session id u32, sequence u32, send time u64 ns CLOCK_MONOTONIC,
 * little endian) is masked into the template, which is then sent. Echoes are walked
 * in place: the prefix gives the RTT and the sequence (loss / reorder), the filler
 * is compared for corruption.
 *
 * Phases: ramp (at most --ramp-rate new sessions/s, --ramp-inflight handshakes at a
 * time), warmup, measure (--duration s), drain (wait for outstanding echoes), close
 * (close frame 1000, wait for the reply). Every session sends one message per
 * 1/--rate s; the N sessions are phase-shifted evenly over that period.
 *
 * With --bot-port P it is also the upstream echo bot (echo_bot.py's EchoServer) on
 * 127.0.0.1:P, served in the same epoll loop.
 *
 * During the measure window it samples utime+stime of the --cpu-pid processes
 * (children included) from /proc, its own rusage and /proc/stat per core.
 *
 * Build: cc -O2 -Wall -Wextra -o loadgen bench/loadgen.c   (C11 + POSIX/Linux, libc only)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#define SESSION_RECV 262144   /* loadgen.py: sock.recv(262144) */
#define HANDSHAKE_RECV 65536  /* loadgen.py: sock.recv(65536) during the ramp */
#define BOT_RECV (256 * 1024) /* echo_bot.py: RECV_SIZE */
#define BOT_MAX_HEADER (16 * 1024)
/* A partial frame at least this big is not copied in front of the shared buffer on
 * every read (quadratic for huge frames): the next read goes right behind it. */
#define BIG_PENDING 65536
#define MAX_EVENTS 1023 /* Python's epoll.poll() default maxevents (FD_SETSIZE - 1) */
#define EPOLLERRS (EPOLLERR | EPOLLHUP)

enum { CONNECTING, HANDSHAKE, OPEN, CLOSING, DONE, FAILED };
enum { TAG_SESSION = 1, TAG_LISTEN = 2, TAG_CONN = 3 }; /* epoll data: tag << 32 | index */

/* ------------------------------------------------------------------ utilities */

static const char *prog = "loadgen";

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        fprintf(stderr, "%s: out of memory\n", prog);
        exit(1);
    }
    return q;
}

static int64_t mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int again(int e) { return e == EAGAIN || e == EWOULDBLOCK || e == EINTR || e == EINPROGRESS; }

/* Python's errno.errorcode names (glibc spells two of the aliases differently). */
static const char *errname(int e, char *tmp, size_t cap) {
    if (e == EOPNOTSUPP) return "ENOTSUP";
    if (e == EDEADLK) return "EDEADLOCK";
    const char *n = strerrorname_np(e);
    if (n) return n;
    snprintf(tmp, cap, "%d", e);
    return tmp;
}

static void fill_random(uint8_t *p, size_t n) {
    while (n) {
        ssize_t k = getrandom(p, n, 0);
        if (k < 0) {
            if (errno == EINTR) continue;
            perror("getrandom");
            exit(1);
        }
        p += k;
        n -= (size_t)k;
    }
}

static void put_le32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put_le64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get_le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get_le64(const uint8_t *p) { return get_le32(p) | (uint64_t)get_le32(p + 4) << 32; }
static uint64_t get_be(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = v << 8 | p[i];
    return v;
}

/* A byte buffer; the live bytes are p[off, len). Grows, never shrinks. */
typedef struct {
    uint8_t *p;
    size_t off, len, cap;
} Buf;

static size_t buf_size(const Buf *b) { return b->len - b->off; }
static uint8_t *buf_data(const Buf *b) { return b->p + b->off; }
static void buf_clear(Buf *b) { b->off = b->len = 0; }

static void buf_reserve(Buf *b, size_t need) {
    if (need <= b->cap) return;
    size_t c = b->cap ? b->cap : 256;
    while (c < need) c *= 2;
    b->p = xrealloc(b->p, c);
    b->cap = c;
}

static void buf_append(Buf *b, const void *d, size_t n) {
    if (!n) return;
    if (b->len + n > b->cap && b->off) { /* compact before growing */
        memmove(b->p, b->p + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
    }
    buf_reserve(b, b->len + n);
    memcpy(b->p + b->len, d, n);
    b->len += n;
}

/* Room for n more bytes after the live ones (compacting first); returns where they go. */
static uint8_t *buf_tail(Buf *b, size_t n) {
    if (b->off && b->len + n > b->cap) {
        memmove(b->p, b->p + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
    }
    buf_reserve(b, b->len + n);
    return b->p + b->len;
}

static void buf_consume(Buf *b, size_t n) {
    b->off += n;
    if (b->off >= b->len) b->off = b->len = 0;
}

static void buf_free(Buf *b) {
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* ASCII whitespace as bytes.strip() sees it. */
static int is_ws(uint8_t c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

static void strip(const uint8_t **p, size_t *n) {
    while (*n && is_ws(**p)) (*p)++, (*n)--;
    while (*n && is_ws((*p)[*n - 1])) (*n)--;
}

/* ------------------------------------------------------------ SHA-1 + base64 */

typedef struct {
    uint32_t h[5];
    uint64_t bytes;
    uint8_t blk[64];
    size_t used;
} Sha1;

static uint32_t rol(uint32_t x, int k) { return x << k | x >> (32 - k); }

static void sha1_block(uint32_t h[5], const uint8_t *p) {
    uint32_t w[80], a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 16; i++) w[i] = (uint32_t)get_be(p + 4 * i, 4);
    for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) f = (b & c) | (~b & d), k = 0x5A827999;
        else if (i < 40) f = b ^ c ^ d, k = 0x6ED9EBA1;
        else if (i < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDC;
        else f = b ^ c ^ d, k = 0xCA62C1D6;
        uint32_t t = rol(a, 5) + f + e + k + w[i];
        e = d, d = c, c = rol(b, 30), b = a, a = t;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
}

static void sha1_init(Sha1 *s) {
    static const uint32_t h0[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    memcpy(s->h, h0, sizeof h0);
    s->bytes = 0;
    s->used = 0;
}

static void sha1_update(Sha1 *s, const void *data, size_t n) {
    const uint8_t *p = data;
    s->bytes += n;
    while (n) {
        size_t k = 64 - s->used < n ? 64 - s->used : n;
        memcpy(s->blk + s->used, p, k);
        s->used += k, p += k, n -= k;
        if (s->used == 64) sha1_block(s->h, s->blk), s->used = 0;
    }
}

static void sha1_final(Sha1 *s, uint8_t out[20]) {
    uint64_t bits = s->bytes * 8;
    uint8_t pad = 0x80, zero = 0, len[8];
    sha1_update(s, &pad, 1);
    while (s->used != 56) sha1_update(s, &zero, 1);
    for (int i = 0; i < 8; i++) len[i] = (uint8_t)(bits >> (56 - 8 * i));
    sha1_update(s, len, 8);
    for (int i = 0; i < 20; i++) out[i] = (uint8_t)(s->h[i / 4] >> (24 - 8 * (i % 4)));
}

static void base64(const uint8_t *in, size_t n, char *out) {
    static const char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n) v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n) v |= in[i + 2];
        out[o++] = t[v >> 18 & 63];
        out[o++] = t[v >> 12 & 63];
        out[o++] = i + 1 < n ? t[v >> 6 & 63] : '=';
        out[o++] = i + 2 < n ? t[v & 63] : '=';
    }
    out[o] = 0;
}

/* Sec-WebSocket-Accept for a key: base64(sha1(key + GUID)), 28 chars + NUL. */
static void ws_accept(const void *key, size_t n, char out[29]) {
    Sha1 s;
    uint8_t d[20];
    sha1_init(&s);
    sha1_update(&s, key, n);
    sha1_update(&s, GUID, sizeof GUID - 1);
    sha1_final(&s, d);
    base64(d, 20, out);
}

/* ------------------------------------------------- Python number formatting */

/* round(x, nd) as Python does it: correctly rounded, ties to even. */
static double py_round(double x, int nd) {
    char b[400];
    snprintf(b, sizeof b, "%.*f", nd, x);
    return strtod(b, NULL);
}

/* round(x) -> int, ties to even. */
static long long py_round_int(double x) {
    char b[400];
    snprintf(b, sizeof b, "%.0f", x);
    return strtoll(b, NULL, 10);
}

/* repr(float): the shortest string that round-trips, in Python's layout. */
static void py_repr(double x, char *out) {
    if (x != x) { strcpy(out, "NaN"); return; }
    if (x > 1.7976931348623157e308 || x < -1.7976931348623157e308) {
        strcpy(out, x > 0 ? "Infinity" : "-Infinity");
        return;
    }
    char e[40], dig[24];
    int p;
    for (p = 1; p <= 17; p++) {
        snprintf(e, sizeof e, "%.*e", p - 1, x);
        if (strtod(e, NULL) == x) break;
    }
    const char *s = e;
    if (*s == '-') *out++ = '-', s++;
    int nd = 0;
    for (; *s && *s != 'e'; s++)
        if (*s != '.') dig[nd++] = *s;
    while (nd > 1 && dig[nd - 1] == '0') nd--;
    dig[nd] = 0;
    int decpt = atoi(s + 1) + 1; /* digits are 0.DIG x 10^decpt */
    if (decpt <= -4 || decpt > 16) {
        int exp = decpt - 1;
        out += sprintf(out, "%c", dig[0]);
        if (nd > 1) out += sprintf(out, ".%s", dig + 1);
        sprintf(out, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    } else if (decpt <= 0) {
        out += sprintf(out, "0.");
        for (int i = 0; i < -decpt; i++) *out++ = '0';
        strcpy(out, dig);
    } else if (decpt >= nd) {
        out += sprintf(out, "%s", dig);
        for (int i = nd; i < decpt; i++) *out++ = '0';
        strcpy(out, ".0");
    } else {
        sprintf(out, "%.*s.%s", decpt, dig, dig + decpt);
    }
}

/* ------------------------------------------------------------ JSON on stdout */

static int jfirst[8], jdepth;

static void jraw_str(const char *s) {
    const uint8_t *p = (const uint8_t *)s;
    putchar('"');
    while (*p) {
        uint32_t c = *p, need = 0;
        if (c == '"' || c == '\\') printf("\\%c", c), p++;
        else if (c == '\n') fputs("\\n", stdout), p++;
        else if (c == '\r') fputs("\\r", stdout), p++;
        else if (c == '\t') fputs("\\t", stdout), p++;
        else if (c == '\b') fputs("\\b", stdout), p++;
        else if (c == '\f') fputs("\\f", stdout), p++;
        else if (c < 0x20) printf("\\u%04x", c), p++;
        else if (c < 0x80) putchar((int)c), p++;
        else { /* UTF-8 -> \uXXXX (ensure_ascii); bad bytes as surrogateescape */
            if ((c & 0xE0) == 0xC0) need = 1, c &= 0x1F;
            else if ((c & 0xF0) == 0xE0) need = 2, c &= 0x0F;
            else if ((c & 0xF8) == 0xF0) need = 3, c &= 0x07;
            uint32_t i = 1;
            for (; need && i <= need; i++) {
                if ((p[i] & 0xC0) != 0x80) break;
                c = c << 6 | (p[i] & 0x3F);
            }
            if (!need || i <= need) {
                printf("\\u%04x", 0xDC00 + *p), p++;
                continue;
            }
            p += need + 1;
            if (c >= 0x10000) {
                c -= 0x10000;
                printf("\\u%04x\\u%04x", 0xD800 + (c >> 10), 0xDC00 + (c & 0x3FF));
            } else {
                printf("\\u%04x", c);
            }
        }
    }
    putchar('"');
}

static void jsep(const char *key) {
    if (jdepth > 0 && !jfirst[jdepth]) fputs(", ", stdout);
    jfirst[jdepth] = 0;
    if (key) {
        jraw_str(key);
        fputs(": ", stdout);
    }
}
static void jbegin(const char *key, char c) {
    jsep(key);
    putchar(c);
    jfirst[++jdepth] = 1;
}
static void jend(char c) {
    putchar(c);
    jdepth--;
}
static void jint(const char *key, long long v) {
    jsep(key);
    printf("%lld", v);
}
static void jfloat(const char *key, double v) {
    char b[64];
    py_repr(v, b);
    jsep(key);
    fputs(b, stdout);
}
static void jnull(const char *key) {
    jsep(key);
    fputs("null", stdout);
}
static void jbool(const char *key, int v) {
    jsep(key);
    fputs(v ? "true" : "false", stdout);
}
static void jstr(const char *key, const char *v) {
    jsep(key);
    jraw_str(v);
}
static void jfloat_or_null(const char *key, int have, double v) {
    if (have) jfloat(key, v);
    else jnull(key);
}

/* --------------------------------------------------------------- arguments */

typedef struct {
    char *name;
    long long *pids;
    size_t npids;
    long long *set; /* expanded with children at the window start */
    size_t nset;
    long long cpu0, cpu1, rss1;
} Target;

static struct {
    const char *url;
    long long sessions;
    double rate;
    long long size;
    double warmup, duration, drain, ramp_rate;
    long long ramp_inflight;
    double connect_timeout, p50_limit, tick_us;
    const char *label;
    long long bot_port;
    const char **cpu_pid;
    size_t n_cpu_pid;
} A = {NULL, 200, 50.0, 320, 2.0, 10.0, 3.0, 250.0, 32, 10.0, 5.0, 0.0, "", 0, NULL, 0};

enum { T_HELP, T_INT, T_FLOAT, T_STR, T_APPEND };
typedef struct {
    const char *name, *metavar, *help;
    int type;
    void *dst;
} Opt;

static const Opt opts[] = {
    {"--help", NULL, "show this help message and exit", T_HELP, NULL},
    {"--url", "URL", "ws://127.0.0.1:PORT/path", T_STR, &A.url},
    {"--sessions", "SESSIONS", NULL, T_INT, &A.sessions},
    {"--rate", "RATE", "messages/s per session", T_FLOAT, &A.rate},
    {"--size", "SIZE", "binary message size (>= 16)", T_INT, &A.size},
    {"--warmup", "WARMUP", NULL, T_FLOAT, &A.warmup},
    {"--duration", "DURATION", "measure window, s", T_FLOAT, &A.duration},
    {"--drain", "DRAIN", "max wait for echoes after sending", T_FLOAT, &A.drain},
    {"--ramp-rate", "RAMP_RATE", "new sessions per second", T_FLOAT, &A.ramp_rate},
    {"--ramp-inflight", "RAMP_INFLIGHT", "concurrent handshakes", T_INT, &A.ramp_inflight},
    {"--connect-timeout", "CONNECT_TIMEOUT", NULL, T_FLOAT, &A.connect_timeout},
    {"--p50-limit", "P50_LIMIT", "keeps-up RTT p50 bound, ms", T_FLOAT, &A.p50_limit},
    {"--cpu-pid", "NAME=PID[,PID]", NULL, T_APPEND, NULL},
    {"--tick-us", "TICK_US",
     "0: event driven; >0: wake at most every T us and batch (cheaper, RTT +<=T)", T_FLOAT,
     &A.tick_us},
    {"--label", "LABEL", NULL, T_STR, &A.label},
    {"--bot-port", "BOT_PORT",
     "also be the upstream echo bot on 127.0.0.1:PORT (same process, same loop)", T_INT,
     &A.bot_port},
};
#define NOPTS (sizeof opts / sizeof opts[0])

static void usage(FILE *f) {
    char line[256];
    int indent = fprintf(f, "usage: %s ", prog), col = indent;
    for (size_t i = 0; i < NOPTS; i++) {
        const Opt *o = &opts[i];
        if (o->type == T_HELP) snprintf(line, sizeof line, "[-h]");
        else if (o->dst == &A.url) snprintf(line, sizeof line, "%s %s", o->name, o->metavar);
        else snprintf(line, sizeof line, "[%s %s]", o->name, o->metavar);
        int n = (int)strlen(line);
        if (col > indent && col + 1 + n > 79) col = fprintf(f, "\n%*s", indent, "") - 1;
        else if (col > indent) col += fprintf(f, " ");
        col += fprintf(f, "%s", line);
    }
    fprintf(f, "\n");
}

static void arg_error(const char *fmt, ...) {
    va_list ap;
    usage(stderr);
    fprintf(stderr, "%s: error: ", prog);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    exit(2);
}

static void help(void) {
    usage(stdout);
    printf("\nWebSocket load generator for `scripts/bench`: many sessions, paced binary echo "
           "traffic.\n(C port of bench/loadgen.py.)\n\noptions:\n");
    for (size_t i = 0; i < NOPTS; i++) {
        const Opt *o = &opts[i];
        if (o->type == T_HELP) printf("  -h, --help\n");
        else printf("  %s %s\n", o->name, o->metavar);
        if (o->help) printf("                        %s\n", o->help);
    }
    exit(0);
}

/* Python's int() / float() on a whole string (surrounding whitespace allowed). */
static int parse_int(const char *s, long long *v) {
    char *end;
    errno = 0;
    *v = strtoll(s, &end, 10);
    if (end == s || errno) return 0;
    while (is_ws((uint8_t)*end)) end++;
    return *end == 0;
}

static int parse_float(const char *s, double *v) {
    char *end;
    if (strpbrk(s, "xXpP")) return 0; /* no C99 hex floats: Python rejects them */
    *v = strtod(s, &end);
    if (end == s) return 0;
    while (is_ws((uint8_t)*end)) end++;
    return *end == 0;
}

/* argparse's idea of an option-looking string (not a negative number, no space). */
static int looks_like_option(const char *s) {
    if (s[0] != '-' || s[1] == 0 || strchr(s, ' ')) return 0;
    const char *p = s + 1;
    int digits = 0, dot = 0;
    for (; *p; p++) {
        if (*p >= '0' && *p <= '9') digits++;
        else if (*p == '.' && !dot) dot = 1;
        else return 1;
    }
    return !digits || (dot && p[-1] == '.');
}

static const Opt *find_opt(const char *name, size_t n) {
    const Opt *hit = NULL;
    int count = 0;
    for (size_t i = 0; i < NOPTS; i++)
        if (strlen(opts[i].name) == n && !strncmp(opts[i].name, name, n)) return &opts[i];
    for (size_t i = 0; i < NOPTS; i++)
        if (!strncmp(opts[i].name, name, n)) hit = &opts[i], count++;
    if (count > 1) {
        char list[512] = "";
        for (size_t i = 0; i < NOPTS; i++)
            if (!strncmp(opts[i].name, name, n)) {
                if (*list) strcat(list, ", ");
                strcat(list, opts[i].name);
            }
        arg_error("ambiguous option: %.*s could match %s", (int)n, name, list);
    }
    return hit;
}

static void set_opt(const Opt *o, const char *val) {
    switch (o->type) {
    case T_INT:
        if (!parse_int(val, (long long *)o->dst))
            arg_error("argument %s: invalid int value: '%s'", o->name, val);
        break;
    case T_FLOAT:
        if (!parse_float(val, (double *)o->dst))
            arg_error("argument %s: invalid float value: '%s'", o->name, val);
        break;
    case T_STR:
        *(const char **)o->dst = val;
        break;
    case T_APPEND:
        A.cpu_pid = xrealloc(A.cpu_pid, (A.n_cpu_pid + 1) * sizeof *A.cpu_pid);
        A.cpu_pid[A.n_cpu_pid++] = val;
        break;
    }
}

static void parse_args(int argc, char **argv) {
    char extras[1024] = "";
    int rest_positional = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!rest_positional && !strcmp(a, "--")) { rest_positional = 1; continue; }
        if (!rest_positional && !strcmp(a, "-h")) help();
        const Opt *o = NULL;
        const char *eq = NULL;
        if (!rest_positional && !strncmp(a, "--", 2)) {
            eq = strchr(a, '=');
            o = find_opt(a, eq ? (size_t)(eq - a) : strlen(a));
        }
        if (!o) {
            if (strlen(extras) + strlen(a) + 2 < sizeof extras) {
                if (*extras) strcat(extras, " ");
                strcat(extras, a);
            }
            continue;
        }
        if (o->type == T_HELP) help();
        if (eq) set_opt(o, eq + 1);
        else if (i + 1 < argc && !looks_like_option(argv[i + 1])) set_opt(o, argv[++i]);
        else arg_error("argument %s: expected one argument", o->name);
    }
    if (!A.url) arg_error("the following arguments are required: --url");
    if (*extras) arg_error("unrecognized arguments: %s", extras);
}

/* ----------------------------------------------------------------- the URL */

static char *host_port; /* "host:port" for the Host header */
static char *req_head;  /* "GET path HTTP/1.1 ... Sec-WebSocket-Key: " */
static struct sockaddr_in target_addr;

/* urlsplit(url) for ws://[user@]host[:port][/path][?query][#fragment]. */
static void parse_url(const char *url) {
    const char *colon = strchr(url, ':');
    size_t sl = colon ? (size_t)(colon - url) : 0;
    int ok_scheme = sl == 2 && !strncasecmp(url, "ws", 2);
    if (!ok_scheme) arg_error("only ws:// URLs");
    const char *p = colon + 1, *net = p, *net_end = p;
    if (!strncmp(p, "//", 2)) {
        net = p + 2;
        net_end = net + strcspn(net, "/?#");
    }
    const char *path = net_end, *path_end = path + strcspn(path, "?#");
    const char *query = NULL, *query_end = NULL;
    if (*path_end == '?') query = path_end + 1, query_end = query + strcspn(query, "#");

    const char *at = memrchr(net, '@', (size_t)(net_end - net));
    const char *h = at ? at + 1 : net, *h_end, *port_s = NULL;
    if (*h == '[') {
        h++;
        h_end = memchr(h, ']', (size_t)(net_end - h));
        if (!h_end) arg_error("invalid URL %s", url); /* Python: ValueError */
        if (h_end + 1 < net_end && h_end[1] == ':') port_s = h_end + 2;
    } else {
        h_end = memchr(h, ':', (size_t)(net_end - h));
        if (h_end) port_s = h_end + 1;
        else h_end = net_end;
    }
    char host[256] = "127.0.0.1";
    if (h_end > h) {
        size_t n = (size_t)(h_end - h) < sizeof host - 1 ? (size_t)(h_end - h) : sizeof host - 1;
        for (size_t i = 0; i < n; i++) host[i] = (char)(h[i] >= 'A' && h[i] <= 'Z' ? h[i] + 32 : h[i]);
        host[n] = 0;
    }
    long port = 80;
    if (port_s && port_s < net_end) {
        char tmp[16] = "";
        size_t n = (size_t)(net_end - port_s);
        char *end;
        if (n < sizeof tmp) memcpy(tmp, port_s, n);
        port = strtol(tmp, &end, 10);
        if (n >= sizeof tmp || *end || port < 0 || port > 65535 || tmp[0] < '0' || tmp[0] > '9')
            arg_error("invalid port in URL %s", url); /* Python: ValueError traceback */
        if (port == 0) port = 80;                      /* urlsplit's `u.port or 80` */
    }

    if (asprintf(&host_port, "%s:%ld", host, port) < 0) exit(1);
    int qlen = query ? (int)(query_end - query) : 0; /* (u.path or "/") + ("?" + query if query) */
    if (asprintf(&req_head,
                 "GET %.*s%s%s%.*s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: ",
                 (int)(path_end - path), path, path_end > path ? "" : "/", qlen ? "?" : "", qlen,
                 query ? query : "", host_port) < 0)
        exit(1);

    target_addr.sin_family = AF_INET;
    target_addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &target_addr.sin_addr) == 1) return;
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res;
    int rc = getaddrinfo(host, NULL, &hints, &res);
    if (rc) {
        fprintf(stderr, "%s: %s: %s\n", prog, host, gai_strerror(rc));
        exit(1); /* Python: socket.gaierror traceback */
    }
    target_addr.sin_addr = ((struct sockaddr_in *)res->ai_addr)->sin_addr;
    freeaddrinfo(res);
}

/* --cpu-pid NAME=PID[,PID]: later specs with the same name replace the pids. */
static Target *targets;
static size_t n_targets;

static void parse_cpu_pids(void) {
    targets = xrealloc(NULL, (A.n_cpu_pid + 1) * sizeof *targets);
    for (size_t i = 0; i < A.n_cpu_pid; i++) {
        const char *spec = A.cpu_pid[i], *eq = strchr(spec, '=');
        size_t nl = eq ? (size_t)(eq - spec) : strlen(spec);
        Target *t = NULL;
        for (size_t j = 0; j < n_targets; j++)
            if (strlen(targets[j].name) == nl && !strncmp(targets[j].name, spec, nl)) t = &targets[j];
        if (!t) {
            t = &targets[n_targets++];
            memset(t, 0, sizeof *t);
            t->name = strndup(spec, nl);
        }
        t->npids = 0;
        char *list = strdup(eq ? eq + 1 : ""), *save = NULL;
        for (char *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
            const uint8_t *q = (const uint8_t *)tok;
            size_t n = strlen(tok);
            strip(&q, &n);
            if (!n) continue;
            long long pid;
            if (!parse_int(tok, &pid)) arg_error("argument --cpu-pid: invalid pid '%s' in %s", tok, spec);
            t->pids = xrealloc(t->pids, (t->npids + 1) * sizeof *t->pids);
            t->pids[t->npids++] = pid;
        }
        free(list);
    }
}

/* ----------------------------------------------------------- /proc sampling */

static long clk_tck;

/* Reads a whole (small) file into b; 0 on failure. */
static int slurp(const char *path, Buf *b) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    buf_clear(b);
    for (;;) {
        buf_reserve(b, b->len + 4096 + 1);
        ssize_t k = read(fd, b->p + b->len, b->cap - b->len - 1);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) {
            close(fd);
            if (k < 0) return 0;
            b->p[b->len] = 0;
            return 1;
        }
        b->len += (size_t)k;
    }
}

/* utime + stime (fields 14, 15 of /proc/PID/stat) summed over pids, in ticks. */
static long long read_cpu_ticks(const long long *pids, size_t n) {
    static Buf b;
    long long total = 0;
    for (size_t i = 0; i < n; i++) {
        char path[64];
        snprintf(path, sizeof path, "/proc/%lld/stat", pids[i]);
        if (!slurp(path, &b)) continue;
        char *p = strrchr((char *)b.p, ')'), *save = NULL, *tok;
        if (!p) continue;
        long long ut = -1, st = -1;
        int f = 0;
        for (tok = strtok_r(p + 1, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save), f++) {
            if (f == 11 && !parse_int(tok, &ut)) break;
            if (f == 12) {
                if (!parse_int(tok, &st)) st = -1;
                break;
            }
        }
        if (ut >= 0 && st >= 0) total += ut + st;
    }
    return total;
}

/* Resident memory (VmRSS) of the processes, summed, in KiB. */
static long long read_rss_kib(const long long *pids, size_t n) {
    static Buf b;
    long long total = 0;
    for (size_t i = 0; i < n; i++) {
        char path[64];
        snprintf(path, sizeof path, "/proc/%lld/status", pids[i]);
        if (!slurp(path, &b)) continue;
        char *line = strstr((char *)b.p, "\nVmRSS:");
        long long kib;
        if (!line) continue;
        line += 7;
        char *end = line + strcspn(line, "\n"), save = *end;
        *end = 0;
        char *num = line + strspn(line, " \t");
        num[strcspn(num, " \t")] = 0;
        if (parse_int(num, &kib)) total += kib;
        *end = save;
    }
    return total;
}

/* The pids and all their descendants (via /proc/PID/task/TID/children), like expand_children. */
static void expand_children(Target *t) {
    static Buf b;
    size_t ntodo = t->npids, cap = t->npids + 16;
    long long *todo = xrealloc(NULL, cap * sizeof *todo);
    memcpy(todo, t->pids, t->npids * sizeof *todo);
    t->nset = 0;
    while (ntodo) {
        long long pid = todo[--ntodo];
        int seen = 0;
        for (size_t i = 0; i < t->nset; i++) seen |= t->set[i] == pid;
        if (seen) continue;
        t->set = xrealloc(t->set, (t->nset + 1) * sizeof *t->set);
        t->set[t->nset++] = pid;
        char path[96];
        snprintf(path, sizeof path, "/proc/%lld/task", pid);
        DIR *d = opendir(path);
        if (!d) continue;
        for (struct dirent *de; (de = readdir(d));) {
            if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
            snprintf(path, sizeof path, "/proc/%lld/task/%.20s/children", pid, de->d_name);
            if (!slurp(path, &b)) break;
            char *save = NULL;
            for (char *tok = strtok_r((char *)b.p, " \n", &save); tok; tok = strtok_r(NULL, " \n", &save)) {
                if (ntodo == cap) todo = xrealloc(todo, (cap *= 2) * sizeof *todo);
                todo[ntodo++] = strtoll(tok, NULL, 10);
            }
        }
        closedir(d);
    }
    free(todo);
}

typedef struct {
    char name[32];
    long long busy, total; /* busy excludes idle + iowait */
} CoreTimes;

/* Per "cpu*" line of /proc/stat; "cpu" is named "all". Returns the count. */
static size_t read_core_times(CoreTimes **out) {
    FILE *f = fopen("/proc/stat", "re");
    size_t n = 0, cap = 0;
    char *line = NULL;
    size_t lcap = 0;
    if (!f) return 0;
    while (getline(&line, &lcap, f) > 0 && !strncmp(line, "cpu", 3)) {
        char *save = NULL, *name = strtok_r(line, " \t\n", &save);
        long long v[8] = {0}, total = 0;
        for (int i = 0; i < 8; i++) {
            char *tok = strtok_r(NULL, " \t\n", &save);
            if (!tok) break;
            v[i] = strtoll(tok, NULL, 10);
            total += v[i];
        }
        if (n == cap) *out = xrealloc(*out, (cap = cap ? 2 * cap : 16) * sizeof **out);
        CoreTimes *c = &(*out)[n++];
        snprintf(c->name, sizeof c->name, "%s", strcmp(name, "cpu") ? name : "all");
        c->busy = total - v[3] - v[4];
        c->total = total;
    }
    free(line);
    fclose(f);
    return n;
}

/* ------------------------------------------------------------ epoll helpers */

static int ep = -1;
static Buf shared; /* the receive buffer every read goes through */

/* recv() up to `max` bytes after a connection's unparsed `pending` bytes. A big pending
 * tail is read onto in place (no copy; pending grows by what arrived); otherwise pending,
 * then the new bytes, land in `shared` (pending itself is left as it was). */
static ssize_t recv_after(int fd, Buf *pending, size_t max, int inplace) {
    size_t plen = buf_size(pending);
    uint8_t *dst;
    if (inplace) {
        dst = buf_tail(pending, max);
    } else {
        buf_reserve(&shared, plen + max);
        if (plen) memcpy(shared.p, buf_data(pending), plen);
        dst = shared.p + plen;
    }
    ssize_t n = recv(fd, dst, max, 0);
    if (n > 0 && inplace) pending->len += (size_t)n;
    return n;
}

static uint64_t tag(uint64_t kind, uint32_t idx) { return kind << 32 | idx; }

static void ep_ctl(int op, int fd, uint32_t events, uint64_t data) {
    struct epoll_event e = {.events = events, .data.u64 = data};
    epoll_ctl(ep, op, fd, &e);
}

/* --------------------------------------------------------- the echo bot side */

/* One connection to the bot (echo_bot.Conn). */
typedef struct {
    Buf pending; /* unparsed bytes (partial header / partial frame) */
    Buf out;     /* unsent bytes (only when the kernel buffer was full) */
    int fd, ws, closing;
} Conn;

static int bot_lfd = -1;
static Conn **conns; /* indexed by fd */
static size_t conns_cap;
static Buf bot_obuf; /* echo frames of one read, assembled */

static void bot_drop(Conn *c) {
    conns[c->fd] = NULL;
    close(c->fd);
    buf_free(&c->pending);
    buf_free(&c->out);
    free(c);
}

/* echo_bot.EchoServer.write; returns 0 if the connection was dropped. */
static int bot_write(Conn *c, const uint8_t *d, size_t n) {
    if (buf_size(&c->out)) {
        buf_append(&c->out, d, n);
        return 1;
    }
    ssize_t k = send(c->fd, d, n, MSG_NOSIGNAL);
    if (k < 0) {
        if (!again(errno)) {
            bot_drop(c);
            return 0;
        }
        k = 0;
    }
    if ((size_t)k < n) {
        buf_append(&c->out, d + k, n - (size_t)k);
        ep_ctl(EPOLL_CTL_MOD, c->fd, EPOLLIN | EPOLLOUT, tag(TAG_CONN, (uint32_t)c->fd));
    } else if (c->closing) {
        bot_drop(c);
        return 0;
    }
    return 1;
}

static int bot_flush(Conn *c) {
    if (buf_size(&c->out)) {
        ssize_t k = send(c->fd, buf_data(&c->out), buf_size(&c->out), MSG_NOSIGNAL);
        if (k < 0) {
            if (again(errno)) return 1;
            bot_drop(c);
            return 0;
        }
        buf_consume(&c->out, (size_t)k);
    }
    if (!buf_size(&c->out)) {
        if (c->closing) {
            bot_drop(c);
            return 0;
        }
        ep_ctl(EPOLL_CTL_MOD, c->fd, EPOLLIN, tag(TAG_CONN, (uint32_t)c->fd));
    }
    return 1;
}

/* The upgrade request: -1 dropped, 0 incomplete, 1 answered (*rest = bytes consumed). */
static int bot_handshake(Conn *c, const uint8_t *d, size_t L, size_t *rest) {
    const uint8_t *end = memmem(d, L, "\r\n\r\n", 4);
    if (!end) {
        if (L > BOT_MAX_HEADER) {
            static const char r431[] = "HTTP/1.1 431 Too Large\r\nContent-Length: 0\r\n\r\n";
            if (send(c->fd, r431, sizeof r431 - 1, MSG_NOSIGNAL) < 0) { /* as Python: best effort */ }
            bot_drop(c);
            return -1;
        }
        return 0;
    }
    const uint8_t *key = NULL, *line = memmem(d, (size_t)(end - d), "\r\n", 2);
    size_t keylen = 0;
    while (line && line < end) {
        line += 2;
        const uint8_t *eol = memmem(line, (size_t)(end + 2 - line), "\r\n", 2);
        const uint8_t *colon = memchr(line, ':', (size_t)(eol - line)), *name = line, *val;
        size_t nn = colon ? (size_t)(colon - line) : (size_t)(eol - line), vn;
        val = colon ? colon + 1 : eol;
        vn = (size_t)(eol - val);
        strip(&name, &nn);
        strip(&val, &vn);
        if (nn == 17 && !strncasecmp((const char *)name, "sec-websocket-key", 17)) key = val, keylen = vn;
        line = eol;
    }
    if (!keylen) {
        static const char r400[] = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
        if (send(c->fd, r400, sizeof r400 - 1, MSG_NOSIGNAL) < 0) { /* best effort */ }
        bot_drop(c);
        return -1;
    }
    char resp[160], acc[29];
    ws_accept(key, keylen, acc);
    int n = snprintf(resp, sizeof resp,
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Accept: %s\r\n\r\n",
                     acc);
    if (!bot_write(c, (const uint8_t *)resp, (size_t)n)) return -1;
    c->ws = 1;
    *rest = (size_t)(end + 4 - d);
    return 1;
}

static size_t server_header(uint8_t *o, uint8_t b0, uint64_t n) {
    o[0] = b0;
    if (n < 126) return o[1] = (uint8_t)n, 2;
    if (n < 65536) return o[1] = 126, o[2] = (uint8_t)(n >> 8), o[3] = (uint8_t)n, 4;
    o[1] = 127;
    for (int i = 0; i < 8; i++) o[2 + i] = (uint8_t)(n >> (56 - 8 * i));
    return 10;
}

static void unmask_copy(uint8_t *dst, const uint8_t *src, size_t n, const uint8_t m[4]) {
    uint8_t m8b[8] = {m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]};
    uint64_t m8, v;
    size_t i = 0;
    memcpy(&m8, m8b, 8);
    for (; i + 8 <= n; i += 8) {
        memcpy(&v, src + i, 8);
        v ^= m8;
        memcpy(dst + i, &v, 8);
    }
    for (; i < n; i++) dst[i] = src[i] ^ m[i & 3];
}

/* Keeps d[pos, L) as the pending bytes; `inplace`: d is c->pending's own data. */
static void bot_keep(Conn *c, const uint8_t *d, size_t L, size_t pos, int inplace) {
    if (inplace) {
        buf_consume(&c->pending, pos);
        return;
    }
    buf_clear(&c->pending);
    buf_append(&c->pending, d + pos, L - pos);
}

typedef struct {
    uint8_t b0, b1, mask[4];
    uint64_t n; /* payload length */
    size_t h;   /* where the payload starts, after the masking key if there is one */
} FrameHead;

/* The frame at d[pos..L): 1 when its header and its whole payload are there, else 0. */
static int frame_at(const uint8_t *d, size_t L, size_t pos, FrameHead *f) {
    if (L - pos < 2) return 0;
    f->b0 = d[pos], f->b1 = d[pos + 1], f->n = f->b1 & 0x7F, f->h = pos + 2;
    if (f->n == 126) {
        if (L - f->h < 2) return 0;
        f->n = get_be(d + f->h, 2), f->h += 2;
    } else if (f->n == 127) {
        if (L - f->h < 8) return 0;
        f->n = get_be(d + f->h, 8), f->h += 8;
    }
    if (f->b1 & 0x80) {
        if (L - f->h < 4) return 0;
        memcpy(f->mask, d + f->h, 4), f->h += 4;
    }
    return f->n <= L - f->h;
}

/* Echo every complete frame in d; keep the partial tail in c->pending. 0 if dropped. */
static int bot_frames(Conn *c, const uint8_t *d, size_t L, int inplace) {
    size_t pos = 0;
    FrameHead f;
    buf_clear(&bot_obuf);
    while (frame_at(d, L, pos, &f)) {
        uint8_t b0 = f.b0, *mask = f.mask;
        uint64_t n = f.n;
        size_t h = f.h;
        int masked = f.b1 & 0x80;
        size_t end = h + (size_t)n, op = b0 & 0x0F;
        if (op != 10) { /* pong: ignore; ping -> pong; close -> close; rest: same first byte */
            uint8_t b = op == 9 ? 0x8A : op == 8 ? 0x88 : b0;
            buf_reserve(&bot_obuf, bot_obuf.len + 10 + (size_t)n);
            bot_obuf.len += server_header(bot_obuf.p + bot_obuf.len, b, n);
            if (masked) unmask_copy(bot_obuf.p + bot_obuf.len, d + h, (size_t)n, mask);
            else memcpy(bot_obuf.p + bot_obuf.len, d + h, (size_t)n);
            bot_obuf.len += (size_t)n;
        }
        pos = end;
        if (op == 8) {
            c->closing = 1;
            break;
        }
    }
    bot_keep(c, d, L, c->closing ? L : pos, inplace);
    if (bot_obuf.len) return bot_write(c, bot_obuf.p, bot_obuf.len);
    if (c->closing && !buf_size(&c->out)) {
        bot_drop(c);
        return 0;
    }
    return 1;
}

static void bot_accept_all(void) {
    for (;;) {
        int fd = accept4(bot_lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE)
                fprintf(stderr, "echo_bot: accept: [Errno %d] %s\n", errno, strerror(errno));
            return;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if ((size_t)fd >= conns_cap) {
            size_t n = conns_cap ? conns_cap : 1024;
            while (n <= (size_t)fd) n *= 2;
            conns = xrealloc(conns, n * sizeof *conns);
            memset(conns + conns_cap, 0, (n - conns_cap) * sizeof *conns);
            conns_cap = n;
        }
        Conn *c = xrealloc(NULL, sizeof *c);
        memset(c, 0, sizeof *c);
        c->fd = fd;
        conns[fd] = c;
        ep_ctl(EPOLL_CTL_ADD, fd, EPOLLIN, tag(TAG_CONN, (uint32_t)fd));
    }
}

/* One epoll event for the bot (EchoServer.handle). */
static void bot_handle(uint64_t t, uint32_t ev) {
    if (t >> 32 == TAG_LISTEN) {
        bot_accept_all();
        return;
    }
    uint32_t fd = (uint32_t)t;
    Conn *c = fd < conns_cap ? conns[fd] : NULL;
    if (!c) return;
    if ((ev & EPOLLOUT) && !bot_flush(c)) return;
    if (!(ev & (EPOLLIN | EPOLLERRS))) return;
    size_t plen = buf_size(&c->pending), rest = 0;
    int inplace = plen >= BIG_PENDING && c->ws && !c->closing;
    ssize_t n = recv_after(c->fd, &c->pending, BOT_RECV, inplace);
    if (n < 0 && again(errno)) return;
    if (n <= 0) {
        bot_drop(c);
        return;
    }
    if (c->closing) return; /* ignore anything after the close frame */
    if (inplace) {
        bot_frames(c, buf_data(&c->pending), buf_size(&c->pending), 1);
        return;
    }
    const uint8_t *d = shared.p;
    size_t L = plen + (size_t)n;
    if (!c->ws) {
        int r = bot_handshake(c, d, L, &rest);
        if (r < 0) return;
        if (r == 0) {
            bot_keep(c, d, L, 0, 0);
            return;
        }
        buf_clear(&c->pending);
        d += rest, L -= rest;
        if (!L) return;
    }
    bot_frames(c, d, L, 0);
}

static void bot_listen(long long port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    int one = 1, fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (port < 0 || port > 65535) {
        fprintf(stderr, "%s: --bot-port %lld: port must be 0-65535\n", prog, port);
        exit(1);
    }
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 4096) < 0) {
        fprintf(stderr, "%s: --bot-port %lld: [Errno %d] %s\n", prog, port, errno, strerror(errno));
        exit(1);
    }
    bot_lfd = fd;
    ep_ctl(EPOLL_CTL_ADD, fd, EPOLLIN, tag(TAG_LISTEN, 0));
}

static void bot_close(void) {
    for (size_t fd = 0; fd < conns_cap; fd++)
        if (conns[fd]) bot_drop(conns[fd]);
    if (bot_lfd >= 0) close(bot_lfd);
}

/* ------------------------------------------------------------- the sessions */

typedef struct {
    Buf rbuf;       /* handshake bytes, then the partial frame of the last read */
    Buf wbuf;       /* unsent bytes (only when the kernel buffer was full) */
    uint8_t *frame; /* the next message: header + masked prefix + masked filler */
    int64_t t_start;
    uint64_t expect, reorder;
    uint32_t sid, seq;
    int fd, state, close_seen;
    uint8_t mask[4];
    char accept[29];
} Session;

static Session *S;
static long long N;          /* --sessions (as given, may be <= 0) */
static size_t n_sess;        /* sessions allocated */
static size_t hdr_len, frame_len;
static uint8_t *filler_plain;
static size_t filler_len;
static long long n_fds; /* sessions holding a socket (loadgen.py's fd2s) */
static int64_t t_ws, t_we;   /* measure window, ns */
static long long polls[2];   /* epoll_wait calls, events returned */

static struct {
    long long sent, recv, sent_win, recv_win, corrupt, backlogged, pongs, closed_during_run;
} st;

typedef struct {
    char *kind;
    long long n;
} ErrCount;
static ErrCount *errs;
static size_t n_errs;

static int64_t *rtts;
static size_t n_rtts, cap_rtts;

static void note_error(const char *kind) {
    for (size_t i = 0; i < n_errs; i++)
        if (!strcmp(errs[i].kind, kind)) {
            errs[i].n++;
            return;
        }
    errs = xrealloc(errs, (n_errs + 1) * sizeof *errs);
    errs[n_errs].kind = strdup(kind);
    errs[n_errs++].n = 1;
}

static void rtt_push(int64_t v) {
    if (n_rtts == cap_rtts) {
        cap_rtts = cap_rtts ? 2 * cap_rtts : 65536;
        rtts = xrealloc(rtts, cap_rtts * sizeof *rtts);
    }
    rtts[n_rtts++] = v;
}

static void kill_session(Session *s, int state) {
    if (s->fd >= 0) {
        close(s->fd); /* also leaves the epoll set */
        s->fd = -1;
        n_fds--;
    }
    s->state = state;
}

static void fail(Session *s, const char *kind) {
    note_error(kind);
    kill_session(s, FAILED);
}

static void fail_errno(Session *s, const char *what, int e) {
    char kind[64], tmp[16];
    snprintf(kind, sizeof kind, "%s:%s", what, errname(e, tmp, sizeof tmp));
    fail(s, kind);
}

static void init_sessions(void) {
    n_sess = N > 0 ? (size_t)N : 0;
    size_t size = (size_t)A.size;
    filler_len = size - 16;
    filler_plain = xrealloc(NULL, filler_len);
    for (size_t i = 0; i < filler_len; i++) filler_plain[i] = (uint8_t)((i * 7 + 3) & 0xFF);
    hdr_len = size < 126 ? 6 : size < 65536 ? 8 : 14;
    frame_len = hdr_len + size;
    S = xrealloc(NULL, (n_sess ? n_sess : 1) * sizeof *S);
    memset(S, 0, (n_sess ? n_sess : 1) * sizeof *S);
    uint8_t *frames = xrealloc(NULL, n_sess * frame_len), *masks = xrealloc(NULL, 4 * n_sess + 1);
    fill_random(masks, 4 * n_sess);
    for (size_t i = 0; i < n_sess; i++) {
        Session *s = &S[i];
        uint8_t *f = s->frame = frames + i * frame_len;
        s->sid = (uint32_t)i;
        s->fd = -1;
        s->state = CONNECTING;
        memcpy(s->mask, masks + 4 * i, 4);
        size_t h = server_header(f, 0x82, size);
        f[1] |= 0x80;
        memcpy(f + h, s->mask, 4);
        /* The filler starts at payload offset 16, a multiple of 4: mask phase 0. */
        for (size_t j = 0; j < filler_len; j++) f[hdr_len + 16 + j] = filler_plain[j] ^ s->mask[j & 3];
    }
    free(masks);
}

/* Masks (sid, seq, ts) into the session's frame template. */
static void put_prefix(Session *s, uint32_t seq, int64_t ts) {
    uint8_t plain[16], *p = s->frame + hdr_len;
    put_le32(plain, s->sid);
    put_le32(plain + 4, seq);
    put_le64(plain + 8, (uint64_t)ts);
    for (int i = 0; i < 16; i++) p[i] = plain[i] ^ s->mask[i & 3];
}

/* loadgen.py's send(): buffer behind unsent bytes, else send what the kernel takes. */
static int session_send(Session *s, const uint8_t *frame, size_t n) {
    if (s->fd < 0) return 0;
    if (buf_size(&s->wbuf)) {
        buf_append(&s->wbuf, frame, n);
        st.backlogged++;
        return 1;
    }
    ssize_t k = send(s->fd, frame, n, MSG_NOSIGNAL);
    if (k < 0) {
        if (!again(errno)) {
            kill_session(s, FAILED);
            note_error("send-failed");
            return 0;
        }
        k = 0;
    }
    if ((size_t)k < n) {
        buf_append(&s->wbuf, frame + k, n - (size_t)k);
        ep_ctl(EPOLL_CTL_MOD, s->fd, EPOLLIN | EPOLLOUT, tag(TAG_SESSION, s->sid));
    }
    return 1;
}

static void on_write(Session *s) {
    ssize_t k = send(s->fd, buf_data(&s->wbuf), buf_size(&s->wbuf), MSG_NOSIGNAL);
    if (k < 0) {
        if (again(errno)) return;
        kill_session(s, FAILED);
        note_error("send-failed");
        return;
    }
    buf_consume(&s->wbuf, (size_t)k);
    if (!buf_size(&s->wbuf)) ep_ctl(EPOLL_CTL_MOD, s->fd, EPOLLIN, tag(TAG_SESSION, s->sid));
}

/* ---- ramp: connect, upgrade */

static void start_connect(Session *s) {
    int one = 1, fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    s->t_start = mono();
    if (fd < 0) { /* loadgen.py would raise here (e.g. EMFILE) */
        fail_errno(s, "socket", errno);
        return;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    s->fd = fd;
    n_fds++;
    if (connect(fd, (struct sockaddr *)&target_addr, sizeof target_addr) < 0 && errno != EINPROGRESS) {
        fail_errno(s, "connect", errno);
        return;
    }
    ep_ctl(EPOLL_CTL_ADD, fd, EPOLLOUT | EPOLLIN, tag(TAG_SESSION, s->sid));
}

static void on_connected(Session *s) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        fail_errno(s, "connect", err);
        return;
    }
    uint8_t raw[16];
    char key[25];
    static Buf req;
    static const char tail[] = "\r\nSec-WebSocket-Version: 13\r\nUser-Agent: relay-bench-loadgen\r\n\r\n";
    fill_random(raw, sizeof raw);
    base64(raw, sizeof raw, key);
    ws_accept(key, 24, s->accept);
    buf_clear(&req);
    buf_append(&req, req_head, strlen(req_head));
    buf_append(&req, key, 24);
    buf_append(&req, tail, sizeof tail - 1);
    if (send(s->fd, req.p, req.len, MSG_NOSIGNAL) < 0) { /* small: fits the empty send buffer */
        fail_errno(s, "send", errno);
        return;
    }
    s->state = HANDSHAKE;
    ep_ctl(EPOLL_CTL_MOD, s->fd, EPOLLIN, tag(TAG_SESSION, s->sid));
}

/* Checks the upgrade response head; on failure writes the error kind. */
static int check_upgrade(const Session *s, const uint8_t *d, size_t n, char *kind, size_t kcap) {
    const uint8_t *eol = memmem(d, n, "\r\n", 2), *end = d + n;
    if (!eol) eol = end;
    const uint8_t *sp = memchr(d, ' ', (size_t)(eol - d));
    if (!sp) {
        snprintf(kind, kcap, "http-?");
        return 0;
    }
    const uint8_t *code = sp + 1, *code_end = memchr(code, ' ', (size_t)(eol - code));
    if (!code_end) code_end = eol;
    if (code_end - code != 3 || memcmp(code, "101", 3)) {
        snprintf(kind, kcap, "http-%.*s", (int)(code_end - code), (const char *)code);
        return 0;
    }
    for (const uint8_t *line = eol; line < end;) {
        line += 2;
        const uint8_t *le = memmem(line, (size_t)(end - line), "\r\n", 2);
        if (!le) le = end;
        const uint8_t *colon = memchr(line, ':', (size_t)(le - line)), *name = line, *val;
        size_t nn = colon ? (size_t)(colon - line) : (size_t)(le - line), vn;
        val = colon ? colon + 1 : le;
        vn = (size_t)(le - val);
        strip(&name, &nn);
        strip(&val, &vn);
        if (nn == 20 && !strncasecmp((const char *)name, "sec-websocket-accept", 20) && vn == 28 &&
            !memcmp(val, s->accept, 28))
            return 1;
        line = le;
    }
    snprintf(kind, kcap, "bad-accept");
    return 0;
}

static void on_handshake_data(Session *s) {
    ssize_t r = recv(s->fd, shared.p, HANDSHAKE_RECV, 0);
    if (r < 0) {
        if (!again(errno)) fail_errno(s, "recv", errno);
        return;
    }
    if (r == 0) {
        fail(s, "eof-during-handshake");
        return;
    }
    buf_append(&s->rbuf, shared.p, (size_t)r);
    const uint8_t *d = buf_data(&s->rbuf), *end = memmem(d, buf_size(&s->rbuf), "\r\n\r\n", 4);
    if (!end) {
        if (buf_size(&s->rbuf) > HANDSHAKE_RECV) fail(s, "handshake-too-long");
        return;
    }
    char kind[256];
    if (!check_upgrade(s, d, (size_t)(end - d), kind, sizeof kind)) {
        fail(s, kind);
        return;
    }
    buf_consume(&s->rbuf, (size_t)(end + 4 - d)); /* frames already sent stay in rbuf */
    s->state = OPEN;
}

/* Open, no traffic yet: readable means EOF or an unexpected frame. */
static void on_open_before_traffic(Session *s) {
    ssize_t r = recv(s->fd, shared.p, HANDSHAKE_RECV, 0);
    if (r < 0 && again(errno)) return;
    if (r <= 0) fail(s, "closed-before-traffic");
    else buf_append(&s->rbuf, shared.p, (size_t)r);
}

static void ramp_event(uint64_t t, uint32_t ev) {
    if (t >> 32 != TAG_SESSION) {
        if (bot_lfd >= 0) bot_handle(t, ev);
        return;
    }
    Session *s = &S[(uint32_t)t];
    if (s->fd < 0) return;
    if (s->state == CONNECTING) {
        if (ev & (EPOLLOUT | EPOLLERRS)) on_connected(s);
    } else if (s->state == HANDSHAKE) {
        on_handshake_data(s);
    } else if (s->state == OPEN) {
        on_open_before_traffic(s);
    }
}

/* Opens the sessions; returns the ramp's duration in s. */
static double ramp(void) {
    static struct epoll_event evs[MAX_EVENTS];
    int64_t t0 = mono(), deadline = (int64_t)(A.connect_timeout * 1e9);
    double interval = A.ramp_rate > 0 ? 1e9 / A.ramp_rate : 0;
    size_t next = 0;
    for (;;) {
        int64_t now = mono();
        long long inflight = 0;
        for (size_t i = 0; i < next; i++) {
            Session *s = &S[i];
            if (s->state != CONNECTING && s->state != HANDSHAKE) continue;
            if (now - s->t_start > deadline) fail(s, "handshake-timeout");
            else inflight++;
        }
        long long allowed = interval ? (long long)((double)(now - t0) / interval) + 1 : (long long)n_sess;
        size_t limit = allowed < (long long)n_sess ? (size_t)(allowed > 0 ? allowed : 0) : n_sess;
        while (next < limit && inflight < A.ramp_inflight) start_connect(&S[next++]), inflight++;
        if (next >= n_sess && inflight <= 0) break;
        int n = epoll_wait(ep, evs, MAX_EVENTS, 5);
        for (int i = 0; i < n; i++) ramp_event(evs[i].data.u64, evs[i].events);
    }
    return (double)(mono() - t0) / 1e9;
}

/* ---- traffic: echoes */

static void on_echo(Session *s, const uint8_t *p, uint64_t n, int64_t now) {
    uint32_t sid = get_le32(p), seq = get_le32(p + 4);
    int64_t ts = (int64_t)get_le64(p + 8);
    if (sid != s->sid || n - 16 != filler_len || memcmp(p + 16, filler_plain, filler_len)) {
        st.corrupt++;
        return;
    }
    st.recv++;
    if (seq >= s->expect) s->expect = (uint64_t)seq + 1; /* a jump is loss unless the gap arrives later */
    else s->reorder++;
    if (t_ws <= ts && ts < t_we) rtt_push(now - ts);
    if (t_ws <= now && now < t_we) st.recv_win++;
}

/* Answers a ping (e.g. from an intermediary) with a masked pong (zero key). */
static void answer_ping(Session *s, const uint8_t *p, uint64_t n) {
    static Buf pong;
    uint8_t h[14];
    size_t hl = server_header(h, 0x8A, n);
    h[1] |= 0x80;
    memset(h + hl, 0, 4);
    buf_clear(&pong);
    buf_append(&pong, h, hl + 4);
    buf_append(&pong, p, (size_t)n);
    session_send(s, pong.p, pong.len);
}

/* Walks the frames in d; returns the offset of the first incomplete one. */
static size_t parse_echoes(Session *s, const uint8_t *d, size_t L, int64_t now) {
    size_t pos = 0;
    FrameHead f;
    while (frame_at(d, L, pos, &f)) {
        uint8_t b0 = f.b0;
        uint64_t n = f.n;
        size_t h = f.h;
        if (f.b1 & 0x80) note_error("masked-server-frame"); /* a protocol error: key skipped */
        int op = b0 & 0x0F;
        if (op == 2 && n >= 16) on_echo(s, d + h, n, now);
        else if (op == 8) s->close_seen = 1;
        else if (op == 10) st.pongs++;
        else if (op == 9) answer_ping(s, d + h, n);
        else st.corrupt++;
        pos = h + (size_t)n;
    }
    return pos;
}

static void on_read(Session *s, int64_t now) {
    size_t plen = buf_size(&s->rbuf);
    int inplace = plen >= BIG_PENDING;
    ssize_t r = recv_after(s->fd, &s->rbuf, SESSION_RECV, inplace);
    if (r < 0 && again(errno)) return;
    if (r <= 0) {
        if (s->state == OPEN) {
            st.closed_during_run++;
            note_error("closed-during-run");
        }
        kill_session(s, s->close_seen ? DONE : FAILED);
        return;
    }
    if (inplace) {
        buf_consume(&s->rbuf, parse_echoes(s, buf_data(&s->rbuf), buf_size(&s->rbuf), now));
    } else {
        size_t L = plen + (size_t)r, pos = parse_echoes(s, shared.p, L, now);
        buf_clear(&s->rbuf);
        if (pos < L) buf_append(&s->rbuf, shared.p + pos, L - pos);
    }
    if (s->close_seen && s->state == CLOSING) kill_session(s, DONE);
}

static void pump(int timeout_ms) {
    static struct epoll_event evs[MAX_EVENTS];
    int n = epoll_wait(ep, evs, MAX_EVENTS, timeout_ms);
    if (n < 0) return;
    polls[0]++;
    if (!n) return;
    polls[1] += n;
    int64_t now = mono();
    for (int i = 0; i < n; i++) {
        uint64_t t = evs[i].data.u64;
        uint32_t ev = evs[i].events;
        if (t >> 32 != TAG_SESSION) {
            if (bot_lfd >= 0) bot_handle(t, ev);
            continue;
        }
        Session *s = &S[(uint32_t)t];
        if (s->fd < 0) continue;
        if ((ev & EPOLLOUT) && buf_size(&s->wbuf)) {
            on_write(s);
            if (s->fd < 0) continue;
        }
        if (ev & (EPOLLIN | EPOLLERRS)) on_read(s, now);
    }
}

/* Python's epoll.poll(seconds): rounded up to whole ms. */
static int timeout_ms(double secs) {
    if (secs <= 0) return 0;
    double ns = secs * 1e9;
    long long ins = (long long)ns;
    if ((double)ins < ns) ins++;
    long long ms = (ins + 999999) / 1000000;
    return ms > INT_MAX ? INT_MAX : (int)ms;
}

/* ---- traffic: pacing and the measure window */

static uint32_t *live;
static size_t n_live;
static double max_lag_ns;
static long long big_lags;
static int have_ru;
static struct rusage ru0, ru1;
static CoreTimes *core0, *core1;
static size_t n_core0, n_core1;
static int64_t win_t0, win_t1;
static long long polls_win[2];
static int in_window;

static void window_start(void) {
    for (size_t i = 0; i < n_targets; i++) {
        expand_children(&targets[i]);
        targets[i].cpu0 = read_cpu_ticks(targets[i].set, targets[i].nset);
    }
    getrusage(RUSAGE_SELF, &ru0);
    n_core0 = read_core_times(&core0);
    polls[0] = polls[1] = 0;
    win_t0 = mono();
}

static void window_end(void) {
    for (size_t i = 0; i < n_targets; i++) {
        targets[i].cpu1 = read_cpu_ticks(targets[i].set, targets[i].nset);
        targets[i].rss1 = read_rss_kib(targets[i].set, targets[i].nset);
    }
    getrusage(RUSAGE_SELF, &ru1);
    have_ru = 1;
    n_core1 = read_core_times(&core1);
    polls_win[0] = polls[0], polls_win[1] = polls[1];
}

/* Sends slot j's message (session j mod n_live), due at t0 + j * slot_ns. */
static void send_slot(long long j, int64_t t0, double slot_ns, double period_ns) {
    Session *s = &S[live[(size_t)j % n_live]];
    if (s->state != OPEN) return;
    int64_t ts = mono();
    double lag = (double)ts - ((double)t0 + (double)j * slot_ns);
    int in_win = t_ws <= ts && ts < t_we;
    if (in_win) {
        if (lag > max_lag_ns) max_lag_ns = lag;
        if (lag > period_ns) big_lags++;
    }
    put_prefix(s, s->seq++, ts);
    if (session_send(s, s->frame, frame_len)) {
        st.sent++;
        if (in_win) st.sent_win++;
    }
}

static void tick_wait(int64_t tick_ns, int64_t *next_tick) {
    int64_t now = mono();
    if (*next_tick > now) {
        int64_t d = *next_tick - now;
        struct timespec ts = {(time_t)(d / 1000000000), (long)(d % 1000000000)};
        nanosleep(&ts, NULL);
        *next_tick += tick_ns;
    } else {
        *next_tick = now + tick_ns;
    }
}

static void pace(void) {
    double period_ns = 1e9 / A.rate, slot_ns = period_ns / (double)n_live;
    int64_t t0 = mono() + 1000000, tick_ns = (int64_t)(A.tick_us * 1000), next_tick = 0;
    t_ws = t0 + (int64_t)(A.warmup * 1e9);
    t_we = t_ws + (int64_t)(A.duration * 1e9);
    long long end_slot = (long long)((double)(t_we - t0) / slot_ns), k = 0;
    size_t reserve = (size_t)((double)n_live * A.rate * (A.duration > 0 ? A.duration : 0)) + 1024;
    if (reserve > ((size_t)1 << 24)) reserve = (size_t)1 << 24;
    rtts = xrealloc(rtts, (cap_rtts = reserve) * sizeof *rtts);
    while (k < end_slot) {
        int64_t now = mono();
        if (!in_window && now >= t_ws) {
            in_window = 1;
            window_start();
        }
        long long due = (long long)((double)(now - t0) / slot_ns) + 1;
        if (due > end_slot) due = end_slot;
        if (due > k) {
            long long stop = due < k + (long long)n_live ? due : k + (long long)n_live;
            /* never burst more than one period at once when late */
            for (long long j = k; j < stop; j++) send_slot(j, t0, slot_ns, period_ns);
            k = stop;
            if (k < due) {
                pump(0);
                continue;
            }
        }
        double wait = ((double)t0 + (double)k * slot_ns - (double)mono()) / 1e9;
        if (tick_ns) {
            tick_wait(tick_ns, &next_tick);
            pump(0);
        } else {
            pump(timeout_ms(wait));
        }
    }
    win_t1 = mono();
    if (in_window) window_end();
}

static double drain(void) {
    int64_t t0 = mono(), limit = (int64_t)(A.drain * 1e9);
    while (st.recv + st.corrupt < st.sent && mono() - t0 < limit) {
        pump(10);
        if (!n_fds) break;
    }
    return (double)(mono() - t0) / 1e9;
}

static void close_all(void) {
    static const uint8_t close_frame[8] = {0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8}; /* 1000 */
    for (size_t i = 0; i < n_live; i++) {
        Session *s = &S[live[i]];
        if (s->state != OPEN) continue;
        s->state = CLOSING;
        session_send(s, close_frame, sizeof close_frame);
    }
    int64_t t0 = mono();
    while (n_fds && mono() - t0 < 2000000000) pump(20);
}

/* ------------------------------------------------------------------ report */

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* pct() of loadgen.py: index round(q * (n - 1)) (ties to even), in ms. */
static double pct(double q) {
    double x = q * (double)(n_rtts - 1);
    long long i = (long long)x;
    double frac = x - (double)i;
    if (frac > 0.5 || (frac == 0.5 && (i & 1))) i++;
    if (i > (long long)n_rtts - 1) i = (long long)n_rtts - 1;
    if (i < 0) i = 0;
    return (double)rtts[i] / 1e6;
}

static double tv_s(struct timeval tv) { return (double)tv.tv_sec + (double)tv.tv_usec * 1e-6; }

static void report_loadgen(double window_s) {
    jbegin("loadgen", '{');
    if (have_ru && window_s) {
        double ut = tv_s(ru1.ru_utime) - tv_s(ru0.ru_utime), stt = tv_s(ru1.ru_stime) - tv_s(ru0.ru_stime);
        long long ctx = (ru1.ru_nvcsw - ru0.ru_nvcsw) + (ru1.ru_nivcsw - ru0.ru_nivcsw);
        jfloat("user_pct", py_round(100 * ut / window_s, 1));
        jfloat("sys_pct", py_round(100 * stt / window_s, 1));
        jint("ctx_switches_per_s", py_round_int((double)ctx / window_s));
        jint("polls_per_s", py_round_int((double)polls_win[0] / window_s));
        if (polls_win[0]) jfloat("events_per_poll", py_round((double)polls_win[1] / (double)polls_win[0], 2));
        else jint("events_per_poll", 0);
    }
    jend('}');
}

static void report_cpu(double window_s, long long msgs_both) {
    jbegin("cpu", '{');
    for (size_t i = 0; i < n_targets; i++) {
        Target *t = &targets[i];
        double secs = (double)(t->cpu1 - t->cpu0) / (double)clk_tck;
        jbegin(t->name, '{');
        jbegin("pids", '[');
        for (size_t j = 0; in_window && j < t->nset; j++) jint(NULL, t->set[j]);
        jend(']');
        jfloat("cpu_s", py_round(secs, 3));
        jfloat_or_null("cpu_pct", window_s != 0, py_round(100 * secs / window_s, 1));
        jfloat_or_null("us_per_msg", msgs_both != 0, py_round(secs * 1e6 / (double)msgs_both, 2));
        if (in_window) jint("rss_kib", t->rss1); /* resident memory at the end of the window */
        else jnull("rss_kib");
        jend('}');
    }
    jend('}');
}

static void report_cores(void) {
    jbegin("core_busy_pct", '{');
    for (size_t i = 0; i < n_core1; i++) {
        CoreTimes *c1 = &core1[i], *c0 = NULL;
        for (size_t j = 0; j < n_core0; j++)
            if (!strcmp(core0[j].name, c1->name)) c0 = &core0[j];
        long long b0 = c0 ? c0->busy : c1->busy, t0 = c0 ? c0->total : c1->total;
        if (c1->total > t0 && strcmp(c1->name, "all"))
            jfloat(c1->name, py_round(100.0 * (double)(c1->busy - b0) / (double)(c1->total - t0), 1));
    }
    jend('}');
}

static void why_add(char *why, size_t cap, const char *fmt, ...) {
    size_t n = strlen(why);
    va_list ap;
    if (n && n + 2 < cap) strcpy(why + n, "; "), n += 2;
    va_start(ap, fmt);
    vsnprintf(why + n, cap - n, fmt, ap);
    va_end(ap);
}

static void report(double t_ramp, double t_drain) {
    double window_s = win_t1 ? (double)(win_t1 - win_t0) / 1e9 : 0.0;
    qsort(rtts, n_rtts, sizeof *rtts, cmp_i64);
    int have_p = n_rtts > 0;
    double p50 = have_p ? pct(0.50) : 0, p90 = have_p ? pct(0.90) : 0, p99 = have_p ? pct(0.99) : 0;
    long long lost = st.sent - st.recv, reorder = 0, failed = 0;
    for (size_t i = 0; i < n_sess; i++) {
        reorder += (long long)S[i].reorder;
        failed += S[i].state == FAILED;
    }
    long long msgs_both = st.sent_win + st.recv_win;
    double expected = (double)n_live * A.rate * A.duration;
    int kept = n_live && (double)st.sent_win >= 0.99 * expected && (double)big_lags <= 0.001 * expected;
    int keeps_up = (long long)n_live == N && !failed && !lost && !st.corrupt && !reorder && have_p &&
                   p50 < A.p50_limit && kept;
    char why[1024] = "", lim[64];
    py_repr(A.p50_limit, lim);
    if ((long long)n_live < N)
        why_add(why, sizeof why, "%lld sessions failed to open", N - (long long)n_live);
    if (failed && (long long)n_live == N) why_add(why, sizeof why, "%lld sessions failed", failed);
    if (lost) why_add(why, sizeof why, "%lld lost", lost);
    if (st.corrupt) why_add(why, sizeof why, "%lld corrupt", st.corrupt);
    if (reorder) why_add(why, sizeof why, "%lld reordered", reorder);
    if (have_p && p50 >= A.p50_limit) why_add(why, sizeof why, "p50 %.2f ms >= %s ms", p50, lim);
    if (n_live && !kept) why_add(why, sizeof why, "load generator fell behind schedule");

    jbegin(NULL, '{');
    jstr("label", A.label);
    jstr("url", A.url);
    jbool("bot_in_loadgen", bot_lfd >= 0);
    jint("sessions", N);
    jint("sessions_open", (long long)n_live);
    jint("sessions_failed", failed);
    jfloat("rate_per_session", A.rate);
    jint("size", A.size);
    jfloat("ramp_s", py_round(t_ramp, 2));
    jfloat("window_s", py_round(window_s, 3));
    jfloat("drain_s", py_round(t_drain, 3));
    jint("sent", st.sent);
    jint("received", st.recv);
    jint("lost", lost);
    jint("reordered", reorder);
    jint("corrupt", st.corrupt);
    jint("sent_in_window", st.sent_win);
    jint("received_in_window", st.recv_win);
    jfloat("msgs_per_s", window_s ? py_round((double)st.sent_win / window_s, 1) : 0.0);
    jfloat("target_msgs_per_s", (double)n_live * A.rate);
    jint("rtt_samples", (long long)n_rtts);
    jfloat_or_null("rtt_p50_ms", have_p, py_round(p50, 3));
    jfloat_or_null("rtt_p90_ms", have_p, py_round(p90, 3));
    jfloat_or_null("rtt_p99_ms", have_p, py_round(p99, 3));
    jfloat_or_null("rtt_max_ms", have_p, have_p ? py_round((double)rtts[n_rtts - 1] / 1e6, 3) : 0);
    jfloat("send_lag_max_ms", py_round(max_lag_ns / 1e6, 3));
    jint("sends_late_over_period", big_lags);
    jint("backlogged_sends", st.backlogged);
    jfloat_or_null("loadgen_cpu_pct", have_ru && window_s,
                   have_ru && window_s
                       ? py_round(100 * ((tv_s(ru1.ru_utime) - tv_s(ru0.ru_utime)) +
                                         (tv_s(ru1.ru_stime) - tv_s(ru0.ru_stime))) / window_s, 1)
                       : 0);
    report_loadgen(window_s);
    report_cpu(window_s, msgs_both);
    report_cores();
    jbegin("errors", '{');
    for (size_t i = 0; i < n_errs; i++) jint(errs[i].kind, errs[i].n);
    jend('}');
    jbool("generator_kept_schedule", kept);
    jbool("keeps_up", keeps_up);
    jstr("why_not", why);
    jstr("impl", "c");
    jend('}');
    putchar('\n');
    fflush(stdout);
}

/* -------------------------------------------------------------------- main */

int main(int argc, char **argv) {
    const char *slash = strrchr(argv[0], '/');
    prog = slash ? slash + 1 : argv[0];
    parse_args(argc, argv);
    if (A.size < 16) arg_error("--size must be >= 16");
    parse_url(A.url);
    if (!(A.rate > 0)) arg_error("--rate must be > 0"); /* loadgen.py: ZeroDivisionError */
    parse_cpu_pids();
    clk_tck = sysconf(_SC_CLK_TCK);
    signal(SIGPIPE, SIG_IGN);

    N = A.sessions;
    init_sessions();
    buf_reserve(&shared, SESSION_RECV > BOT_RECV ? SESSION_RECV : BOT_RECV);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) {
        perror("epoll_create1");
        return 1;
    }
    if (A.bot_port) bot_listen(A.bot_port);

    double t_ramp = ramp(), t_drain = 0.0;
    live = xrealloc(NULL, (n_sess ? n_sess : 1) * sizeof *live);
    for (size_t i = 0; i < n_sess; i++)
        if (S[i].state == OPEN) live[n_live++] = (uint32_t)i;

    if (n_live) {
        pace();
        t_drain = drain();
        close_all();
    }
    for (size_t i = 0; i < n_sess; i++)
        if (S[i].fd >= 0) {
            int st_ = S[i].state;
            kill_session(&S[i], st_ == OPEN || st_ == CLOSING || st_ == DONE ? DONE : FAILED);
        }
    bot_close();
    close(ep);
    report(t_ramp, t_drain);
    return 0;
}
