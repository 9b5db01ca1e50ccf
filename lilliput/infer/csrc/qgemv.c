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
 *   kind 4  int8 in the batch layout (AVX-512 VNNI builds): weight uint8 (N / 16, K / 4, 16, 4)
 *           of q + 128, scale as kind 2; see int8p_tile below. compress/qlinear.py repacks kind 2
 *           into it in place when this build has the kernel (qgemv_int8_pack()).
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
 * With VNNI (AVX-512 VNNI + VL, or AVX-VNNI) one `vpdpbusd` replaces each maddubs + madd
 * pair: unsigned-by-signed byte products summed into int32 lanes in one instruction (and no
 * int16 intermediate). Which one the build uses is `qgemv_isa()`.
 *
 * Batches: `qlinear_run_rows` takes up to 8 rows of x per pass over the weights (decode of B
 * sequences, or k + 1 tokens being verified), each weight row loaded once for all of them (kind 4:
 * any number of rows in one pass, 8 at a time per group of 16 weight rows). Each
 * row of x goes through exactly the arithmetic it would get alone, so a sequence's logits do not
 * depend on what else is in the batch.
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
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define QG_VNNI 2 /* AVX-512 VNNI: 256-bit registers for 32-column blocks, 512-bit for 64 columns */
#elif defined(__AVXVNNI__)
#define QG_VNNI 1
#else
#define QG_VNNI 0
#endif
#else
#define QG_AVX2 0
#endif
#if QG_AVX2 && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define QG_512 1
#else
#define QG_512 0
#endif

typedef void (*rows_fn)(const float *, const void *, void *, int, int64_t, int64_t, int64_t, int64_t);
int gemv_pool_run(rows_fn fn, const float *x, const void *w, void *y, int ydt, int64_t N,
                  int64_t K, int64_t row_bytes);
int gemv_pool_items(rows_fn fn, const void *ctx, void *y, int64_t N, int64_t K, int64_t chunk);
int gemv_get_threads(void);

enum { KIND_INT8 = 2, KIND_INT4 = 3, KIND_INT8_P16 = 4 };
enum { VAR_AUTO = 0, VAR_WIDEN = 1, VAR_DOT = 2 };
#define QB 32 /* columns per int4 packing block and per int8 block of x */
#define MAXB 8 /* rows of x per pass over the weights */

typedef struct {
    const int64_t *d;   /* the descriptor */
    const float *x;     /* fp32 x (K,) */
    const int8_t *xq;   /* x quantized per block of 32 (K,) */
    const float *xd;    /* scale of each block of xq (K / 32,) */
    const float *xs;    /* int4: sum of x over each group (exact x for widen, dequantized xq for dot) */
    int64_t B;          /* rows of x (dot paths): xq (B, K), xd (B, K / 32), xs (B, K / group) */
    const uint8_t *xu;  /* 512-bit paths: x + 128 as unsigned bytes (B, K), int4's in lane order */
    const float *sv;    /* 512-bit paths: x's block scales per fp32 lane, 16 per 64 columns (B, K / 4) */
    const int32_t *xc;  /* packed int8: -128 * sum of xq over each block of 32 (B, K / 32) */
} qctx_t;

static void quantize_x(const float *x, int64_t K, int8_t *xq, float *xd);

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

/* int32 lanes of sum(u * s) over groups of 4 bytes: unsigned u times signed s */
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if QG_VNNI == 2
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif QG_VNNI == 1
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
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

/* Weight rows [n0, n1) against B rows of int8 x. Per row of x: blocks alternate between two
 * accumulators (even, odd), the same for every B, so each row's result is independent of B. */
