/*
 * Quantized matrix-vector products for batch-1 CPU decode: y[n] = sum_k x[k] * W[n, k] with W
 * stored as int8 (per output channel, symmetric) or int4 (per group of columns, asymmetric).
 *
 * A layer arrives as a `linear_t` (lilliput.h, which documents the formats of each ll_kind):
 * LL_KIND_INT8 and LL_KIND_INT4 row-major (qgemv_int8.c, qgemv_int4.c) and LL_KIND_INT8_BATCH,
 * int8 in the batch layout of AVX2 and AVX-512 VNNI builds (qgemv_int8.c, int8p8_tile, int8p_tile), into which
 * compress/qlinear.py repacks int8 layers in place when this build has it (qgemv_int8_pack()).
 * int4's byte order is llama.cpp's Q4 order, so one 16-byte load unpacks to 32 columns in order.
 * `variant` (ll_variant) picks the arithmetic: the fastest (measured in bench/quantize.py: the
 * integer dot products), widening the weights to fp32, or the integer dot products.
 *
 * This file: preparing x (int8 blocks), choosing the path, and `linear_run`, the one entry for
 * every kind of layer (fp32/bf16 go to gemv()).
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
 * sequences, or k + 1 tokens being verified), each weight row loaded once for all of them (LL_KIND_INT8_BATCH:
 * any number of rows in one pass, 8 at a time per group of 16 weight rows). Each
 * row of x goes through exactly the arithmetic it would get alone, so a sequence's logits do not
 * depend on what else is in the batch.
 *
 * Rows are spread over the pthread pool of gemv.c (gemv_pool_run). Without AVX2 the same
 * formulas run as scalar C.
 */
#include "qgemv.h"

#if QG_512
/*
 * x for the 512-bit paths, per 64 columns. int8: xu = xq + 128 in column order; sv lanes 0-7
 * take block 0's scale, 8-15 block 1's. int4: the 32 packed bytes unpack (low nibbles of all
 * 32 bytes, then high nibbles) to columns [0-15 | 32-47 | 16-31 | 48-63], so x is stored in that
 * order and sv gives lanes 0-3 and 8-11 block 0's scale, 4-7 and 12-15 block 1's.
 */
