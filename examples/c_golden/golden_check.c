/* golden_check.c -- check a naive C int8 x ternary BitLinear against refbitnet's golden vectors.
 *
 *   python -m refbitnet.testing dump golden --layout i2_s --shape 64x256 --out golden.safetensors
 *   cc -O2 -std=c99 -ffp-contract=off -o golden_check golden_check.c -lm
 *   ./golden_check golden.safetensors
 *
 * It reads the .safetensors file (8-byte header length, JSON header, raw little-endian data), decodes
 * the packed weight of the file's layout into ternary codes, quantizes x to int8 the way refbitnet (and
 * torch) does, runs the integer kernel and the float epilogue, and compares every step bit for bit:
 *
 *   m   = max(max|x|, 1e-5);  s = 127 * (1 / m)        two float roundings, as torch's 127 / m
 *   xq  = clamp(nearbyint(x * s), -128, 127)            round half to even
 *   acc = sum_k xq[t][k] * code[n][k]                   int32, exact
 *   y   = ((float)acc / s) * weight_scale               float, in this order
 *
 * -ffp-contract=off keeps the compiler from fusing a multiply and an add into an FMA (a different
 * rounding). Exit status 0 when every tensor matches, 1 when any differs, 2 on a bad file.
 * Layouts decoded here: codes, hf, kernel, i2_s, tq2_0; for the others the file's "codes" are used.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct { const char *dtype; int64_t shape[4]; int ndim; uint64_t begin, end; } Tensor;

static char *header;          /* the JSON header, NUL-terminated */
static unsigned char *data;   /* the bytes after the header */
static uint64_t data_size;

static void die(const char *msg, const char *what) {
    fprintf(stderr, "error: %s%s\n", msg, what ? what : "");
    exit(2);
}

/* The position just after the first `"key":` in [from, to), or NULL. Keys are quoted, so "x" never
 * matches "xq"; the header has no nesting deeper than one object per tensor. */
static const char *find_key(const char *from, const char *to, const char *key) {
    size_t len = strlen(key);
    for (const char *p = from; p + len + 2 < to; p++) {
        if (*p == '"' && strncmp(p + 1, key, len) == 0 && p[len + 1] == '"') {
            const char *q = p + len + 2;
            while (*q == ' ') q++;
            if (*q == ':') { q++; while (*q == ' ') q++; return q; }
        }
    }
    return NULL;
}

static Tensor get_tensor(const char *name) {
    Tensor t = {0};
    const char *end = header + strlen(header);
    const char *p = find_key(header, end, name);
    if (!p || *p != '{') die("missing tensor ", name);
    const char *close = strchr(p, '}');
    const char *d = find_key(p, close, "dtype");
    const char *s = find_key(p, close, "shape");
    const char *o = find_key(p, close, "data_offsets");
    if (!d || !s || !o) die("bad header entry for ", name);
    static char dtypes[16][8];
    static int n_dtypes;
    char *dt = dtypes[n_dtypes++ % 16];
    sscanf(d, "\"%7[A-Z0-9]\"", dt);
    t.dtype = dt;
    s++;                                              /* past '[' */
    while (*s != ']' && t.ndim < 4) {
        t.shape[t.ndim++] = strtoll(s, (char **)&s, 10);
        while (*s == ',' || *s == ' ') s++;
    }
    if (sscanf(o, "[%llu,%llu]", (unsigned long long *)&t.begin, (unsigned long long *)&t.end) != 2)
        die("bad data_offsets for ", name);
    if (t.end < t.begin || t.end > data_size) die("data_offsets outside the file for ", name);
    return t;
}

static int64_t numel(Tensor t) { int64_t n = 1; for (int i = 0; i < t.ndim; i++) n *= t.shape[i]; return n; }

static const void *tensor_data(const char *name, const char *dtype, int64_t expect, Tensor *out) {
    Tensor t = get_tensor(name);
    if (strcmp(t.dtype, dtype) != 0) die("unexpected dtype for ", name);
    if (expect >= 0 && numel(t) != expect) die("unexpected size for ", name);
    if (out) *out = t;
    return data + t.begin;
}

static void meta_string(const char *key, char *out, size_t size) {
    const char *m = find_key(header, header + strlen(header), "__metadata__");
    const char *p = m ? find_key(m, strchr(m, '}'), key) : NULL;
    if (!p || *p != '"') die("missing metadata ", key);
    size_t i = 0;
    for (p++; *p && *p != '"' && i + 1 < size; p++) out[i++] = *p;
    out[i] = 0;
}

