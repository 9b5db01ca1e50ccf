/*
 * One forward of a decoder (RMSNorm, RoPE rotate-half, grouped-query attention, a gated or MoE
 * feed-forward) for a handful of tokens, entirely in C: the torch version spends ~7 ms per token of
 * a 30-layer model in op dispatch alone, a quarter of the step. The families' switches (core/model.py
 * is the reference): biases (in each linear_t), qk-norm per head or over the projection, pre- and
 * post-norms (a NULL norm is skipped; weights arrive as offset + weight), SiLU or tanh-GELU gates,
 * a softmax scale and soft-capped scores and logits, sliding-window layers, per-layer rotary tables
 * (partial rotary: the first rot_dim values of each head; none: NoPE), and MoE layers whose experts
 * each run once per call over the tokens routed to them. A layer's mixer is attention (here), Mamba-2
 * (mamba_step.c) or the mLSTM (mlstm_step.c): hybrids mix them layer by layer (layer_t.mixer).
 *
 * The n tokens of a call each belong to a row of the KV cache at a position of their own: B
 * sequences decoding one token each (continuous batching), or the k + 1 tokens of one sequence
 * being verified after drafting (speculative decoding), or any mix. Every weight matrix is read
 * once per call for all n tokens (the GEMV kernels take up to 8 right-hand sides; more are
 * taken 8 at a time). Tokens of one row must come in position order: a token attends to its
 * row's keys up to its own position, written by this call's earlier tokens or by earlier calls.
 * A recurrent layer's state advances through a row's tokens in call order, so in a model with one
 * a row's tokens must also sit at consecutive positions (any other call is refused, -2).
 *
 * Arguments come in one struct, `step_args_t` (lilliput.h, mirrored and checked at load by
 * infer/kernels/abi.py); every linear layer is a `linear_t` run by linear_run() (qgemv.c).
 *
 * Attention runs on the GEMV thread pool, one (token, head) pair per work item.
 */
#include "step.h"

int llama_step_max_tokens(void) { return MAX_TOK; }

/* rotate-half over the first rot values of each of `heads` heads of hd values (the rest pass through) */
static void rope(float *x, const float *cos, const float *sin, int64_t heads, int64_t hd, int64_t rot) {
    const int64_t h2 = rot / 2;
    for (int64_t h = 0; h < heads; h++, x += hd)
        for (int64_t i = 0; i < h2; i++) {
            const float x1 = x[i], x2 = x[i + h2];
            x[i] = x1 * cos[i] - x2 * sin[i];
            x[i + h2] = x2 * cos[i + h2] + x1 * sin[i + h2];
        }
}

static inline float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float d = 0.0f;
    if (n % 8 == 0) {
        v8 acc = {0}, acc2 = {0};
        for (; i + 16 <= n; i += 16) {
            v8 a0, b0, a1, b1;
            memcpy(&a0, a + i, 32), memcpy(&b0, b + i, 32), memcpy(&a1, a + i + 8, 32), memcpy(&b1, b + i + 8, 32);
            acc += a0 * b0, acc2 += a1 * b1;
        }
        for (; i < n; i += 8) {
            v8 a0, b0;
            memcpy(&a0, a + i, 32), memcpy(&b0, b + i, 32);
            acc += a0 * b0;
        }
        acc += acc2;
        for (int j = 0; j < 8; j++) d += acc[j];
    }
    for (; i < n; i++) d += a[i] * b[i];
    return d;
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define STEP_DOT8 1
/* Lane r = dot(q, k + r * hd) for 8 consecutive keys (hd % 8 == 0): eight accumulators reduced
 * together by one transpose-add instead of eight horizontal sums, each a chain of dependent adds
 * (per key, those chains were most of a batch-8 step's attention). */
/* 8 cached floats from p + i: fp32, or fp16 widened (F16C) */
static inline __m256 load8_kv(const void *p, int64_t i, const int f16) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)))
               : _mm256_loadu_ps((const float *)p + i);
}

static inline __attribute__((always_inline)) __m256 dot8(const float *q, const void *k, int64_t hd, const int f16) {
    __m256 a[8];
    for (int r = 0; r < 8; r++) a[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < hd; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        for (int r = 0; r < 8; r++) a[r] = _mm256_fmadd_ps(qv, load8_kv(k, r * hd + i, f16), a[r]);
    }
    const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);
    return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}
#else
#define STEP_DOT8 0
#endif