static inline __attribute__((always_inline)) void int8_dot_impl(const qctx_t *c, float *y, int64_t N, int64_t K,
                                                                 int64_t n0, int64_t n1, const int B) {
    const int8_t *w = (const int8_t *)(intptr_t)c->d[1], *xq = c->xq;
    const float *scale = (const float *)(intptr_t)c->d[2], *xd = c->xd;
    const int64_t nb = K / QB;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *wr = w + n * K;
#if QG_AVX2
        __m256 a0[MAXB], a1[MAXB];
        for (int r = 0; r < B; r++) a0[r] = a1[r] = _mm256_setzero_ps();
        int64_t b = 0;
        for (; b + 2 <= nb; b += 2) {
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(wr + b * QB));
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(wr + b * QB + QB));
            const __m256i u0 = _mm256_sign_epi8(w0, w0), u1 = _mm256_sign_epi8(w1, w1); /* |w| */
            for (int r = 0; r < B; r++) {
                const int8_t *xr = xq + r * K + b * QB;
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)xr);
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xr + QB));
                const __m256i p0 = dot_u8s8(u0, _mm256_sign_epi8(x0, w0));
                const __m256i p1 = dot_u8s8(u1, _mm256_sign_epi8(x1, w1));
                a0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(xd[r * nb + b]), a0[r]);
                a1[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(xd[r * nb + b + 1]), a1[r]);
            }
        }
        for (; b < nb; b++) {
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(wr + b * QB));
            const __m256i u0 = _mm256_sign_epi8(w0, w0);
            for (int r = 0; r < B; r++) {
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + r * K + b * QB));
                const __m256i p0 = dot_u8s8(u0, _mm256_sign_epi8(x0, w0));
                a0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(xd[r * nb + b]), a0[r]);
            }
        }
        for (int r = 0; r < B; r++) y[r * N + n] = hsum8(_mm256_add_ps(a0[r], a1[r])) * scale[n];
#else
        for (int r = 0; r < B; r++) {
            float s = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                int32_t acc = 0;
                for (int i = 0; i < QB; i++) acc += (int32_t)wr[b * QB + i] * xq[r * K + b * QB + i];
                s += (float)acc * xd[r * nb + b];
            }
            y[r * N + n] = s * scale[n];
        }
#endif
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

/* Weight rows [n0, n1) of the int4 product against B rows of int8 x. Per group: the blocks'
 * integer dot products scaled by x's block scale, then the group's weight scale once, minus
 * zero * (sum of x over the group); the same order for every B. */
static inline __attribute__((always_inline)) void int4_dot_impl(const qctx_t *c, float *y, int64_t N, int64_t K,
                                                                 int64_t n0, int64_t n1, const int B) {
    const uint8_t *w = (const uint8_t *)(intptr_t)c->d[1], *zero = (const uint8_t *)(intptr_t)c->d[3];
    const uint16_t *scale = (const uint16_t *)(intptr_t)c->d[2];
    const int64_t g = c->d[6], ng = K / g, bpg = g / QB, nb = K / QB;
    const int8_t *xq = c->xq;
    const float *xd = c->xd, *xs = c->xs;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * (K / 2);
        float corr[MAXB];
        for (int r = 0; r < B; r++) corr[r] = 0.0f;
#if QG_AVX2
        __m256 acc[MAXB];
        for (int r = 0; r < B; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t j = 0; j < ng; j++) {
            const float sc = half_to_float(scale[n * ng + j]), zf = (float)zero[n * ng + j];
            __m256 gs[MAXB];
            for (int r = 0; r < B; r++) {
                corr[r] += sc * zf * xs[r * ng + j];
                gs[r] = _mm256_setzero_ps();
            }
            for (int64_t b = j * bpg; b < (j + 1) * bpg; b++) {
                const __m256i u = unpack32(wr + b * QB / 2);
                for (int r = 0; r < B; r++) {
                    const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + r * K + b * QB));
                    gs[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(u, xv)), _mm256_broadcast_ss(xd + r * nb + b), gs[r]);
                }
            }
            for (int r = 0; r < B; r++) acc[r] = _mm256_fmadd_ps(gs[r], _mm256_set1_ps(sc), acc[r]);
        }
        for (int r = 0; r < B; r++) y[r * N + n] = hsum8(acc[r]) - corr[r];
