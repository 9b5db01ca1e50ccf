/*
 * Quantized matrix-vector products for batch-1 CPU decode: y[n] = sum_k x[k] * W[n, k] with W
 * stored as int8 (per output channel, symmetric) or int4 (per group of columns, asymmetric).
 *
 * A layer arrives as the fused step's descriptor, int64[8] = {kind, weight, scale, zero, N, K,
 * group, extra}:
 *   kind 2  int8: weight int8 (N, K) in [-127, 127], scale fp32 (N,), W = q * scale[n].
 *   kind 3  int4: weight uint8 (N, K / 2), each block of 32 columns in 16 bytes, byte j holding
 *           column j (low nibble) and column j + 16 (high nibble) - llama.cpp's Q4 order, so one
 *           16-byte load unpacks to 32 columns in order; scale fp16 bits (N, K / group), zero
 *           uint8 (N, K / group) in [0, 15], W = (q - zero) * scale; group in {32, 64, 128}.
 *   extra   0: the fastest path (measured in bench/quantize.py: the integer dot products),
 *           1: widen weights to fp32 and FMA against fp32 x, 2: integer dot products.
 *
 * Integer path: x is quantized per call to int8 in blocks of 32 (one fp32 scale per block, as
 * llama.cpp's Q8_0), then each block is one _mm256_maddubs_epi16 + _mm256_madd_epi16 against
 * the weights: 32 multiply-adds in 2 instructions instead of 4 widenings and 4 FMAs. maddubs
 * multiplies unsigned by signed bytes: int4 codes are unsigned already; for int8 weights the
 * sign of w moves onto x (|w| * sign(w) x), and both are in [-127, 127] so the int16 pair sums
 * (<= 2 * 127 * 127) never saturate. The extra error is that of int8 activations per 32
 * values (~0.4% relative per block), far below the weights' own.
 *
 * Rows are spread over the pthread pool of gemv.c (gemv_pool_run). Without AVX2 the same
 * formulas run as scalar C.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QG_AVX2 1
#else
#define QG_AVX2 0
#endif

typedef void (*rows_fn)(const float *, const void *, void *, int, int64_t, int64_t, int64_t, int64_t);
int gemv_pool_run(rows_fn fn, const float *x, const void *w, void *y, int ydt, int64_t N,
                  int64_t K, int64_t row_bytes);

enum { KIND_INT8 = 2, KIND_INT4 = 3 };
enum { VAR_AUTO = 0, VAR_WIDEN = 1, VAR_DOT = 2 };
#define QB 32 /* columns per int4 packing block and per int8 block of x */

typedef struct {
    const int64_t *d;   /* the descriptor */
    const float *x;     /* fp32 x (K,) */
    const int8_t *xq;   /* x quantized per block of 32 (K,) */
    const float *xd;    /* scale of each block of xq (K / 32,) */
    const float *xs;    /* int4: sum of x over each group (exact x for widen, dequantized xq for dot) */
} qctx_t;

static float half_to_float(uint16_t h) {
#if QG_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023, u;
    if (exp == 0) {
        float f = ldexpf((float)man, -24);
        return sign ? -f : f;
    }
    u = sign | (exp == 31 ? 0x7f800000u | man << 13 : (exp + 112) << 23 | man << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

#if QG_AVX2
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 32 int4 codes of one block (16 bytes) as 32 unsigned bytes in column order */
static inline __m256i unpack32(const uint8_t *p) {
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0x0f));
}
#endif

/* ------------------------------------------------------------------ int8 rows */

static void int8_widen_rows(const float *unused, const void *ctx, void *yv, int ydt, int64_t N,
                            int64_t K, int64_t n0, int64_t n1) {
    (void)unused, (void)ydt, (void)N;
    const qctx_t *c = ctx;
    const int8_t *w = (const int8_t *)(intptr_t)c->d[1];
    const float *scale = (const float *)(intptr_t)c->d[2], *x = c->x;
    float *y = yv;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *wr = w + n * K;
        int64_t k = 0;
        float s = 0.0f;
#if QG_AVX2
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (; k + 32 <= K; k += 32) {
            __m256i q = _mm256_loadu_si256((const __m256i *)(wr + k));
            __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))),
                                 _mm256_loadu_ps(x + k + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), _mm256_loadu_ps(x + k + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))),
                                 _mm256_loadu_ps(x + k + 24), a3);
        }
        s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
        for (; k < K; k++) s += (float)wr[k] * x[k];
        y[n] = s * scale[n];
    }
}