/* o = gelu(g) * u over n values, GELU's tanh approximation (torch's approximate="tanh"):
 * 0.5 g (1 + tanh(u)) with u = sqrt(2 / pi) (g + 0.044715 g^3) and tanh(u) = sign(u) (1 - e) / (1 + e),
 * e = e^-2|u| (exp_v8's range). o may alias g as in silu_mul. */
static void gelu_mul(const float *g, const float *u, float *o, int64_t n) {
    int64_t i = 0;
    const v8 one = (v8){0} + 1.0f, half = (v8){0} + 0.5f, k0 = (v8){0} + 0.7978845608028654f,
             k1 = (v8){0} + 0.044715f;
    const vi8 sign = (vi8){0} + (-2147483647 - 1);
    for (; i + 8 <= n; i += 8) {
        v8 gv, uv;
        memcpy(&gv, g + i, sizeof gv), memcpy(&uv, u + i, sizeof uv);
        const v8 arg = k0 * (gv + k1 * gv * gv * gv);
        const v8 e = exp_v8((v8)(((vi8)arg | sign)) * 2.0f); /* e^(-2|arg|) */
        const v8 th = (v8)((vi8)((one - e) / (one + e)) | ((vi8)arg & sign));
        const v8 r = half * gv * (one + th) * uv;
        memcpy(o + i, &r, sizeof r);
    }
    for (; i < n; i++) {
        const float x = g[i];
        o[i] = 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x))) * u[i];
    }
}

/* rows of gu (m, 2 ffn) = gate | up -> act(gate) * up, compacted in place to (m, ffn) */
static void act_rows(const step_args_t *a, float *gu, int64_t m) {
    const int64_t ffn = a->ffn_dim;
    for (int64_t t = 0; t < m; t++) /* row t's outputs land below its inputs */
        if (a->act == LL_ACT_GELU_TANH)
            gelu_mul(gu + t * 2 * ffn, gu + t * 2 * ffn + ffn, gu + t * ffn, ffn);
        else
            silu_mul(gu + t * 2 * ffn, gu + t * 2 * ffn + ffn, gu + t * ffn, ffn);
}

/* The MoE feed-forward of n tokens: x (n, dim) -> out (n, dim). The router's softmax in fp32 over
 * every expert, the top_k experts of each token (the first on ties) weighted by their probabilities
 * (renormalised with norm_topk), then each expert once over all tokens routed to it (in token
 * order), its outputs added in expert order, as core/moe.py does. buf: moe_scratch_floats(). */
static int moe_ffn(const step_args_t *a, const moe_t *m, const float *x, float *out, float *gu, float *buf) {
    const int64_t n = a->n_tok, dim = a->dim, E = a->n_experts, k = a->top_k;
    float *xs = buf, *ys = xs + n * dim, *probs = ys + n * dim, *wts = probs + n * E;
    int32_t *ids = (int32_t *)(wts + n * k), *tok = ids + n * k, *slot = tok + n;
    for (int64_t t = 0; t < n; t++) {
        float *p = probs + t * E, mx = -INFINITY, sum = 0.0f;
        for (int64_t e = 0; e < E; e++) {
            double d = 0.0;
            for (int64_t i = 0; i < dim; i++) d += (double)x[t * dim + i] * m->router[e * dim + i];
            p[e] = (float)d;
            mx = p[e] > mx ? p[e] : mx;
        }
        for (int64_t e = 0; e < E; e++) sum += (p[e] = expf(p[e] - mx));
        for (int64_t e = 0; e < E; e++) p[e] /= sum;
        float tot = 0.0f;
        for (int64_t s = 0; s < k; s++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++) {
                int taken = 0;
                for (int64_t r = 0; r < s; r++) taken |= ids[t * k + r] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            ids[t * k + s] = (int32_t)best, wts[t * k + s] = p[best];
            tot += p[best];
        }
        if (a->norm_topk && k > 1)
            for (int64_t s = 0; s < k; s++) wts[t * k + s] /= tot;
    }
    memset(out, 0, sizeof(float) * n * dim);
    int rc;
    for (int64_t e = 0; e < E; e++) {
        int64_t cnt = 0;
        for (int64_t t = 0; t < n; t++)
            for (int64_t s = 0; s < k; s++)
                if (ids[t * k + s] == e) tok[cnt] = (int32_t)t, slot[cnt] = (int32_t)s, cnt++;
        if (!cnt) continue;
        for (int64_t j = 0; j < cnt; j++) memcpy(xs + j * dim, x + tok[j] * dim, sizeof(float) * dim);
        if ((rc = linear_run(m->gate_up + e, xs, gu, cnt))) return rc;
        act_rows(a, gu, cnt);
        if ((rc = linear_run(m->down + e, gu, ys, cnt))) return rc;
        for (int64_t j = 0; j < cnt; j++) {
            const float w = wts[tok[j] * k + slot[j]];
            float *o = out + tok[j] * dim;
            for (int64_t i = 0; i < dim; i++) o[i] += ys[j * dim + i] * w;
        }
    }
    return 0;
}