#else
        for (int r = 0; r < B; r++) {
            float s = 0.0f;
            for (int64_t j = 0; j < ng; j++) {
                const float sc = half_to_float(scale[n * ng + j]);
                corr[r] += sc * (float)zero[n * ng + j] * xs[r * ng + j];
                for (int64_t b = j * bpg; b < (j + 1) * bpg; b++) {
                    int32_t dot = 0;
                    for (int i = 0; i < QB / 2; i++) {
                        const uint8_t byte = wr[b * QB / 2 + i];
                        dot += (int32_t)(byte & 15) * xq[r * K + b * QB + i] +
                               (int32_t)(byte >> 4) * xq[r * K + b * QB + i + 16];
                    }
                    s += (float)dot * sc * xd[r * nb + b];
                }
            }
            y[r * N + n] = s - corr[r];
        }
#endif
    }
}

#if QG_512
#ifndef PREFETCH
#define PREFETCH 4096 /* bytes ahead in the weight stream: int4 decode ~100 -> ~170 tok/s, int8 ~94 -> ~121 on 2 Xeon cores */
#endif
/*
 * The 512-bit paths (AVX-512 VNNI), 64 columns per step. x is offset to unsigned bytes
 * (xu = xq + 128), so `vpdpbusd` multiplies it straight into the signed weights with no sign
 * trick per row; sum(xu * w) - 128 * sum(w) = sum(xq * w), and 128 * sum(w) is one more vpdpbusd
 * per weight vector, shared by all rows. int4 codes are unsigned already: x stays signed and its
 * bytes are laid out in the order the 32 packed bytes unpack to (see prepare_512). Each fp32 lane
 * then takes its x block's scale from a 16-float vector (sv), so both blocks of a step are scaled
 * in one FMA. Arithmetic per row is the same for every B.
 */
static inline __attribute__((always_inline)) void int8_dot512_impl(const qctx_t *c, float *y, int64_t N, int64_t K,
                                                                    int64_t n0, int64_t n1, const int B) {
    const int8_t *w = (const int8_t *)(intptr_t)c->d[1];
    const float *scale = (const float *)(intptr_t)c->d[2], *sv = c->sv;
    const uint8_t *xu = c->xu;
    const int64_t nq = K / 64;
    const __m512i c128 = _mm512_set1_epi8((char)0x80);
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *wr = w + n * K;
        __m512 acc[MAXB];
        for (int r = 0; r < B; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t j = 0; j < nq; j++) {
            _mm_prefetch((const char *)(wr + j * 64) + PREFETCH, _MM_HINT_T0);
            const __m512i wv = _mm512_loadu_si512((const void *)(wr + j * 64));
            const __m512i neg = _mm512_sub_epi32(_mm512_setzero_si512(),
                                                 _mm512_dpbusd_epi32(_mm512_setzero_si512(), c128, wv));
            for (int r = 0; r < B; r++) {
                const __m512i p = _mm512_dpbusd_epi32(neg, _mm512_loadu_si512((const void *)(xu + r * K + j * 64)), wv);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_loadu_ps(sv + (r * nq + j) * 16), acc[r]);
            }
        }
        for (int r = 0; r < B; r++) y[r * N + n] = _mm512_reduce_add_ps(acc[r]) * scale[n];
    }
}

static inline __attribute__((always_inline)) void int4_dot512_impl(const qctx_t *c, float *y, int64_t N, int64_t K,
                                                                    int64_t n0, int64_t n1, const int B) {
    const uint8_t *w = (const uint8_t *)(intptr_t)c->d[1], *zero = (const uint8_t *)(intptr_t)c->d[3];
    const uint16_t *scale = (const uint16_t *)(intptr_t)c->d[2];
    const int64_t g = c->d[6], ng = K / g, qpg = g / 64, nq = K / 64;
    const uint8_t *xs8 = c->xu; /* signed bytes here, in unpack order */
    const float *sv = c->sv, *xs = c->xs;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * (K / 2);
        __m512 acc[MAXB];
        float corr[MAXB];
        for (int r = 0; r < B; r++) acc[r] = _mm512_setzero_ps(), corr[r] = 0.0f;
        for (int64_t gi = 0; gi < ng; gi++) {
            const float sc = half_to_float(scale[n * ng + gi]), zf = (float)zero[n * ng + gi];
            __m512 gs[MAXB];
            for (int r = 0; r < B; r++) {
                corr[r] += sc * zf * xs[r * ng + gi];
                gs[r] = _mm512_setzero_ps();
            }
            for (int64_t j = gi * qpg; j < (gi + 1) * qpg; j++) {
                _mm_prefetch((const char *)(wr + j * 32) + PREFETCH, _MM_HINT_T0);
                const __m256i b = _mm256_loadu_si256((const __m256i *)(wr + j * 32)); /* two Q4 blocks */
                const __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, m4)),
                                                     _mm256_and_si256(_mm256_srli_epi16(b, 4), m4), 1);
                for (int r = 0; r < B; r++) {
                    const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u,
                                                          _mm512_loadu_si512((const void *)(xs8 + r * K + j * 64)));
                    gs[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_loadu_ps(sv + (r * nq + j) * 16), gs[r]);
                }
            }
            for (int r = 0; r < B; r++) acc[r] = _mm512_fmadd_ps(gs[r], _mm512_set1_ps(sc), acc[r]);
        }
        for (int r = 0; r < B; r++) y[r * N + n] = _mm512_reduce_add_ps(acc[r]) - corr[r];
    }
}
#endif

