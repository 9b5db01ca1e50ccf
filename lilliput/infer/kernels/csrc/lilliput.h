/*
 * The one interface of lilliput's C kernels: the linear-layer descriptor, the kind codes, the
 * fused step's argument structs and every function the library exports. Every .c file of this
 * folder includes it; the Python side mirrors the structs and enums in infer/kernels/abi.py and
 * compares its mirror with `ll_abi_layout()` (sizes, field offsets, enum values) when the library
 * loads, so neither side can drift from the other.
 *
 * Fields that hold an enum are int64_t (a fixed size on every ABI); pointers are plain pointers.
 */
#ifndef LILLIPUT_H
#define LILLIPUT_H

#include <stdint.h>

/* ------------------------------------------------------------------ enums */

/* What a linear layer's weight is (linear_t.kind). */
typedef enum {
    LL_KIND_F32 = 0,        /* weight fp32 (N, K), row-major like nn.Linear.weight */
    LL_KIND_BF16 = 1,       /* weight bf16 (N, K) */
    LL_KIND_INT8 = 2,       /* weight int8 (N, K) in [-127, 127], scale fp32 (N,): W = q * scale[n] */
    LL_KIND_INT4 = 3,       /* weight uint8 (N, K / 2), blocks of 32 columns in 16 bytes (byte j: column j
                               low nibble, column j + 16 high nibble), scale fp16 bits (N, K / group),
                               zero uint8 (N, K / group) in [0, 15]: W = (q - zero) * scale, group 32/64/128 */
    LL_KIND_INT8_BATCH = 4, /* int8 in the batch layout: weight uint8 (N / G, K / 4, G, 4) of q + 128,
                               G = group = qgemv_int8_pack() (16 AVX-512 VNNI, 8 AVX2), scale as
                               LL_KIND_INT8 */
    LL_KIND_INT4_BATCH = 5, /* int4 in the batch layout (AVX2 builds, qgemv_int4_pack() rows per group):
                               weight uint8 (N / 8, K / 32, 4, 32), per block of 32 columns chunk p
                               holding columns 8p..8p+3 (low nibbles) and 8p+4..8p+7 (high) of the
                               8 rows (row i at bytes 4i..4i+3); scale fp16 bits and zero uint8
                               (N / 8, K / group, 8); W = (q - zero) * scale as LL_KIND_INT4 */
} ll_kind;

/* Which arithmetic a quantized layer uses (linear_t.variant). */
typedef enum {
    LL_VARIANT_AUTO = 0,  /* the measured fastest: the integer dot products where the build has them */
    LL_VARIANT_WIDEN = 1, /* widen the weights to fp32 and FMA against fp32 x (exact up to fp32 order) */
    LL_VARIANT_DOT = 2,   /* x quantized to int8 per block of 32, integer dot products */
} ll_variant;

/* The gate's activation of the gated feed-forward (step_args_t.act). */
typedef enum {
    LL_ACT_SILU = 0,      /* SwiGLU: silu(gate) * up */
    LL_ACT_GELU_TANH = 1, /* GeGLU: gelu(gate), tanh approximation, * up (Gemma) */
} ll_act;

/* Where queries and keys are RMS-normed, after the projection and before rotary (step_args_t.qk_norm). */
typedef enum {
    LL_QK_NORM_NONE = 0,
    LL_QK_NORM_HEAD = 1, /* over each head's head_dim values (Qwen3, Gemma 3); weights (head_dim,) */
    LL_QK_NORM_PROJ = 2, /* over the whole q (n_heads head_dim) and k (n_kv_heads head_dim) projections (OLMo 2) */
} ll_qk_norm;

/* A layer's sequence mixer (layer_t.mixer): which of its structs the fused step reads. */
typedef enum {
    LL_MIXER_ATTENTION = 0, /* grouped-query attention over the KV cache (layer_t's attention fields) */
    LL_MIXER_MAMBA = 1,     /* Mamba-2 SSD (core/ssm.py), state per cache row (layer_t.mamba) */
    LL_MIXER_MLSTM = 2,     /* xLSTM's mLSTM (core/xlstm.py), state per cache row (layer_t.mlstm) */
} ll_mixer;

/* Element types of gemv()'s x, w and y (the same codes as LL_KIND_F32 / LL_KIND_BF16). */
typedef enum { LL_DT_F32 = 0, LL_DT_BF16 = 1 } ll_dtype;

/* ------------------------------------------------------------------ structs */

/* One linear layer: y (B, N) = x (B, K) W^T. */
typedef struct {
    int64_t kind;       /* ll_kind */
    const void *weight; /* see ll_kind */
    const void *scale;  /* quantized kinds; NULL otherwise */
    const void *zero;   /* LL_KIND_INT4; NULL otherwise */
    const float *bias;  /* fp32 (N,) added to every row of y; NULL: none */
    int64_t n, k;       /* N outputs, K inputs */
    int64_t group;      /* LL_KIND_INT4: columns per scale; LL_KIND_INT8_BATCH: rows per group; 0 otherwise */
    int64_t variant;    /* ll_variant (quantized kinds) */
} linear_t;