typedef struct {
    const step_args_t *a;
    int64_t window;   /* the layer's sliding window (0: every key) */
    const float *qkv; /* (n_tok, (nh + 2 nkv) hd), roped */
    const void *kc, *vc; /* fp32 or fp16 (a->kv_f16) */
    float *att;       /* (n_tok, nh hd) */
} attn_ctx_t;

/* q . k for one cached key (fp32, or fp16 in builds with F16C and hd % 8 == 0) */
static inline __attribute__((always_inline)) float dot_kv(const float *q, const void *k, int64_t hd, const int f16) {
#if STEP_DOT8
    if (f16) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < hd; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8_kv(k, i, 1), acc);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    }
#endif
    (void)f16;
    return dot(q, (const float *)k, hd);
}

/* Work items [n0, n1) of (token, kv head) pairs: softmax(q k^T * scale) v over the row's keys (the
 * last `window` of them in a sliding-window layer; scores soft-capped where the model caps them)
 * for the g = nh / nkv query heads that share the kv head, so each cached key and value is read
 * once for all of them (grouped-query attention). The cache is what a batched step waits for
 * (every row's keys and values, every layer): read once per group, and in fp16 half the bytes. */
static inline __attribute__((always_inline)) void attend_impl(const attn_ctx_t *c, int64_t n0, int64_t n1,
                                                              const int f16) {
    const step_args_t *a = c->a;
    const int64_t nh = a->n_heads, nkv = a->n_kv_heads, hd = a->head_dim, L = a->max_len;
    const int64_t g = nh / nkv, nqkv = (nh + 2 * nkv) * hd, row_stride = nkv * L * hd;
    const int64_t *rows = a->rows, *pos = a->pos;
    const size_t es = f16 ? 2 : 4; /* bytes per cached value */
    const float scale = a->attn_scale > 0 ? (float)a->attn_scale : 1.0f / sqrtf((float)hd);
    const float cap = (float)a->attn_softcap;
    for (int64_t item = n0; item < n1; item++) {
        const int64_t t = item / nkv, j = item % nkv;
        const int64_t first = c->window && pos[t] + 1 > c->window ? pos[t] + 1 - c->window : 0; /* first key seen */
        const int64_t S = pos[t] + 1 - first;
        const float *q = c->qkv + t * nqkv + j * g * hd; /* the group's g query heads, contiguous */
        const char *kh = (const char *)c->kc + (rows[t] * row_stride + j * L * hd + first * hd) * es;
        const char *vh = (const char *)c->vc + (rows[t] * row_stride + j * L * hd + first * hd) * es;
        float sc[g * S], inv[g]; /* sc: (g, S) */
        int64_t s0 = 0;
#if STEP_DOT8
        if (hd % 8 == 0)
            for (; s0 + 8 <= S; s0 += 8) {
                for (int64_t b = 0; b < 8 * hd * (int64_t)es; b += 64) /* the keys two blocks ahead */
                    _mm_prefetch(kh + (s0 + 16) * hd * es + b, _MM_HINT_T0);
                for (int64_t h = 0; h < g; h++)
                    _mm256_storeu_ps(sc + h * S + s0, _mm256_mul_ps(dot8(q + h * hd, kh + s0 * hd * es, hd, f16),
                                                                    _mm256_set1_ps(scale)));
            }
        for (int64_t b = 0; b < 16 * hd * (int64_t)es; b += 64) /* the first values, while the softmax runs */
            _mm_prefetch(vh + b, _MM_HINT_T0);
#endif
        for (int64_t s = s0; s < S; s++)
            for (int64_t h = 0; h < g; h++) sc[h * S + s] = dot_kv(q + h * hd, kh + s * hd * es, hd, f16) * scale;
        if (cap > 0)
            for (int64_t i = 0; i < g * S; i++) sc[i] = tanhf(sc[i] / cap) * cap;
        for (int64_t h = 0; h < g; h++) {
            float *e = sc + h * S, mx = -INFINITY, sum = 0.0f;
            for (int64_t s = 0; s < S; s++) mx = e[s] > mx ? e[s] : mx;
            int64_t s = 0;
            v8 vsum = {0};
            for (; s + 8 <= S; s += 8) {
                v8 v;
                memcpy(&v, e + s, sizeof v);
                v = exp_v8(v - mx);
                memcpy(e + s, &v, sizeof v);
                vsum += v;
            }
            for (int k = 0; k < 8; k++) sum += vsum[k];
            for (; s < S; s++) sum += (e[s] = expf(e[s] - mx));
            inv[h] = 1.0f / sum;
        }
        float *o = c->att + t * nh * hd + j * g * hd; /* (g, hd) */
        for (int64_t h = 0; h < g; h++) /* probabilities in place of the scores */
            for (int64_t s = 0; s < S; s++) sc[h * S + s] *= inv[h];
#if STEP_DOT8
        if (hd % 32 == 0) { /* 32 outputs of a head in registers over all keys: no store per key */
            for (int64_t h = 0; h < g; h++)
                for (int64_t i = 0; i < hd; i += 32) {
                    __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
                    for (int64_t s = 0; s < S; s++) {
                        const char *vr = vh + (s * hd + i) * es;
                        if (h == 0 && i == 0) /* the value row 16 keys ahead */
                            for (int64_t b = 0; b < hd * (int64_t)es; b += 64) _mm_prefetch(vr + 16 * hd * es + b, _MM_HINT_T0);
                        const __m256 p = _mm256_broadcast_ss(sc + h * S + s);
                        o0 = _mm256_fmadd_ps(p, load8_kv(vr, 0, f16), o0);
                        o1 = _mm256_fmadd_ps(p, load8_kv(vr, 8, f16), o1);
                        o2 = _mm256_fmadd_ps(p, load8_kv(vr, 16, f16), o2);
                        o3 = _mm256_fmadd_ps(p, load8_kv(vr, 24, f16), o3);
                    }
                    float *oh = o + h * hd + i;
                    _mm256_storeu_ps(oh, o0), _mm256_storeu_ps(oh + 8, o1);
                    _mm256_storeu_ps(oh + 16, o2), _mm256_storeu_ps(oh + 24, o3);
                }
            continue;
        }
#endif
        memset(o, 0, sizeof(float) * g * hd);
        for (int64_t s = 0; s < S; s++) {
            const char *vr = vh + s * hd * es;
            for (int64_t h = 0; h < g; h++) {
                const float p = sc[h * S + s];
                float *oh = o + h * hd;
#if STEP_DOT8
                if (f16) {
                    const __m256 pv = _mm256_set1_ps(p);
                    for (int64_t i = 0; i < hd; i += 8)
                        _mm256_storeu_ps(oh + i, _mm256_fmadd_ps(pv, load8_kv(vr, i, 1), _mm256_loadu_ps(oh + i)));
                    continue;
                }
#endif
                const float *vf = (const float *)vr;
                for (int64_t i = 0; i < hd; i++) oh[i] += p * vf[i];
            }
        }
    }
}