#define DOT_FNS(IMPL, NAME)                                                                        \
    static void NAME(const float *unused, const void *ctx, void *y, int ydt, int64_t N, int64_t K,  \
                     int64_t n0, int64_t n1) {                                                     \
        (void)unused, (void)ydt;                                                                   \
        const qctx_t *c = ctx;                                                                     \
        switch (c->B) {                                                                            \
        case 1: IMPL(c, y, N, K, n0, n1, 1); break;                                                \
        case 2: IMPL(c, y, N, K, n0, n1, 2); break;                                                \
        case 3: IMPL(c, y, N, K, n0, n1, 3); break;                                                \
        case 4: IMPL(c, y, N, K, n0, n1, 4); break;                                                \
        case 5: IMPL(c, y, N, K, n0, n1, 5); break;                                                \
        case 6: IMPL(c, y, N, K, n0, n1, 6); break;                                                \
        case 7: IMPL(c, y, N, K, n0, n1, 7); break;                                                \
        default: IMPL(c, y, N, K, n0, n1, 8); break;                                               \
        }                                                                                          \
    }
DOT_FNS(int8_dot_impl, int8_dot_rows)
DOT_FNS(int4_dot_impl, int4_dot_rows)
#if QG_512
DOT_FNS(int8_dot512_impl, int8_dot512_rows)
DOT_FNS(int4_dot512_impl, int4_dot512_rows)

/*
 * Packed int8 (kind 4), the layout for batches: weight rows in groups of 16, each group's K
 * columns as K / 4 runs of 64 bytes, run j holding columns 4j..4j+3 of the group's 16 rows (row i
 * at bytes 4i..4i+3), stored as w + 128 (unsigned). One `vpdpbusd` of a run against x's 4 bytes
 * at those columns broadcast to every lane adds 4 products to each of the 16 rows' sums, so a
 * block of 32 columns is 8 of them and leaves every lane holding a whole block's dot product: x's
 * block scale then applies once per 16 weight rows (one cvt + one FMA), where the row-major
 * layout needs them once per row and 64 columns. sum((w + 128) x) = sum(w x) + 128 sum(x): the
 * accumulator starts at -128 sum(x) over the block (xc). Groups go to the pool; inside a group,
 * 8 rows of x at a time against the group's weights (9 KB at K = 576, from L1 after the first
 * tile), so a prompt chunk of any length reads the weights once. Per row of x the arithmetic is
 * the same for every B.
 */