void qgemv_prepare_512(int kind, const int8_t *xq, const float *xd, int64_t K, uint8_t *xu, float *sv) {
    for (int64_t j = 0; j < K / 64; j++) {
        const int8_t *q = xq + j * 64;
        uint8_t *o = xu + j * 64;
        float *v = sv + j * 16;
        const float d0 = xd[2 * j], d1 = xd[2 * j + 1];
        if (kind == LL_KIND_INT8) {
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
void qgemv_quantize_x(const float *x, int64_t K, int8_t *xq, float *xd) {
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

/* Weight rows per group of the packed int8 layout (LL_KIND_INT8_BATCH) this build runs: 16 with AVX-512
 * VNNI, 8 with AVX2; 0: none (no AVX2), int8 layers stay row-major (LL_KIND_INT8). */
int qgemv_int8_pack(void) { return QG_512 ? 16 : QG_AVX2 ? 8 : 0; }

/* Weight rows per group of the packed int4 layout (LL_KIND_INT4_BATCH); 0: none (no AVX2). */
int qgemv_int4_pack(void) { return QG_AVX2 ? 8 : 0; }

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

/* x (B, K) for the integer dot paths, in one block: xd (B, K / 32) block scales, xs (B, K / g) sums
 * of the x the rows will see over each group of g columns (g = 0: none), then xq (B, K) int8.
 * NULL when out of memory; the caller frees it. */
void *qgemv_prepare_x(const float *x, int64_t B, int64_t K, int64_t g) {
    const int64_t nb = K / QB, ng = g ? K / g : 0;
    void *buf = malloc((size_t)(B * (K + 4 * (nb + ng))) + 64);
    if (!buf) return NULL;
    float *xd = buf, *xs = xd + B * nb;
    int8_t *xq = (int8_t *)(xs + B * ng);
    for (int64_t r = 0; r < B; r++) {
        qgemv_quantize_x(x + r * K, K, xq + r * K, xd + r * nb);
        for (int64_t j = 0; j < ng; j++) {
            float s = 0.0f;
            for (int64_t k = j * g; k < (j + 1) * g; k++) s += xd[r * nb + k / QB] * (float)xq[r * K + k];
            xs[r * ng + j] = s;
        }
    }
    return buf;
}

/* One pass of B <= MAXB rows: x (B, K) fp32 -> y (B, N). */
static int run_pass(const linear_t *d, const float *x, float *y, int64_t B) {
    const int64_t kind = d->kind, N = d->n, K = d->k, g = d->group, var = d->variant;
    int dot = var == LL_VARIANT_DOT || (var == LL_VARIANT_AUTO && QG_AVX2);
    if (kind == LL_KIND_INT8 && K % QB) dot = 0;
    if (!dot) { /* the widening paths take one row of x at a time */
        for (int64_t r = 0; r < B; r++) {
            qctx_t c = {d, x + r * K, NULL, NULL, NULL, 1, NULL, NULL, NULL};
            float *xs = NULL;
            if (kind == LL_KIND_INT4) {
                xs = malloc(sizeof(float) * (size_t)(K / g));
                if (!xs) return -2;
                for (int64_t j = 0; j < K / g; j++) {
                    float s = 0.0f;
                    for (int64_t k = j * g; k < (j + 1) * g; k++) s += x[r * K + k];
                    xs[j] = s;
                }
                c.xs = xs;
            }
            gemv_pool_run(kind == LL_KIND_INT8 ? int8_widen_rows : int4_widen_rows, NULL, &c, y + r * N, 0, N, K,
                          kind == LL_KIND_INT8 ? K : K / 2 + 3 * (K / g));
            free(xs);
        }
        return 0;
    }
    void *buf = qgemv_prepare_x(x, B, K, kind == LL_KIND_INT4 ? g : 0);
    if (!buf) return -2;
    qctx_t c = prepared_ctx(d, x, B, buf);
    rows_fn fn = kind == LL_KIND_INT8 ? int8_dot_rows : int4_dot_rows;
    void *wide = NULL;
#if QG_512
    const int64_t nb = K / QB;
    const float *xd = c.xd;
    const int8_t *xq = c.xq;
    if (K % 64 == 0 && (kind == LL_KIND_INT8 || g % 64 == 0) && (wide = malloc((size_t)(B * (K + K / 4 * 4)) + 64))) {
        uint8_t *xu = wide;
        float *sv = (float *)(xu + B * K);
        for (int64_t r = 0; r < B; r++) qgemv_prepare_512((int)kind, xq + r * K, xd + r * nb, K, xu + r * K, sv + r * (K / 4));
        c.xu = xu, c.sv = sv;
        fn = kind == LL_KIND_INT8 ? int8_dot512_rows : int4_dot512_rows;
    }
#endif
    gemv_pool_run(fn, NULL, &c, y, 0, N, K, B * (kind == LL_KIND_INT8 ? K : K / 2 + 3 * (K / g)));
    free(wide);
    free(buf);
    return 0;
}

/*
 * y (B, N) = x (B, K) W^T for B fp32 rows of x, up to MAXB per pass over the weights. Returns 0,
 * -1 for a descriptor it cannot run (unknown kind, shapes the format does not allow), -2 when
 * out of memory.
 */
int qlinear_run_rows(const linear_t *d, const float *x, float *y, int64_t B) {
    const int64_t kind = d->kind, N = d->n, K = d->k, g = d->group;
    if (N < 0 || K <= 0 || B < 0) return -1;
    if ((kind == LL_KIND_INT4 || kind == LL_KIND_INT4_BATCH) && ((g != 32 && g != 64 && g != 128) || K % g)) return -1;
    if (kind == LL_KIND_INT4_BATCH) {
#if QG_AVX2
        if (N % 8) return -1;
        return N && B ? qgemv_run_packed4(d, x, y, B) : 0;
#else
        return -1;
#endif
    }
    if (kind == LL_KIND_INT8_BATCH) {
#if QG_AVX2
        if (g != qgemv_int8_pack() || N % g || K % QB) return -1; /* packed for another build */
        return N && B ? qgemv_run_packed(d, x, y, B) : 0;
#else
        return -1;
#endif
    }
    if (kind != LL_KIND_INT8 && kind != LL_KIND_INT4) return -1;
    if (N == 0) return 0;
    for (int64_t r = 0; r < B; r += MAXB) {
        int rc = run_pass(d, x + r * K, y + r * N, B - r < MAXB ? B - r : MAXB);
        if (rc) return rc;
    }
    return 0;
}

/* y (B, N) = x (B, K) W^T + bias for any kind: fp32 / bf16 weights through gemv(), MAXB rows at a time. */
int linear_run(const linear_t *d, const float *x, float *y, int64_t B) {
    if (d->kind != LL_KIND_F32 && d->kind != LL_KIND_BF16) {
        const int rc = qlinear_run_rows(d, x, y, B);
        if (rc) return rc;
    } else {
        for (int64_t i = 0; i < B; i += MAXB) {
            const int64_t b = B - i < MAXB ? B - i : MAXB;
            const int rc = gemv(x + i * d->k, LL_DT_F32, d->weight, (int)d->kind, y + i * d->n, LL_DT_F32, b, d->n, d->k);
            if (rc) return rc;
        }
    }
    if (d->bias)
        for (int64_t r = 0; r < B; r++)
            for (int64_t n = 0; n < d->n; n++) y[r * d->n + n] += d->bias[n];
    return 0;
}