static void attend_items(const float *unused, const void *ctxv, void *unused_y, int ydt, int64_t N, int64_t K,
                         int64_t n0, int64_t n1) {
    (void)unused, (void)unused_y, (void)ydt, (void)N, (void)K;
    const attn_ctx_t *c = ctxv;
    if (c->a->kv_f16)
        attend_impl(c, n0, n1, 1);
    else
        attend_impl(c, n0, n1, 0);
}

/* Whether this build's step can keep fp16 caches for heads of hd values (F16C, hd % 8 == 0). */
int llama_step_kv_f16(int64_t hd) { return STEP_DOT8 && hd % 8 == 0; }

/* n values of x into the cache at dst (fp32, or fp16 rounded to nearest) */
static void store_kv(void *dst, const float *x, int64_t n, const int f16) {
#if STEP_DOT8
    if (f16) {
        for (int64_t i = 0; i < n; i += 8)
            _mm_storeu_si128((__m128i *)((uint16_t *)dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
        return;
    }
#endif
    (void)f16;
    memcpy(dst, x, sizeof(float) * n);
}

/* The attention mixer of layer ly over the call's n tokens: in (n, dim) -> out (n, dim), each token's
 * key and value written to its row's cache at its position. qkv, att: scratch. */
static int attention_mix(const step_args_t *a, const layer_t *ly, const float *in, float *out, float *qkv,
                         float *att) {
    const int64_t n = a->n_tok, nh = a->n_heads, nkv = a->n_kv_heads, hd = a->head_dim, L = a->max_len,
                  rot = a->rot_dim, nqkv = (nh + 2 * nkv) * hd, row_stride = nkv * L * hd;
    const int64_t *rows = a->rows, *pos = a->pos;
    const size_t es = a->kv_f16 ? 2 : 4;
    char *kc = ly->k_cache, *vc = ly->v_cache;
    int rc;
    if (a->qk_norm != LL_QK_NORM_NONE && !(ly->q_norm && ly->k_norm)) return -4;
    if (!kc || !vc) return -4;
    if ((rc = linear_run(&ly->wqkv, in, qkv, n))) return rc;
    for (int64_t t = 0; t < n; t++) {
        float *q = qkv + t * nqkv, *k = q + nh * hd;
        const float *v = k + nkv * hd;
        if (a->qk_norm == LL_QK_NORM_HEAD) {
            rmsnorm_f32(q, ly->q_norm, q, nh, hd, a->eps);
            rmsnorm_f32(k, ly->k_norm, k, nkv, hd, a->eps);
        } else if (a->qk_norm == LL_QK_NORM_PROJ) {
            rmsnorm_f32(q, ly->q_norm, q, 1, nh * hd, a->eps);
            rmsnorm_f32(k, ly->k_norm, k, 1, nkv * hd, a->eps);
        }
        if (ly->rope >= 0) /* q and k heads */
            rope(q, a->cos + (ly->rope * n + t) * rot, a->sin + (ly->rope * n + t) * rot, nh + nkv, hd, rot);
        for (int64_t j = 0; j < nkv; j++) {
            const int64_t at = (rows[t] * row_stride + (j * L + pos[t]) * hd) * es;
            store_kv(kc + at, k + j * hd, hd, (int)a->kv_f16);
            store_kv(vc + at, v + j * hd, hd, (int)a->kv_f16);
        }
    }
    attn_ctx_t ctx = {a, ly->window, qkv, kc, vc, att};
    gemv_pool_items(attend_items, &ctx, NULL, n * nkv, hd, 1);
    return linear_run(&ly->wo, att, out, n);
}

/* The call's tokens grouped by row (step.h) for the recurrent mixers: -2 when a row's tokens are not
 * at consecutive positions in call order (its state could not advance one token at a time). */
static int group_rows(const step_args_t *a, step_rows_t *g) {
    const int64_t n = a->n_tok;
    int64_t of[MAX_TOK], at[MAX_TOK];
    g->n = 0;
    for (int64_t t = 0; t < n; t++) {
        int64_t i = 0;
        while (i < g->n && g->row[i] != a->rows[t]) i++;
        if (i == g->n) g->row[i] = a->rows[t], g->len[i] = 0, g->n++;
        of[t] = i, g->len[i]++;
    }
    for (int64_t i = 0, f = 0; i < g->n; f += g->len[i], i++) g->first[i] = at[i] = f;
    for (int64_t t = 0; t < n; t++) {
        const int64_t i = of[t];
        if (at[i] > g->first[i] && a->pos[t] != a->pos[g->tok[at[i] - 1]] + 1) return -2;
        g->tok[at[i]++] = t;
    }
    return 0;
}

static int64_t moe_floats(const step_args_t *a, int64_t n) {
    return a->n_experts > 0 ? n * (3 * a->dim + a->n_experts + 2 * a->top_k + 2) : 0;
}

/* Floats of scratch a call of n tokens needs: h (n, dim), qkv, attention output, gate|up; for MoE
 * models the feed-forward's output, gathered inputs and outputs, router probabilities and choices;
 * for recurrent layers the most their mixer needs (a->layers must be set). */
int64_t step_scratch_floats(const step_args_t *a, int64_t n) {
    int64_t rec = 0;
    for (int64_t l = 0; a->layers && l < a->n_layers; l++) {
        const int64_t mixer = a->layers[l].mixer;
        const int64_t f = mixer == LL_MIXER_MAMBA ? mamba_scratch_floats(a, n)
                          : mixer == LL_MIXER_MLSTM ? mlstm_scratch_floats(a, n) : 0;
        rec = f > rec ? f : rec;
    }
    return n * (a->dim + (a->n_heads + 2 * a->n_kv_heads) * a->head_dim + a->n_heads * a->head_dim
                + 2 * a->ffn_dim) + moe_floats(a, n) + rec + 64;
}

static void add_rows(float *x, const float *h, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += h[i];
}

int llama_step(const step_args_t *a) {
    const int64_t n = a->n_tok, dim = a->dim, nh = a->n_heads, nkv = a->n_kv_heads, hd = a->head_dim,
                  rot = a->rot_dim;
    if (n < 1 || n > MAX_TOK || a->n_out < 0 || a->n_out > n || nh % nkv || hd % 2 || rot % 2 || rot > hd ||
        (a->n_experts > 0 && (a->top_k < 1 || a->top_k > a->n_experts)) || a->n_snap < 0)
        return -1;
    if (a->kv_f16 && !llama_step_kv_f16(hd)) return -3;
    for (int64_t t = 0; t < n; t++)
        if (a->pos[t] < 0 || a->pos[t] >= a->max_len || a->rows[t] < 0) return -2;
    const layer_t *layers = a->layers;
    int recurrent = 0;
    for (int64_t l = 0; l < a->n_layers; l++) {
        const int64_t mixer = layers[l].mixer;
        if (mixer != LL_MIXER_ATTENTION && mixer != LL_MIXER_MAMBA && mixer != LL_MIXER_MLSTM) return -1;
        if (mixer == LL_MIXER_MAMBA && (a->ssm_heads < 1 || a->ssm_head_dim < 1 || a->ssm_state < 1 || a->ssm_conv < 1))
            return -1;
        recurrent |= mixer != LL_MIXER_ATTENTION;
    }
    step_rows_t groups;
    if (recurrent && group_rows(a, &groups)) return -2;
    float *x = a->x;
    float *h = a->scratch;                         /* (n, dim) */
    float *qkv = h + n * dim;                      /* (n, (nh + 2 nkv) hd) */
    float *att = qkv + n * (nh + 2 * nkv) * hd;    /* (n, nh hd) */
    float *gu = att + n * nh * hd;                 /* (n, 2 ffn) */
    float *mo = gu + n * 2 * a->ffn_dim;           /* MoE: (n, dim) output, then moe_ffn's buffers */
    float *rec = mo + moe_floats(a, n);            /* a recurrent mixer's buffers */
    int rc;
    for (int64_t l = 0; l < a->n_layers; l++) {
        const layer_t *ly = layers + l;
        const float *in = x;
        if (ly->attn_norm) rmsnorm_f32(x, ly->attn_norm, h, n, dim, a->eps), in = h;
        rc = ly->mixer == LL_MIXER_MAMBA   ? mamba_mix(a, ly, &groups, in, h, rec)
             : ly->mixer == LL_MIXER_MLSTM ? mlstm_mix(a, ly, &groups, in, h, rec)
                                           : attention_mix(a, ly, in, h, qkv, att);
        if (rc) return rc;
        if (ly->attn_post_norm) rmsnorm_f32(h, ly->attn_post_norm, h, n, dim, a->eps);
        add_rows(x, h, n * dim);

        in = x;
        if (ly->ffn_norm) rmsnorm_f32(x, ly->ffn_norm, h, n, dim, a->eps), in = h;
        float *f = h;
        if (ly->moe.router) {
            if (a->n_experts < 1) return -1;
            if ((rc = moe_ffn(a, &ly->moe, in, mo, gu, mo + n * dim))) return rc;
            f = mo;
        } else {
            if ((rc = linear_run(&ly->w_gate_up, in, gu, n))) return rc;
            act_rows(a, gu, n);
            if ((rc = linear_run(&ly->w_down, gu, h, n))) return rc;
        }
        if (ly->ffn_post_norm) rmsnorm_f32(f, ly->ffn_post_norm, f, n, dim, a->eps);
        add_rows(x, f, n * dim);
    }
    if (a->n_out == 0) return 0;
    const int64_t *out = a->out_idx;
    for (int64_t i = 0; i < a->n_out; i++) {
        if (out[i] < 0 || out[i] >= n) return -2;
        rmsnorm_f32(x + out[i] * dim, a->final_norm, h + i * dim, 1, dim, a->eps);
    }
    if ((rc = linear_run(&a->lm_head, h, a->logits, a->n_out))) return rc;
    if (a->final_softcap > 0) {
        const float cap = (float)a->final_softcap;
        for (int64_t i = 0; i < a->n_out * a->vocab; i++) a->logits[i] = tanhf(a->logits[i] / cap) * cap;
    }
    return 0;
}