#ifndef PACKED_PREFETCH
#define PACKED_PREFETCH 8192 /* bytes ahead, every line of a block: batch 8 ~740 -> ~900 tok/s, batch 1 ~230 -> ~270 (Xeon) */
#endif
static inline __attribute__((always_inline)) void int8p_tile(const qctx_t *c, const uint8_t *wg, float *y,
                                                             int64_t N, int64_t K, int64_t n0, int64_t r0,
                                                             const int R) {
    const int64_t nb = K / QB;
    const int8_t *xq = c->xq;
    const float *xd = c->xd;
    const int32_t *xc = c->xc;
    __m512 acc[MAXB];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = wg + b * 8 * 64;
        for (int l = 0; l < 8; l++) _mm_prefetch((const char *)wb + PACKED_PREFETCH + 64 * l, _MM_HINT_T0);
        __m512i wv[8];
        for (int q = 0; q < 8; q++) wv[q] = _mm512_loadu_si512((const void *)(wb + q * 64));
        for (int r = 0; r < R; r++) {
            const int8_t *xr = xq + (r0 + r) * K + b * QB;
            __m512i ia = _mm512_set1_epi32(xc[(r0 + r) * nb + b]);
            for (int q = 0; q < 8; q++) {
                int32_t x4;
                memcpy(&x4, xr + 4 * q, 4);
                ia = _mm512_dpbusd_epi32(ia, wv[q], _mm512_set1_epi32(x4));
            }
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia), _mm512_set1_ps(xd[(r0 + r) * nb + b]), acc[r]);
        }
    }
    const __m512 sc = _mm512_loadu_ps((const float *)(intptr_t)c->d[2] + n0);
    for (int r = 0; r < R; r++) _mm512_storeu_ps(y + (r0 + r) * N + n0, _mm512_mul_ps(acc[r], sc));
}

/* Groups [g0, g1) of 16 weight rows against all B rows of x. */
static void int8p_groups(const float *unused, const void *ctx, void *yv, int ydt, int64_t N, int64_t K,
                         int64_t g0, int64_t g1) {
    (void)unused, (void)ydt;
    const qctx_t *c = ctx;
    const uint8_t *w = (const uint8_t *)(intptr_t)c->d[1];
    const int64_t n = c->d[4];
    (void)N;
    for (int64_t gi = g0; gi < g1; gi++) {
        const uint8_t *wg = w + gi * 16 * K;
        for (int64_t r0 = 0; r0 < c->B; r0 += MAXB) {
            switch (c->B - r0 < MAXB ? c->B - r0 : MAXB) {
            case 1: int8p_tile(c, wg, yv, n, K, gi * 16, r0, 1); break;
            case 2: int8p_tile(c, wg, yv, n, K, gi * 16, r0, 2); break;
            case 3: int8p_tile(c, wg, yv, n, K, gi * 16, r0, 3); break;
            case 4: int8p_tile(c, wg, yv, n, K, gi * 16, r0, 4); break;
            case 5: int8p_tile(c, wg, yv, n, K, gi * 16, r0, 5); break;
            case 6: int8p_tile(c, wg, yv, n, K, gi * 16, r0, 6); break;
            case 7: int8p_tile(c, wg, yv, n, K, gi * 16, r0, 7); break;
            default: int8p_tile(c, wg, yv, n, K, gi * 16, r0, 8); break;
            }
        }
    }
}

/* y (B, N) for the packed layout: x quantized once, all B rows in one pass over the weights. */
static int run_packed(const int64_t *d, const float *x, float *y, int64_t B) {
    const int64_t N = d[4], K = d[5], nb = K / QB;
    void *buf = malloc((size_t)(B * (K + 8 * nb)) + 64);
    if (!buf) return -2;
    float *xd = buf;
    int32_t *xc = (int32_t *)(xd + B * nb);
    int8_t *xq = (int8_t *)(xc + B * nb);
    for (int64_t r = 0; r < B; r++) {
        quantize_x(x + r * K, K, xq + r * K, xd + r * nb);
        for (int64_t b = 0; b < nb; b++) { /* byte pairs, then int16 pairs, then the 8 lanes */
            const __m256i p = _mm256_madd_epi16(
                _mm256_maddubs_epi16(_mm256_set1_epi8(1), _mm256_loadu_si256((const __m256i *)(xq + r * K + b * QB))),
                _mm256_set1_epi16(1));
            __m128i h = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
            xc[r * nb + b] = -128 * _mm_cvtsi128_si32(h);
        }
    }
    qctx_t c = {d, x, xq, xd, NULL, B, NULL, NULL, xc};
    const int64_t groups = N / 16, threads = gemv_get_threads();
    /* about 4 chunks per thread; one thread when the whole product is small */
    int64_t chunk = groups / (4 * threads);
    if (N * K * (B < 4 ? B : 4) < 2 * 96 * 1024) chunk = groups;
    gemv_pool_items(int8p_groups, &c, y, groups, K, chunk < 1 ? 1 : chunk);
    free(buf);
    return 0;
}

