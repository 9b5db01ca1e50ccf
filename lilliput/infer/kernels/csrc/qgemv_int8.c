/*
 * int8 weights (LL_KIND_INT8 row-major, LL_KIND_INT8_BATCH the batch layout): the widening path,
 * the integer dot products (AVX2 maddubs or VNNI, 256- and 512-bit) and the batch layout's
 * kernel. Formats and paths: qgemv.c.
 */
#include "qgemv.h"

/* ------------------------------------------------------------------ int8 rows */

void int8_widen_rows(const float *unused, const void *ctx, void *yv, int ydt, int64_t N,
                            int64_t K, int64_t n0, int64_t n1) {
    (void)unused, (void)ydt, (void)N;
    const qctx_t *c = ctx;
    const int8_t *w = (const int8_t *)c->d->weight;
    const float *scale = (const float *)c->d->scale, *x = c->x;
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

#ifndef AVX2_PREFETCH
#define AVX2_PREFETCH 4096 /* bytes ahead in the weight stream (one 64-byte line per two blocks) */
#endif

/* Weight rows [n0, n1) against B rows of int8 x. Per row of x: blocks alternate between two
 * accumulators (even, odd), the same for every B, so each row's result is independent of B. */
static inline __attribute__((always_inline)) void int8_dot_impl(const qctx_t *c, float *y, int64_t N, int64_t K,
                                                                 int64_t n0, int64_t n1, const int B) {
    const int8_t *w = (const int8_t *)c->d->weight, *xq = c->xq;
    const float *scale = (const float *)c->d->scale, *xd = c->xd;
    const int64_t nb = K / QB;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *wr = w + n * K;
#if QG_AVX2
        __m256 a0[MAXB], a1[MAXB];
        for (int r = 0; r < B; r++) a0[r] = a1[r] = _mm256_setzero_ps();
        int64_t b = 0;
        for (; b + 2 <= nb; b += 2) {
            _mm_prefetch((const char *)(wr + b * QB) + AVX2_PREFETCH, _MM_HINT_T0);
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
    const int8_t *w = (const int8_t *)c->d->weight;
    const float *scale = (const float *)c->d->scale, *sv = c->sv;
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

#endif

DOT_FNS(int8_dot_impl, int8_dot_rows)
#if QG_512
DOT_FNS(int8_dot512_impl, int8_dot512_rows)
#endif

#if QG_AVX2
#if QG_512
/*
 * Packed int8 (LL_KIND_INT8_BATCH), the layout for batches: weight rows in groups of 16, each group's K
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
    const __m512 sc = _mm512_loadu_ps((const float *)c->d->scale + n0);
    for (int r = 0; r < R; r++) _mm512_storeu_ps(y + (r0 + r) * N + n0, _mm512_mul_ps(acc[r], sc));
}
#endif

/*
 * The same layout with groups of 8 rows for AVX2 builds without AVX-512 VNNI (qgemv_int8_pack()
 * says 8): run j is 32 bytes, columns 4j..4j+3 of the group's 8 rows. AVX2 has no unsigned x
 * signed byte product that cannot saturate at these ranges ((w + 128) x reaches 2 * 255 * 127 in
 * an int16 pair), so the sign moves as in the row-major path: |w| of a run (once, shared by the
 * tile's rows) times sign(w) x (x's 4 bytes broadcast), one maddubs + madd per run and row of x
 * (32 products), where the row-major path also converts and scales per weight row and 32
 * columns. A block's 8 runs leave every int32 lane holding one weight row's whole block sum, so
 * x's block scale applies once per 8 rows. 4 rows of x per tile (16 ymm registers). Measured on
 * 2 Zen 3 cores: |x| broadcast against sign(x) w per row was ~10% slower (one more load per row).
 */
#if QG_AVX2 && !QG_512
#ifndef P8_TILE
#define P8_TILE 4
#endif
static inline __attribute__((always_inline)) void int8p8_tile(const qctx_t *c, const uint8_t *wg, float *y,
                                                              int64_t N, int64_t K, int64_t n0, int64_t r0,
                                                              const int R) {
    const int64_t nb = K / QB;
    const int8_t *xq = c->xq;
    const float *xd = c->xd;
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    __m256 acc[P8_TILE];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = wg + b * 8 * 32;
        for (int l = 0; l < 4; l++) _mm_prefetch((const char *)wb + AVX2_PREFETCH + 64 * l, _MM_HINT_T0);
        __m256i ia[P8_TILE];
        for (int r = 0; r < R; r++) ia[r] = _mm256_setzero_si256();
        for (int q = 0; q < 8; q++) {
            const __m256i w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wb + q * 32)), flip);
            const __m256i u = _mm256_abs_epi8(w);
            for (int r = 0; r < R; r++) {
                int32_t x4;
                memcpy(&x4, xq + (r0 + r) * K + b * QB + 4 * q, 4);
                const __m256i s = _mm256_sign_epi8(_mm256_set1_epi32(x4), w);
                ia[r] = _mm256_add_epi32(ia[r], _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones));
            }
        }
        for (int r = 0; r < R; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[r]), _mm256_set1_ps(xd[(r0 + r) * nb + b]), acc[r]);
    }
    const __m256 sc = _mm256_loadu_ps((const float *)c->d->scale + n0);
    for (int r = 0; r < R; r++) _mm256_storeu_ps(y + (r0 + r) * N + n0, _mm256_mul_ps(acc[r], sc));
}
#endif