/* ---------------------------------------------------------------- layouts -> codes int8 [N][K] */
static void decode(const char *layout, const uint8_t *b, int64_t n, int64_t k, int8_t *c) {
    if (strcmp(layout, "codes") == 0) {                   /* int8 [N, K] as they are */
        memcpy(c, b, (size_t)(n * k));
    } else if (strcmp(layout, "hf") == 0) {               /* uint8 [N/4, K]: row i*R + r in bits 2i of [r][k] */
        int64_t r = n / 4;
        for (int64_t i = 0; i < 4; i++)
            for (int64_t row = 0; row < r; row++)
                for (int64_t col = 0; col < k; col++)
                    c[(i * r + row) * k + col] = (int8_t)(((b[row * k + col] >> (2 * i)) & 3) - 1);
    } else if (strcmp(layout, "kernel") == 0) {           /* uint8 [N, K/4]: code 4j + i in bits 2i of byte j */
        for (int64_t row = 0; row < n; row++)
            for (int64_t col = 0; col < k; col++)
                c[row * k + col] = (int8_t)(((b[row * (k / 4) + col / 4] >> (2 * (col % 4))) & 3) - 1);
    } else if (strcmp(layout, "i2_s") == 0) {             /* 128-element blocks of 32 bytes, high bits first */
        for (int64_t e = 0; e < n * k; e++) {
            int64_t blk = e / 128, j = e % 128;
            c[e] = (int8_t)(((b[blk * 32 + j % 32] >> (6 - 2 * (j / 32))) & 3) - 1);
        }
    } else if (strcmp(layout, "tq2_0") == 0) {            /* 66-byte blocks: qs[64], fp16 d */
        for (int64_t e = 0; e < n * k; e++) {
            int64_t blk = e / 256, j = e % 256, h = j / 128, l = (j % 128) / 32, m = j % 32;
            c[e] = (int8_t)(((b[blk * 66 + 32 * h + m] >> (2 * l)) & 3) - 1);
        }
    } else {
        const int8_t *ref = tensor_data("codes", "I8", n * k, NULL);
        printf("layout %s: not decoded in C, using the file's codes\n", layout);
        memcpy(c, ref, (size_t)(n * k));
    }
}

static int report(const char *name, int64_t differ, int64_t total) {
    if (differ == 0) printf("TENSOR OK  %-6s %lld elements bit-equal\n", name, (long long)total);
    else printf("TENSOR NOT OK  %-6s %lld of %lld differ\n", name, (long long)differ, (long long)total);
    return differ != 0;
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s golden.safetensors\n", argv[0]); return 2; }
    FILE *f = fopen(argv[1], "rb");
    if (!f) die("cannot open ", argv[1]);
    uint8_t len8[8];
    if (fread(len8, 1, 8, f) != 8) die("truncated file ", argv[1]);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | len8[i];
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    if (hlen > (uint64_t)size - 8) die("header longer than the file ", argv[1]);
    header = malloc(hlen + 1);
    data_size = (uint64_t)size - 8 - hlen;
    data = malloc(data_size ? data_size : 1);
    fseek(f, 8, SEEK_SET);
    if (fread(header, 1, hlen, f) != hlen || fread(data, 1, data_size, f) != data_size) die("read failed", NULL);
    header[hlen] = 0;
    fclose(f);

    char layout[32];
    meta_string("layout", layout, sizeof layout);
    Tensor tx, tc;
    const float *x = tensor_data("x", "F32", -1, &tx);
    tensor_data("codes", "I8", -1, &tc);
    int64_t T = tx.shape[0], K = tx.shape[1], N = tc.shape[0];
    const int8_t *codes_ref = tensor_data("codes", "I8", N * K, NULL);
    const uint8_t *packed = data + get_tensor("packed").begin;
    const int8_t *xq_ref = tensor_data("xq", "I8", T * K, NULL);
    const float *s_ref = tensor_data("s", "F32", T, NULL);
    const int32_t *acc_ref = tensor_data("acc", "I32", T * N, NULL);
    const float *y_ref = tensor_data("y", "F32", T * N, NULL);
    float ws = *(const float *)tensor_data("weight_scale", "F32", 1, NULL);
    printf("golden vectors: layout %s, N = %lld, K = %lld, T = %lld tokens\n", layout, (long long)N,
           (long long)K, (long long)T);

    int8_t *codes = malloc((size_t)(N * K)), *xq = malloc((size_t)(T * K));
    float *s = malloc(sizeof(float) * (size_t)T), *y = malloc(sizeof(float) * (size_t)(T * N));
    int32_t *acc = malloc(sizeof(int32_t) * (size_t)(T * N));
    decode(layout, packed, N, K, codes);

    for (int64_t t = 0; t < T; t++) {                   /* activation quantizer, per token */
        float m = 1e-5f;
        for (int64_t i = 0; i < K; i++) m = fmaxf(m, fabsf(x[t * K + i]));
        float inv = 1.0f / m;
        s[t] = 127.0f * inv;
        for (int64_t i = 0; i < K; i++) {
            float q = nearbyintf(x[t * K + i] * s[t]);
            xq[t * K + i] = (int8_t)(q > 127.0f ? 127.0f : (q < -128.0f ? -128.0f : q));
        }
    }
    for (int64_t t = 0; t < T; t++)                     /* the naive int8 x ternary kernel */
        for (int64_t o = 0; o < N; o++) {
            int32_t a = 0;
            for (int64_t i = 0; i < K; i++) a += (int32_t)xq[t * K + i] * (int32_t)codes[o * K + i];
            acc[t * N + o] = a;
            y[t * N + o] = ((float)a / s[t]) * ws;
        }

    int64_t dc = 0, dq = 0, ds = 0, da = 0, dy = 0;
    for (int64_t i = 0; i < N * K; i++) dc += codes[i] != codes_ref[i];
    for (int64_t i = 0; i < T * K; i++) dq += xq[i] != xq_ref[i];
    for (int64_t i = 0; i < T; i++) ds += memcmp(&s[i], &s_ref[i], 4) != 0;
    for (int64_t i = 0; i < T * N; i++) da += acc[i] != acc_ref[i];
    for (int64_t i = 0; i < T * N; i++) dy += memcmp(&y[i], &y_ref[i], 4) != 0;
    int bad = report("codes", dc, N * K) | report("xq", dq, T * K) | report("s", ds, T) |
              report("acc", da, T * N) | report("y", dy, T * N);
    printf(bad ? "golden check FAILED\n" : "golden check passed: bit-equal to refbitnet\n");
    return bad;
}