static void int8_dot_rows(const float *unused, const void *ctx, void *yv, int ydt, int64_t N,
                          int64_t K, int64_t n0, int64_t n1) {
    (void)unused, (void)ydt, (void)N;
    const qctx_t *c = ctx;
    const int8_t *w = (const int8_t *)(intptr_t)c->d[1], *xq = c->xq;
    const float *scale = (const float *)(intptr_t)c->d[2], *xd = c->xd;
    float *y = yv;
    const int64_t nb = K / QB;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *wr = w + n * K;
        float s = 0.0f;
        int64_t b = 0;
#if QG_AVX2
        const __m256i ones = _mm256_set1_epi16(1);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (; b + 2 <= nb; b += 2) {
            __m256i w0 = _mm256_loadu_si256((const __m256i *)(wr + b * QB));
            __m256i w1 = _mm256_loadu_si256((const __m256i *)(wr + b * QB + QB));
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + b * QB));
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + b * QB + QB));
            __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(x0, w0)), ones);
            __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w1, w1), _mm256_sign_epi8(x1, w1)), ones);
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(xd[b]), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(xd[b + 1]), a1);
        }
        for (; b < nb; b++) {
            __m256i w0 = _mm256_loadu_si256((const __m256i *)(wr + b * QB));
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + b * QB));
            __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(x0, w0)), ones);
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(xd[b]), a0);
        }
        s = hsum8(_mm256_add_ps(a0, a1));
#endif
        for (; b < nb; b++) {
            int32_t acc = 0;
            for (int i = 0; i < QB; i++) acc += (int32_t)wr[b * QB + i] * xq[b * QB + i];
            s += (float)acc * xd[b];
        }
        y[n] = s * scale[n];
    }
}

/* ------------------------------------------------------------------ int4 rows */

static void int4_widen_rows(const float *unused, const void *ctx, void *yv, int ydt, int64_t N,
                            int64_t K, int64_t n0, int64_t n1) {
    (void)unused, (void)ydt, (void)N;
    const qctx_t *c = ctx;
    const uint8_t *w = (const uint8_t *)(intptr_t)c->d[1], *zero = (const uint8_t *)(intptr_t)c->d[3];
    const uint16_t *scale = (const uint16_t *)(intptr_t)c->d[2];
    const int64_t g = c->d[6], ng = K / g, bpg = g / QB;
    const float *x = c->x, *xs = c->xs;
    float *y = yv;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * (K / 2);
        float s = 0.0f;
        for (int64_t j = 0; j < ng; j++) {
            const float sc = half_to_float(scale[n * ng + j]);
            float dq = 0.0f; /* sum of x * code over the group */
#if QG_AVX2
            __m256 a0 = _mm256_setzero_ps(), a1 = a0;
            for (int64_t b = j * bpg; b < (j + 1) * bpg; b++) {
                __m128i v = _mm_loadu_si128((const __m128i *)(wr + b * QB / 2)), m = _mm_set1_epi8(0x0f);
                __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
                const float *xb = x + b * QB;
                a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_loadu_ps(xb), a0);
                a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                                     _mm256_loadu_ps(xb + 8), a1);
                a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_loadu_ps(xb + 16), a0);
                a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
                                     _mm256_loadu_ps(xb + 24), a1);
            }
            dq = hsum8(_mm256_add_ps(a0, a1));
#else
            for (int64_t b = j * bpg; b < (j + 1) * bpg; b++)
                for (int i = 0; i < QB / 2; i++) {
                    const uint8_t byte = wr[b * QB / 2 + i];
                    dq += (float)(byte & 15) * x[b * QB + i] + (float)(byte >> 4) * x[b * QB + i + 16];
                }
#endif
            s += sc * (dq - (float)zero[n * ng + j] * xs[j]);
        }
        y[n] = s;
    }
}

#if QG_AVX2
/* one block of 32 int4 codes times 32 int8 x values: 8 int32 partial sums as fp32 */
static inline __m256 dot32(const uint8_t *wb, __m256i xv) {
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(unpack32(wb), xv), _mm256_set1_epi16(1)));
}
#endif

/* Rows n0..n1 of the int4 product. Per group: the blocks' integer dot products scaled by x's
 * block scale, then the group's weight scale once, minus zero * (sum of x over the group).
 * AVX2 takes two rows at a time so each block of x is loaded once for both. */
static void int4_dot_rows(const float *unused, const void *ctx, void *yv, int ydt, int64_t N,
                          int64_t K, int64_t n0, int64_t n1) {
    (void)unused, (void)ydt, (void)N;
    const qctx_t *c = ctx;
    const uint8_t *w = (const uint8_t *)(intptr_t)c->d[1], *zero = (const uint8_t *)(intptr_t)c->d[3];
    const uint16_t *scale = (const uint16_t *)(intptr_t)c->d[2];
    const int64_t g = c->d[6], ng = K / g, bpg = g / QB;
    const int8_t *xq = c->xq;
    const float *xd = c->xd, *xs = c->xs;
    float *y = yv;
    int64_t n = n0;
#if QG_AVX2
    for (; n + 2 <= n1; n += 2) {
        const uint8_t *w0 = w + n * (K / 2), *w1 = w0 + K / 2;
        float corr0 = 0.0f, corr1 = 0.0f;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
        for (int64_t j = 0; j < ng; j++) {
            const float sc0 = half_to_float(scale[n * ng + j]), sc1 = half_to_float(scale[(n + 1) * ng + j]);
            corr0 += sc0 * (float)zero[n * ng + j] * xs[j];
            corr1 += sc1 * (float)zero[(n + 1) * ng + j] * xs[j];
            __m256 g0 = _mm256_setzero_ps(), g1 = g0;
            for (int64_t b = j * bpg; b < (j + 1) * bpg; b++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * QB));
                const __m256 xb = _mm256_broadcast_ss(xd + b);
                g0 = _mm256_fmadd_ps(dot32(w0 + b * QB / 2, xv), xb, g0);
                g1 = _mm256_fmadd_ps(dot32(w1 + b * QB / 2, xv), xb, g1);
            }
            acc0 = _mm256_fmadd_ps(g0, _mm256_set1_ps(sc0), acc0);
            acc1 = _mm256_fmadd_ps(g1, _mm256_set1_ps(sc1), acc1);
        }
        y[n] = hsum8(acc0) - corr0;
        y[n + 1] = hsum8(acc1) - corr1;
    }