/* gemv_packed()'s arguments in one block (ctypes converts one argument instead of nine). */
typedef struct {
    const void *x; /* (B, K) */
    const void *w; /* (N, K) */
    void *y;       /* (B, N) */
    int64_t code;  /* xdt | wdt << 4 | ydt << 8 | B << 16 (ll_dtype codes) */
    int64_t n, k;
} gemv_args_t;

/* A mixture-of-experts feed-forward: each token goes to its top_k experts by router softmax (fp32),
 * each a gated feed-forward of step_args_t.ffn_dim; every expert runs once per call over the tokens
 * routed to it. */
typedef struct {
    const float *router;      /* fp32 (n_experts, dim); NULL: the layer's feed-forward is dense */
    const linear_t *gate_up;  /* (n_experts,): each (2 ffn_dim, dim), gate then up */
    const linear_t *down;     /* (n_experts,): each (dim, ffn_dim) */
} moe_t;

/* A recurrent layer's state per cache row is a few fp32 tensors (rows, ...), like the KV cache. The
 * step also keeps, per row and tensor, snapshots (rows, n_snap + 1, ...) of the last call's
 * positions, so a caller can rewind the row (rejected drafts, forks): with T the row's tokens in the
 * call and w = min(T, n_snap), slot 0 holds the state before its last w tokens and slot i < w the
 * state after the i-th of them (after the last: the state itself; slot w is not written). NULL
 * snapshots (or n_snap 0): none are kept. */

/* A Mamba-2 mixer (core/ssm.py): in_proj to z | x B C | dt, a causal depthwise convolution over
 * x B C and SiLU, dt = softplus(dt + dt_bias), per head h = exp(dt A) h + dt x B^T and
 * y = h C + D x, then norm(y silu(z)) and out_proj. Widths: step_args_t.ssm_*. */
typedef struct {
    linear_t in_proj;            /* (d_inner + conv_dim + n_heads, dim), d_inner = heads head_dim,
                                    conv_dim = d_inner + 2 state */
    linear_t out_proj;           /* (dim, d_inner) */
    const float *conv_w;         /* (conv, conv_dim): tap-major, the transpose of the module's weight */
    const float *conv_b;         /* (conv_dim,) */
    const float *dt_bias, *A, *D; /* (heads,) each; A = -exp(A_log) */
    const float *norm;           /* (d_inner,): the gated RMSNorm's weight */
    float *state_ssm, *state_conv; /* (rows, heads, head_dim, state), (rows, conv - 1, conv_dim) */
    float *snap_ssm, *snap_conv;   /* their snapshots: (rows, n_snap + 1, ...) */
} mamba_t;

/* An mLSTM mixer (core/xlstm.py) of step_args_t.n_heads heads of head_dim d: w_in to q | k | v | o
 * (each heads d) | i~ | f~ (heads each), the exponentially gated matrix memory with its max-state
 * stabiliser, a per-head RMSNorm times norm, sigmoid(o), w_out. */
typedef struct {
    linear_t w_in;          /* (4 heads d + 2 heads, dim) */
    linear_t w_out;         /* (dim, heads d) */
    const float *gate_bias; /* (2 heads,): input gates, then forget gates */
    const float *norm;      /* (heads d,) */
    float *state_c, *state_n, *state_m; /* C (rows, heads, d, d), n (rows, heads, d), m (rows, heads) */
    float *snap_c, *snap_n, *snap_m;    /* their snapshots: (rows, n_snap + 1, ...) */
} mlstm_t;

/* One layer of the fused step: its mixer (attention, Mamba or mLSTM) and its feed-forward. Norm
 * weights are fp32 and already hold (norm_offset + weight); a NULL norm is not applied. The fields
 * from q_norm to wo are the attention mixer's. */
typedef struct {
    int64_t mixer;                           /* ll_mixer */
    const float *attn_norm, *attn_post_norm; /* (dim,): before the mixer / on its output */
    const float *ffn_norm, *ffn_post_norm;   /* (dim,): before the feed-forward / on its output */
    const float *q_norm, *k_norm;            /* step_args_t.qk_norm's weights: (head_dim,) per head,
                                                or (n_heads head_dim,) and (n_kv_heads head_dim,) */
    int64_t rope;                            /* which of the call's rotary tables (step_args_t.cos); -1: none (NoPE) */
    int64_t window;                          /* keys a query sees: the last `window`, itself included; 0: all */
    void *k_cache, *v_cache;                 /* fp32 or fp16 (kv_f16) (rows, n_kv, max_len, head_dim) */
    linear_t wqkv, wo;                       /* q|k|v (optionally biased) and the output projection */
    linear_t w_gate_up, w_down;              /* the dense gated feed-forward (unused with moe.router) */
    moe_t moe;
    mamba_t mamba;                           /* LL_MIXER_MAMBA */
    mlstm_t mlstm;                           /* LL_MIXER_MLSTM */
} layer_t;

