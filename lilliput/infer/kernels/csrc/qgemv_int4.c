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

/*
 * Packed int4 (LL_KIND_INT4_BATCH), the batch layout for batches and prompt chunks in AVX2 builds
 * (and every newer one): weight rows in groups of 8; per block of 32 columns, 4 chunks of 32
 * bytes, chunk p holding run 2p in its low nibbles and run 2p + 1 in its high nibbles, run j
 * being columns 4j..4j+3 of the group's 8 rows (row i at bytes 4i..4i+3). Scales (fp16) and
 * zeros (uint8) as (N / 8, K / group, 8). The codes are unsigned, so `maddubs` of a run against
 * x's 4 bytes broadcast cannot saturate (2 * 15 * 127 per int16 pair) and a block's 8 runs add
 * up in int16 (8 * 3810 < 32767): one maddubs + one add per run and row of x (32 products), and
 * one madd, convert and FMA per block and row of x for all 8 weight rows. The group's scale and
 * zero then apply once per group for 8 rows: y += scale (sum_b xd_b dot_b - zero * xs). Weights
 * read once per call for any number of rows of x (4 at a time per group, from L1 after the
 * first); the accumulators live in y. Per row of x the arithmetic is the same for every B.
 */
#if QG_AVX2
#ifndef P4_PREFETCH
#define P4_PREFETCH 4096 /* bytes ahead in the weight stream */
#endif
#define P4_TILE 4
static inline __attribute__((always_inline)) void int4p_tile(const qctx_t *c, int64_t gi, float *y, int64_t N,
                                                             int64_t K, int64_t r0, const int R) {
    const int64_t g = c->d->group, ng = K / g, bpg = g / QB, nb = K / QB;
    const uint8_t *wg = (const uint8_t *)c->d->weight + gi * 4 * K;
    const uint16_t *sg = (const uint16_t *)c->d->scale + gi * 8 * ng;
    const uint8_t *zg = (const uint8_t *)c->d->zero + gi * 8 * ng;
    const int8_t *xq = c->xq;
    const float *xd = c->xd, *xs = c->xs;
    const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    float *yg = y + gi * 8;
    for (int r = 0; r < R; r++) _mm256_storeu_ps(yg + (r0 + r) * N, _mm256_setzero_ps());
    for (int64_t j = 0; j < ng; j++) {
        __m256 gs[P4_TILE];
        for (int r = 0; r < R; r++) gs[r] = _mm256_setzero_ps();
        for (int64_t b = j * bpg; b < (j + 1) * bpg; b++) {
            const uint8_t *wb = wg + b * 128;
            _mm_prefetch((const char *)wb + P4_PREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char *)wb + P4_PREFETCH + 64, _MM_HINT_T0);
            __m256i i16[P4_TILE];
            for (int r = 0; r < R; r++) i16[r] = _mm256_setzero_si256();
            for (int p = 0; p < 4; p++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(wb + 32 * p));
                const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                for (int r = 0; r < R; r++) {
                    int32_t x0, x1;
                    memcpy(&x0, xq + (r0 + r) * K + b * QB + 8 * p, 4);
                    memcpy(&x1, xq + (r0 + r) * K + b * QB + 8 * p + 4, 4);
                    i16[r] = _mm256_add_epi16(i16[r], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(x0)));
                    i16[r] = _mm256_add_epi16(i16[r], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x1)));
                }
            }
            for (int r = 0; r < R; r++)
                gs[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(i16[r], ones)),
                                        _mm256_set1_ps(xd[(r0 + r) * nb + b]), gs[r]);
        }
        const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sg + j * 8)));
        const __m256 zf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zg + j * 8))));
        for (int r = 0; r < R; r++) {
            float *yr = yg + (r0 + r) * N;
            const __m256 t = _mm256_fnmadd_ps(zf, _mm256_set1_ps(xs[(r0 + r) * ng + j]), gs[r]);
            _mm256_storeu_ps(yr, _mm256_fmadd_ps(t, sc, _mm256_loadu_ps(yr)));
        }
    }
}

/* Groups [g0, g1) of 8 weight rows against all B rows of x. */
static void int4p_groups(const float *unused, const void *ctx, void *yv, int ydt, int64_t N, int64_t K,
                         int64_t g0, int64_t g1) {
    (void)unused, (void)ydt, (void)N;
    const qctx_t *c = ctx;
    const int64_t n = c->d->n;
    for (int64_t gi = g0; gi < g1; gi++)
        for (int64_t r0 = 0; r0 < c->B; r0 += P4_TILE) {
            switch (c->B - r0 < P4_TILE ? c->B - r0 : P4_TILE) {
            case 1: int4p_tile(c, gi, yv, n, K, r0, 1); break;
            case 2: int4p_tile(c, gi, yv, n, K, r0, 2); break;
            case 3: int4p_tile(c, gi, yv, n, K, r0, 3); break;
            default: int4p_tile(c, gi, yv, n, K, r0, 4); break;
            }
        }
}

/* y (B, N) for the packed int4 layout: x quantized once (and its group sums as the rows see x), all
 * B rows in one pass over the weights. */
int qgemv_run_packed4(const linear_t *d, const float *x, float *y, int64_t B) {
    const int64_t N = d->n, K = d->k;
    void *buf = qgemv_prepare_x(x, B, K, d->group);
    if (!buf) return -2;
    qctx_t c = prepared_ctx(d, x, B, buf);
    const int64_t groups = N / 8, threads = gemv_get_threads();
    int64_t chunk = groups / (4 * threads);
    if (N * K * (B < 4 ? B : 4) < 4 * 96 * 1024) chunk = groups;
    gemv_pool_items(int4p_groups, &c, y, groups, K, chunk < 1 ? 1 : chunk);
    free(buf);
    return 0;
}
#endif