#endif
    for (; n < n1; n++) {
        const uint8_t *wr = w + n * (K / 2);
        float corr = 0.0f, s = 0.0f;
        for (int64_t j = 0; j < ng; j++) {
            const float sc = half_to_float(scale[n * ng + j]);
            corr += sc * (float)zero[n * ng + j] * xs[j];
            for (int64_t b = j * bpg; b < (j + 1) * bpg; b++) {
                int32_t dot = 0;
                for (int i = 0; i < QB / 2; i++) {
                    const uint8_t byte = wr[b * QB / 2 + i];
                    dot += (int32_t)(byte & 15) * xq[b * QB + i] + (int32_t)(byte >> 4) * xq[b * QB + i + 16];
                }
                s += (float)dot * sc * xd[b];
            }
        }
        y[n] = s - corr;
    }
}

/* ------------------------------------------------------------------ x preparation */

/* x (K,) -> int8 blocks of 32 with one scale each (K % 32 == 0) */
static void quantize_x(const float *x, int64_t K, int8_t *xq, float *xd) {
    for (int64_t b = 0; b < K / QB; b++) {
        const float *xb = x + b * QB;
        float amax = 0.0f;
        for (int i = 0; i < QB; i++) amax = fmaxf(amax, fabsf(xb[i]));
        const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
        xd[b] = d;
        for (int i = 0; i < QB; i++) xq[b * QB + i] = (int8_t)lrintf(xb[i] * inv);
    }
}

int qgemv_abi_version(void) { return 1; }

int qgemv_avx2(void) { return QG_AVX2; }

/*
 * y (N,) = W x for one fp32 vector x (K,). Returns 0, -1 for a descriptor it cannot run
 * (unknown kind, shapes the format does not allow), -2 when out of memory.
 */
int qlinear_run(const int64_t *d, const float *x, float *y) {
    const int64_t kind = d[0], N = d[4], K = d[5], g = d[6], var = d[7];
    if (N < 0 || K <= 0) return -1;
    if (N == 0) return 0;
    int dot = var == VAR_DOT || (var == VAR_AUTO && QG_AVX2);
    rows_fn fn;
    int64_t row_bytes;
    if (kind == KIND_INT8) {
        if (K % QB) dot = 0;
        fn = dot ? int8_dot_rows : int8_widen_rows;
        row_bytes = K;
    } else if (kind == KIND_INT4) {
        if ((g != 32 && g != 64 && g != 128) || K % g) return -1;
        fn = dot ? int4_dot_rows : int4_widen_rows;
        row_bytes = K / 2 + 3 * (K / g);
    } else {
        return -1;
    }
    qctx_t c = {d, x, NULL, NULL, NULL};
    void *buf = NULL;
    if (dot || kind == KIND_INT4) {
        const int64_t nb = K / QB, ng = kind == KIND_INT4 ? K / g : 0;
        buf = malloc((size_t)(K + 4 * (nb + ng) + 64));
        if (!buf) return -2;
        float *xd = buf, *xs = xd + nb;
        int8_t *xq = (int8_t *)(xs + ng);
        if (dot) {
            quantize_x(x, K - K % QB, xq, xd);
            c.xq = xq, c.xd = xd;
        }
        for (int64_t j = 0; j < ng; j++) { /* group sums of the x the rows will see */
            float s = 0.0f;
            for (int64_t k = j * g; k < (j + 1) * g; k++) s += dot ? xd[k / QB] * (float)xq[k] : x[k];
            xs[j] = s;
        }
        c.xs = xs;
    }
    gemv_pool_run(fn, NULL, &c, y, 0, N, K, row_bytes);
    free(buf);
    return 0;
}

/* The same for B vectors x (B, K) -> y (B, N), one after another (decode batches of a few rows). */
int qlinear_run_rows(const int64_t *d, const float *x, float *y, int64_t B) {
    for (int64_t b = 0; b < B; b++) {
        int rc = qlinear_run(d, x + b * d[5], y + b * d[4]);
        if (rc) return rc;
    }
    return 0;
}