/* The fused step's arguments: the model's shape and switches, this call's tokens and where results go. */
typedef struct {
    int64_t n_layers, dim, n_heads, n_kv_heads, head_dim, ffn_dim, vocab;
    int64_t max_len;          /* L: positions per row of every cache */
    int64_t kv_f16;           /* 1: the caches hold fp16 (llama_step_kv_f16() says whether this build can) */
    double eps;               /* of every RMSNorm */
    int64_t act;              /* ll_act */
    int64_t qk_norm;          /* ll_qk_norm */
    double attn_scale;        /* softmax scale of scores; 0: 1 / sqrt(head_dim) */
    double attn_softcap;      /* scores -> cap tanh(scores / cap) after scaling; 0: off */
    double final_softcap;     /* logits -> cap tanh(logits / cap); 0: off */
    int64_t rot_dim;          /* values of each head that rotate (rotate-half over them), <= head_dim */
    int64_t n_experts, top_k; /* MoE layers */
    int64_t norm_topk;        /* 1: the top_k probabilities are renormalised to sum to 1 */
    int64_t ssm_heads, ssm_head_dim, ssm_state, ssm_conv; /* Mamba layers: heads, their width, state width N,
                                                             convolution width */
    int64_t n_snap;           /* recurrent layers: snapshot slots per row and tensor, minus one */
    int64_t n_tok;            /* tokens in this call, 1..llama_step_max_tokens() */
    const int64_t *rows;      /* (n_tok,): cache row of each token; a row's tokens in position order */
    const int64_t *pos;       /* (n_tok,): position of each token in its row */
    int64_t n_out;            /* tokens whose logits are wanted */
    const int64_t *out_idx;   /* (n_out,): which tokens, in the order the logits come out */
    float *x;                 /* (n_tok, dim): the tokens' (scaled) embeddings; overwritten */
    float *logits;            /* (n_out, vocab) out */
    const float *cos, *sin;   /* (n_rope, n_tok, rot_dim): each rotary table's rows at the tokens' positions */
    float *scratch;           /* step_scratch_floats() floats */
    const float *final_norm;  /* fp32 (dim,) */
    linear_t lm_head;
    const layer_t *layers;    /* (n_layers,) */
} step_args_t;

/* One entry of ll_abi_layout(): "struct" (its size), "struct.field" (its offset) or "enum.NAME"
 * (its value). */
typedef struct {
    const char *name;
    int64_t value;
} ll_abi_entry_t;

/* ------------------------------------------------------------------ gemv.c */

/* A kernel's work function: rows (or items) [n0, n1) of y; the pool passes x, w, y, ydt, N, K through. */
typedef void (*rows_fn)(const float *x, const void *w, void *y, int ydt, int64_t N, int64_t K, int64_t n0,
                        int64_t n1);

int gemv_lanes(void);                   /* fp32 lanes per vector of this build (16, 8 or 4) */
void gemv_set_threads(int n);           /* threads per call, caller included; n <= 0: every CPU in affinity */
int gemv_get_threads(void);
void gemv_set_spin_us(long us);         /* how long idle workers spin before sleeping */
int gemv_pool_run(rows_fn fn, const float *x, const void *w, void *y, int ydt, int64_t N, int64_t K,
                  int64_t row_bytes);   /* rows [0, N) of fn on the pool; row_bytes: weight bytes per row */
int gemv_pool_items(rows_fn fn, const void *ctx, void *y, int64_t N, int64_t K,
                    int64_t chunk);     /* items [0, N) of fn (ctx as its w), chunk at a time */
int gemv(const void *x, int xdt, const void *w, int wdt, void *y, int ydt, int64_t B, int64_t N, int64_t K);
int gemv_packed(const gemv_args_t *a);
int argmax_rows(const float *x, int64_t rows, int64_t n, int64_t *out);
int rmsnorm_f32(const float *x, const float *w, float *out, int64_t rows, int64_t dim, double eps);

/* ------------------------------------------------------------------ qgemv*.c */

/* y (B, N) = x (B, K) W^T for any ll_kind, B fp32 rows of x. 0, -1 for a descriptor it cannot run,
 * -2 out of memory. */
int linear_run(const linear_t *d, const float *x, float *y, int64_t B);
int qlinear_run_rows(const linear_t *d, const float *x, float *y, int64_t B); /* quantized kinds only */
int qgemv_int8_pack(void); /* weight rows per group of LL_KIND_INT8_BATCH in this build; 0: none */
int qgemv_int4_pack(void); /* weight rows per group of LL_KIND_INT4_BATCH in this build; 0: none */
int qgemv_avx2(void);
int qgemv_isa(void);       /* 0 scalar, 1 AVX2 maddubs, 2 AVX-VNNI, 3 AVX-512 VNNI 256-bit, 4 512-bit */

/* ------------------------------------------------------------------ llama_step.c (mamba_step.c, mlstm_step.c) */

int llama_step_max_tokens(void);
int llama_step_kv_f16(int64_t head_dim); /* whether this build's step keeps fp16 caches for that width */
int64_t step_scratch_floats(const step_args_t *a, int64_t n_tok);
int llama_step(const step_args_t *a);

/* ------------------------------------------------------------------ abi.c */

const ll_abi_entry_t *ll_abi_layout(int64_t *count);

#endif