/*
 * x for the 512-bit paths, per 64 columns. int8: xu = xq + 128 in column order; sv lanes 0-7
 * take block 0's scale, 8-15 block 1's. int4: the 32 packed bytes unpack (low nibbles of all
 * 32 bytes, then high nibbles) to columns [0-15 | 32-47 | 16-31 | 48-63], so x is stored in that
 * order and sv gives lanes 0-3 and 8-11 block 0's scale, 4-7 and 12-15 block 1's.
 */
static void prepare_512(int kind, const int8_t *xq, const float *xd, int64_t K, uint8_t *xu, float *sv) {
    for (int64_t j = 0; j < K / 64; j++) {
        const int8_t *q = xq + j * 64;
        uint8_t *o = xu + j * 64;
        float *v = sv + j * 16;
        const float d0 = xd[2 * j], d1 = xd[2 * j + 1];
        if (kind == KIND_INT8) {
            _mm512_storeu_si512((void *)o, _mm512_xor_si512(_mm512_loadu_si512((const void *)q),
                                                             _mm512_set1_epi8((char)0x80))); /* q + 128 */
            for (int i = 0; i < 16; i++) v[i] = i < 8 ? d0 : d1;
        } else {
            for (int i = 0; i < 16; i++) {
                o[i] = (uint8_t)q[i], o[16 + i] = (uint8_t)q[32 + i];
                o[32 + i] = (uint8_t)q[16 + i], o[48 + i] = (uint8_t)q[48 + i];
            }
            for (int i = 0; i < 16; i++) v[i] = (i & 4) ? d1 : d0;
        }
    }
}
#endif

/* ------------------------------------------------------------------ x preparation */

/* x (K,) -> int8 blocks of 32 with one scale each (K % 32 == 0). The vector path does the
 * scalar path's arithmetic (same amax, d, 1/d and products; cvtps rounds to nearest even as
 * lrintf does), so both give the same bytes. */
static void quantize_x(const float *x, int64_t K, int8_t *xq, float *xd) {
#if QG_AVX2
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < K / QB; b++) {
        const float *xb = x + b * QB;
        __m256 v[4];
        __m256 m = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float amax = _mm_cvtss_f32(h);
        const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
        xd[b] = d;
        const __m256 vi = _mm256_set1_ps(inv);
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vi));
        /* int32 -> int8 keeping column order: the packs interleave 128-bit lanes, the permute undoes it */
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(xq + b * QB), _mm256_permutevar8x32_epi32(p, order));
    }
#else
    for (int64_t b = 0; b < K / QB; b++) {
        const float *xb = x + b * QB;
        float amax = 0.0f;
        for (int i = 0; i < QB; i++) amax = fmaxf(amax, fabsf(xb[i]));
        const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
        xd[b] = d;
        for (int i = 0; i < QB; i++) xq[b * QB + i] = (int8_t)lrintf(xb[i] * inv);
    }
#endif
}

int qgemv_abi_version(void) { return 3; }

/* Weight rows per group of the packed int8 layout (kind 4) this build runs; 0: none (no AVX-512
 * VNNI), int8 layers stay row-major (kind 2). */
int qgemv_int8_pack(void) { return QG_512 ? 16 : 0; }

int qgemv_avx2(void) { return QG_AVX2; }

/* The instructions the integer dot products use: 0 scalar C, 1 AVX2 maddubs, 2 AVX-VNNI (256-bit),
 * 3 AVX-512 VNNI on 256-bit registers, 4 AVX-512 VNNI with the 512-bit paths. */
int qgemv_isa(void) {
#if QG_AVX2
    return QG_512 ? 4 : QG_VNNI == 2 ? 3 : QG_VNNI == 1 ? 2 : 1;
#else
    return 0;
#endif
}

