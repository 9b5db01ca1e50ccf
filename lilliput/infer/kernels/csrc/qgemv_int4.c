/*
 * int4 weights (LL_KIND_INT4: per group of columns, asymmetric, two codes a byte): the widening
 * path and the integer dot products (AVX2 maddubs or VNNI, 256- and 512-bit). Formats and paths:
 * qgemv.c.
 */
#include "qgemv.h"

/* ------------------------------------------------------------------ int4 rows */

void int4_widen_rows(const float *unused, const void *ctx, void *yv, int ydt, int64_t N,
                            int64_t K, int64_t n0, int64_t n1) {
    (void)unused, (void)ydt, (void)N;
    const qctx_t *c = ctx;
    const uint8_t *w = (const uint8_t *)c->d->weight, *zero = (const uint8_t *)c->d->zero;
    const uint16_t *scale = (const uint16_t *)c->d->scale;
    const int64_t g = c->d->group, ng = K / g, bpg = g / QB;
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
    const uint8_t *w = (const uint8_t *)c->d->weight, *zero = (const uint8_t *)c->d->zero;
    const uint16_t *scale = (const uint16_t *)c->d->scale;
    const int64_t g = c->d->group, ng = K / g, bpg = g / QB, nb = K / QB;
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
#define PREFETCH 4096 /* bytes ahead in the weight stream (see qgemv_int8.c) */
#endif
static inline __attribute__((always_inline)) void int4_dot512_impl(const qctx_t *c, float *y, int64_t N, int64_t K,
                                                                    int64_t n0, int64_t n1, const int B) {
    const uint8_t *w = (const uint8_t *)c->d->weight, *zero = (const uint8_t *)c->d->zero;
    const uint16_t *scale = (const uint16_t *)c->d->scale;
    const int64_t g = c->d->group, ng = K / g, qpg = g / 64, nq = K / 64;
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

DOT_FNS(int4_dot_impl, int4_dot_rows)
#if QG_512
DOT_FNS(int4_dot512_impl, int4_dot512_rows)
#endif
