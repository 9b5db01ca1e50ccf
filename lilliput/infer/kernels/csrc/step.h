/*
 * The fused step's private header: what llama_step.c shares with the recurrent mixers it runs
 * (mamba_step.c, mlstm_step.c): the call's tokens grouped by row, the snapshot rule, the vector
 * exponential and SiLU. The library's interface is lilliput.h.
 */
#ifndef LILLIPUT_STEP_H
#define LILLIPUT_STEP_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "lilliput.h"

#define MAX_TOK 64 /* tokens per call */

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));

/* The call's tokens grouped by cache row, for mixers whose state advances one token at a time:
 * group i is row row[i], its len[i] tokens tok[first[i]], tok[first[i] + 1], ... in position order. */
typedef struct {
    int64_t n;
    int64_t row[MAX_TOK], first[MAX_TOK], len[MAX_TOK];
    int64_t tok[MAX_TOK];
} step_rows_t;

/* Snapshots (lilliput.h): of a row's T tokens in the call, the last w = min(T, n_snap) are kept.
 * snap_before: whether the state before token j goes to slot 0; snap_after: the slot that takes the
 * state after token j (-1: none; never the last token's: that is the state itself). */
static inline int snap_before(int64_t j, int64_t T, int64_t n_snap) {
    const int64_t w = T < n_snap ? T : n_snap;
    return w > 0 && j == T - w;
}

static inline int64_t snap_after(int64_t j, int64_t T, int64_t n_snap) {
    const int64_t w = T < n_snap ? T : n_snap;
    return w > 0 && j >= T - w && j < T - 1 ? j - (T - w) + 1 : -1;
}

/* e^x for 8 floats with x <= 0 (softmax scores minus their max): 2^n e^r with n = round(x / ln 2),
 * |r| <= ln 2 / 2 and e^r by its Taylor series to r^7 (relative error about one ulp); x below -87
 * gives 0. A scalar expf per score cost ~1 ms per token at 200 tokens of context. */
static inline v8 exp_v8(v8 x) {
    const v8 lo = (v8){0} - 87.0f, log2e = (v8){0} + 1.44269504f, shift = (v8){0} + 12582912.0f;
    const v8 ln2_hi = (v8){0} + 0.693359375f, ln2_lo = (v8){0} - 2.12194440e-4f;
    const vi8 under = x < lo;
    x = (v8)(((vi8)x & ~under) | ((vi8)lo & under));
    const v8 n = (x * log2e + shift) - shift; /* round to nearest */
    const v8 r = (x - n * ln2_hi) - n * ln2_lo;
    v8 p = (v8){0} + 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const vi8 bits = (__builtin_convertvector(n, vi8) + 127) << 23;
    return (v8)((vi8)(p * (v8)bits) & ~under);
}

/* o = silu(g) * u over n values (u NULL: silu(g)): g sigmoid(g), sigmoid from e = e^-|g| (exp_v8's
 * range) as 1 / (1 + e) for g >= 0 and e / (1 + e) below. A scalar expf per value (46k per token)
 * cost ~0.4 ms of an 8.4 ms batch-1 step. o may be g or u itself, or lie below g by at least 8
 * floats (the step compacts rows in place). */
static inline void silu_mul(const float *g, const float *u, float *o, int64_t n) {
    int64_t i = 0;
    const v8 one = (v8){0} + 1.0f;
    for (; i + 8 <= n; i += 8) {
        v8 gv, uv = one;
        memcpy(&gv, g + i, sizeof gv);
        if (u) memcpy(&uv, u + i, sizeof uv);
        const vi8 neg = gv < 0;
        const v8 e = exp_v8((v8)((vi8)gv | ((vi8){0} + (-2147483647 - 1)))); /* -|g|: the sign bit set */
        const v8 num = (v8)(((vi8)e & neg) | ((vi8)one & ~neg));
        const v8 r = gv * num / (one + e) * uv;
        memcpy(o + i, &r, sizeof r);
    }
    for (; i < n; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * (u ? u[i] : 1.0f);
}

/* Work items of a recurrent state update on the GEMV pool: one chunk when the whole update is small
 * (below ~64k multiply-adds a second thread costs more than it saves), else ~4 chunks per thread. */
static inline int64_t state_chunk(int64_t items, int64_t work) {
    if (work < 65536) return items;
    const int64_t c = items / (4 * (int64_t)gemv_get_threads());
    return c < 1 ? 1 : c;
}

/* The recurrent mixers: in (n_tok, dim), already normed -> out (n_tok, dim), advancing each row's
 * state (and its snapshots) token by token; buf: *_scratch_floats() floats. 0, or linear_run's code. */
int64_t mamba_scratch_floats(const step_args_t *a, int64_t n);
int mamba_mix(const step_args_t *a, const layer_t *ly, const step_rows_t *g, const float *in, float *out, float *buf);
int64_t mlstm_scratch_floats(const step_args_t *a, int64_t n);
int mlstm_mix(const step_args_t *a, const layer_t *ly, const step_rows_t *g, const float *in, float *out, float *buf);

#endif