/* One pass of B <= MAXB rows: x (B, K) fp32 -> y (B, N). */
static int run_pass(const int64_t *d, const float *x, float *y, int64_t B) {
    const int64_t kind = d[0], N = d[4], K = d[5], g = d[6], var = d[7];
    int dot = var == VAR_DOT || (var == VAR_AUTO && QG_AVX2);
    if (kind == KIND_INT8 && K % QB) dot = 0;
    if (!dot) { /* the widening paths take one row of x at a time */
        for (int64_t r = 0; r < B; r++) {
            qctx_t c = {d, x + r * K, NULL, NULL, NULL, 1, NULL, NULL, NULL};
            float *xs = NULL;
            if (kind == KIND_INT4) {
                xs = malloc(sizeof(float) * (size_t)(K / g));
                if (!xs) return -2;
                for (int64_t j = 0; j < K / g; j++) {
                    float s = 0.0f;
                    for (int64_t k = j * g; k < (j + 1) * g; k++) s += x[r * K + k];
                    xs[j] = s;
                }
                c.xs = xs;
            }
            gemv_pool_run(kind == KIND_INT8 ? int8_widen_rows : int4_widen_rows, NULL, &c, y + r * N, 0, N, K,
                          kind == KIND_INT8 ? K : K / 2 + 3 * (K / g));
            free(xs);
        }
        return 0;
    }
    const int64_t nb = K / QB, ng = kind == KIND_INT4 ? K / g : 0;
    void *buf = malloc((size_t)(B * (K + 4 * (nb + ng)) + 64));
    if (!buf) return -2;
    float *xd = buf, *xs = xd + B * nb;
    int8_t *xq = (int8_t *)(xs + B * ng);
    for (int64_t r = 0; r < B; r++) {
        quantize_x(x + r * K, K, xq + r * K, xd + r * nb);
        for (int64_t j = 0; j < ng; j++) { /* group sums of the x the rows will see */
            float s = 0.0f;
            for (int64_t k = j * g; k < (j + 1) * g; k++) s += xd[r * nb + k / QB] * (float)xq[r * K + k];
            xs[r * ng + j] = s;
        }
    }
    qctx_t c = {d, x, xq, xd, xs, B, NULL, NULL, NULL};
    rows_fn fn = kind == KIND_INT8 ? int8_dot_rows : int4_dot_rows;
    void *wide = NULL;
#if QG_512
    if (K % 64 == 0 && (kind == KIND_INT8 || g % 64 == 0) && (wide = malloc((size_t)(B * (K + K / 4 * 4)) + 64))) {
        uint8_t *xu = wide;
        float *sv = (float *)(xu + B * K);
        for (int64_t r = 0; r < B; r++) prepare_512((int)kind, xq + r * K, xd + r * nb, K, xu + r * K, sv + r * (K / 4));
        c.xu = xu, c.sv = sv;
        fn = kind == KIND_INT8 ? int8_dot512_rows : int4_dot512_rows;
    }
#endif
    gemv_pool_run(fn, NULL, &c, y, 0, N, K, B * (kind == KIND_INT8 ? K : K / 2 + 3 * (K / g)));
    free(wide);
    free(buf);
    return 0;
}

/*
 * y (B, N) = x (B, K) W^T for B fp32 rows of x, up to MAXB per pass over the weights. Returns 0,
 * -1 for a descriptor it cannot run (unknown kind, shapes the format does not allow), -2 when
 * out of memory.
 */
int qlinear_run_rows(const int64_t *d, const float *x, float *y, int64_t B) {
    const int64_t kind = d[0], N = d[4], K = d[5], g = d[6];
    if (N < 0 || K <= 0 || B < 0) return -1;
    if (kind == KIND_INT4 && ((g != 32 && g != 64 && g != 128) || K % g)) return -1;
    if (kind == KIND_INT8_P16) {
#if QG_512
        if (N % 16 || K % QB) return -1;
        return N && B ? run_packed(d, x, y, B) : 0;
#else
        return -1;
#endif
    }
    if (kind != KIND_INT8 && kind != KIND_INT4) return -1;
    if (N == 0) return 0;
    for (int64_t r = 0; r < B; r += MAXB) {
        int rc = run_pass(d, x + r * K, y + r * N, B - r < MAXB ? B - r : MAXB);
        if (rc) return rc;
    }
    return 0;
}

/* One row of x (the fused step's original entry). */
int qlinear_run(const int64_t *d, const float *x, float *y) { return qlinear_run_rows(d, x, y, 1); }
