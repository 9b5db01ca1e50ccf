/*
 * The parts the quantized kernels share (qgemv.c, qgemv_int8.c, qgemv_int4.c): instruction-set
 * switches, the per-call context and the small vector helpers. Private to those files; the
 * library's interface is lilliput.h.
 */
#ifndef LILLIPUT_QGEMV_H
#define LILLIPUT_QGEMV_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lilliput.h"

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

#define QB 32 /* columns per int4 packing block and per int8 block of x */
#define MAXB 8 /* rows of x per pass over the weights */
#define QG_HIDDEN __attribute__((visibility("hidden")))

typedef struct {
    const linear_t *d; /* the descriptor */
    const float *x;     /* fp32 x (K,) */
    const int8_t *xq;   /* x quantized per block of 32 (K,) */
    const float *xd;    /* scale of each block of xq (K / 32,) */
    const float *xs;    /* int4: sum of x over each group (exact x for widen, dequantized xq for dot) */
    int64_t B;          /* rows of x (dot paths): xq (B, K), xd (B, K / 32), xs (B, K / group) */
    const uint8_t *xu;  /* 512-bit paths: x + 128 as unsigned bytes (B, K), int4's in lane order */
    const float *sv;    /* 512-bit paths: x's block scales per fp32 lane, 16 per 64 columns (B, K / 4) */
    const int32_t *xc;  /* packed int8, AVX-512: -128 * sum of xq over each block of 32 (B, K / 32) */
} qctx_t;

static inline float half_to_float(uint16_t h) {
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

#define DOT_FNS(IMPL, NAME)                                                                        \
    void NAME(const float *unused, const void *ctx, void *y, int ydt, int64_t N, int64_t K,  \
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

/* x (K,) -> int8 blocks of 32 with one scale each (K % 32 == 0); qgemv.c */
QG_HIDDEN void qgemv_quantize_x(const float *x, int64_t K, int8_t *xq, float *xd);
/* x (B, K) quantized, with its group sums (g columns; 0: none), in one malloc'd block; qgemv.c */
QG_HIDDEN void *qgemv_prepare_x(const float *x, int64_t B, int64_t K, int64_t g);

/* The context of a block from qgemv_prepare_x (its g = d->group for int4 kinds, else 0). */
static inline qctx_t prepared_ctx(const linear_t *d, const float *x, int64_t B, void *buf) {
    const int64_t K = d->k, nb = K / QB;
    const int int4 = d->kind == LL_KIND_INT4 || d->kind == LL_KIND_INT4_BATCH;
    const float *xd = buf, *xs = xd + B * nb;
    const int8_t *xq = (const int8_t *)(xs + (int4 ? B * (K / d->group) : 0));
    qctx_t c = {d, x, xq, xd, int4 ? xs : NULL, B, NULL, NULL, NULL};
    return c;
}
#if QG_512
/* x for the 512-bit paths (qgemv.c) */
QG_HIDDEN void qgemv_prepare_512(int kind, const int8_t *xq, const float *xd, int64_t K, uint8_t *xu, float *sv);
#endif

/* qgemv_int8.c */
QG_HIDDEN void int8_widen_rows(const float *unused, const void *ctx, void *y, int ydt, int64_t N, int64_t K,
                               int64_t n0, int64_t n1);
QG_HIDDEN void int8_dot_rows(const float *unused, const void *ctx, void *y, int ydt, int64_t N, int64_t K,
                             int64_t n0, int64_t n1);
#if QG_512
QG_HIDDEN void int8_dot512_rows(const float *unused, const void *ctx, void *y, int ydt, int64_t N, int64_t K,
                                int64_t n0, int64_t n1);
#endif
#if QG_AVX2
QG_HIDDEN int qgemv_run_packed(const linear_t *d, const float *x, float *y, int64_t B);
QG_HIDDEN int qgemv_run_packed4(const linear_t *d, const float *x, float *y, int64_t B);
#endif

/* qgemv_int4.c */
QG_HIDDEN void int4_widen_rows(const float *unused, const void *ctx, void *y, int ydt, int64_t N, int64_t K,
                               int64_t n0, int64_t n1);
QG_HIDDEN void int4_dot_rows(const float *unused, const void *ctx, void *y, int ydt, int64_t N, int64_t K,
                             int64_t n0, int64_t n1);
#if QG_512
QG_HIDDEN void int4_dot512_rows(const float *unused, const void *ctx, void *y, int ydt, int64_t N, int64_t K,
                                int64_t n0, int64_t n1);
#endif

#endif