/* Groups [g0, g1) of G weight rows (16 or 8, qgemv_int8_pack()) against all B rows of x. */
static void int8p_groups(const float *unused, const void *ctx, void *yv, int ydt, int64_t N, int64_t K,
                         int64_t g0, int64_t g1) {
    (void)unused, (void)ydt, (void)N;
    const qctx_t *c = ctx;
    const uint8_t *w = (const uint8_t *)c->d->weight;
    const int64_t n = c->d->n;
#if QG_512
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
#else
    for (int64_t gi = g0; gi < g1; gi++) {
        const uint8_t *wg = w + gi * 8 * K;
        for (int64_t r0 = 0; r0 < c->B; r0 += P8_TILE) {
            switch (c->B - r0 < P8_TILE ? c->B - r0 : P8_TILE) {
            case 1: int8p8_tile(c, wg, yv, n, K, gi * 8, r0, 1); break;
            case 2: int8p8_tile(c, wg, yv, n, K, gi * 8, r0, 2); break;
            case 3: int8p8_tile(c, wg, yv, n, K, gi * 8, r0, 3); break;
#if P8_TILE > 4
            case 4: int8p8_tile(c, wg, yv, n, K, gi * 8, r0, 4); break;
            case 5: int8p8_tile(c, wg, yv, n, K, gi * 8, r0, 5); break;
#endif
#if P8_TILE > 6
            case 6: int8p8_tile(c, wg, yv, n, K, gi * 8, r0, 6); break;
            case 7: int8p8_tile(c, wg, yv, n, K, gi * 8, r0, 7); break;
#endif
            default: int8p8_tile(c, wg, yv, n, K, gi * 8, r0, P8_TILE); break;
            }
        }
    }
#endif
}

/* y (B, N) for the packed layout: x quantized once, all B rows in one pass over the weights. */
int qgemv_run_packed(const linear_t *d, const float *x, float *y, int64_t B) {
    const int64_t N = d->n, K = d->k, G = qgemv_int8_pack();
    void *buf = qgemv_prepare_x(x, B, K, 0);
    if (!buf) return -2;
    qctx_t c = prepared_ctx(d, x, B, buf);
#if QG_512
    const int64_t nb = K / QB;
    int32_t *xc = malloc(sizeof(int32_t) * (size_t)(B * nb));
    if (!xc) {
        free(buf);
        return -2;
    }
    for (int64_t r = 0; r < B; r++)
        for (int64_t b = 0; b < nb; b++) { /* -128 sum(x) over the block: byte pairs, then int16 pairs, then the 8 lanes */
            const __m256i q = _mm256_loadu_si256((const __m256i *)(c.xq + r * K + b * QB));
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), q), _mm256_set1_epi16(1));
            __m128i h = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
            xc[r * nb + b] = -128 * _mm_cvtsi128_si32(h);
        }
    c.xc = xc;
#endif
    const int64_t groups = N / G, threads = gemv_get_threads();
    /* about 4 chunks per thread; one thread when the whole product is small */
    int64_t chunk = groups / (4 * threads);
    if (N * K * (B < 4 ? B : 4) < 2 * 96 * 1024) chunk = groups;
    gemv_pool_items(int8p_groups, &c, y, groups, K, chunk < 1 ? 1 : chunk);
#if QG_512
    free(xc);
#endif
    free(buf);
    return 0;
}
#endif
