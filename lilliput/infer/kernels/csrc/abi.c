/*
 * The layout of every struct and the value of every enum in lilliput.h, as the compiler sees
 * them: infer/kernels/abi.py compares its ctypes mirror with this table when the library loads.
 * A field added to a struct in the header goes in this table too (and in the mirror).
 */
#include <stddef.h>

#include "lilliput.h"

#define SIZE(T) {#T, (int64_t)sizeof(T)}
#define FIELD(T, f) {#T "." #f, (int64_t)offsetof(T, f)}
#define ENUM(E, V) {#E "." #V, (int64_t)V}

static const ll_abi_entry_t LAYOUT[] = {
    ENUM(ll_kind, LL_KIND_F32), ENUM(ll_kind, LL_KIND_BF16), ENUM(ll_kind, LL_KIND_INT8),
    ENUM(ll_kind, LL_KIND_INT4), ENUM(ll_kind, LL_KIND_INT8_BATCH), ENUM(ll_kind, LL_KIND_INT4_BATCH),
    ENUM(ll_variant, LL_VARIANT_AUTO), ENUM(ll_variant, LL_VARIANT_WIDEN), ENUM(ll_variant, LL_VARIANT_DOT),
    ENUM(ll_dtype, LL_DT_F32), ENUM(ll_dtype, LL_DT_BF16),
    ENUM(ll_act, LL_ACT_SILU), ENUM(ll_act, LL_ACT_GELU_TANH),
    ENUM(ll_qk_norm, LL_QK_NORM_NONE), ENUM(ll_qk_norm, LL_QK_NORM_HEAD), ENUM(ll_qk_norm, LL_QK_NORM_PROJ),
    ENUM(ll_mixer, LL_MIXER_ATTENTION), ENUM(ll_mixer, LL_MIXER_MAMBA), ENUM(ll_mixer, LL_MIXER_MLSTM),

    SIZE(linear_t), FIELD(linear_t, kind), FIELD(linear_t, weight), FIELD(linear_t, scale),
    FIELD(linear_t, zero), FIELD(linear_t, bias), FIELD(linear_t, n), FIELD(linear_t, k), FIELD(linear_t, group),
    FIELD(linear_t, variant),

    SIZE(gemv_args_t), FIELD(gemv_args_t, x), FIELD(gemv_args_t, w), FIELD(gemv_args_t, y),
    FIELD(gemv_args_t, code), FIELD(gemv_args_t, n), FIELD(gemv_args_t, k),

    SIZE(moe_t), FIELD(moe_t, router), FIELD(moe_t, gate_up), FIELD(moe_t, down),

    SIZE(mamba_t), FIELD(mamba_t, in_proj), FIELD(mamba_t, out_proj), FIELD(mamba_t, conv_w),
    FIELD(mamba_t, conv_b), FIELD(mamba_t, dt_bias), FIELD(mamba_t, A), FIELD(mamba_t, D), FIELD(mamba_t, norm),
    FIELD(mamba_t, state_ssm), FIELD(mamba_t, state_conv), FIELD(mamba_t, snap_ssm),
    FIELD(mamba_t, snap_conv),

    SIZE(mlstm_t), FIELD(mlstm_t, w_in), FIELD(mlstm_t, w_out), FIELD(mlstm_t, gate_bias), FIELD(mlstm_t, norm),
    FIELD(mlstm_t, state_c), FIELD(mlstm_t, state_n), FIELD(mlstm_t, state_m), FIELD(mlstm_t, snap_c),
    FIELD(mlstm_t, snap_n), FIELD(mlstm_t, snap_m),

    SIZE(layer_t), FIELD(layer_t, mixer), FIELD(layer_t, attn_norm), FIELD(layer_t, attn_post_norm),
    FIELD(layer_t, ffn_norm),
    FIELD(layer_t, ffn_post_norm), FIELD(layer_t, q_norm), FIELD(layer_t, k_norm), FIELD(layer_t, rope),
    FIELD(layer_t, window), FIELD(layer_t, k_cache), FIELD(layer_t, v_cache), FIELD(layer_t, wqkv),
    FIELD(layer_t, wo), FIELD(layer_t, w_gate_up), FIELD(layer_t, w_down), FIELD(layer_t, moe),
    FIELD(layer_t, mamba), FIELD(layer_t, mlstm),

    SIZE(step_args_t), FIELD(step_args_t, n_layers), FIELD(step_args_t, dim), FIELD(step_args_t, n_heads),
    FIELD(step_args_t, n_kv_heads), FIELD(step_args_t, head_dim), FIELD(step_args_t, ffn_dim),
    FIELD(step_args_t, vocab), FIELD(step_args_t, max_len), FIELD(step_args_t, kv_f16), FIELD(step_args_t, eps),
    FIELD(step_args_t, act), FIELD(step_args_t, qk_norm), FIELD(step_args_t, attn_scale),
    FIELD(step_args_t, attn_softcap), FIELD(step_args_t, final_softcap), FIELD(step_args_t, rot_dim),
    FIELD(step_args_t, n_experts), FIELD(step_args_t, top_k), FIELD(step_args_t, norm_topk),
    FIELD(step_args_t, ssm_heads), FIELD(step_args_t, ssm_head_dim), FIELD(step_args_t, ssm_state),
    FIELD(step_args_t, ssm_conv), FIELD(step_args_t, n_snap),
    FIELD(step_args_t, n_tok), FIELD(step_args_t, rows), FIELD(step_args_t, pos), FIELD(step_args_t, n_out),
    FIELD(step_args_t, out_idx), FIELD(step_args_t, x), FIELD(step_args_t, logits), FIELD(step_args_t, cos),
    FIELD(step_args_t, sin), FIELD(step_args_t, scratch), FIELD(step_args_t, final_norm),
    FIELD(step_args_t, lm_head), FIELD(step_args_t, layers),

    SIZE(ll_abi_entry_t), FIELD(ll_abi_entry_t, name), FIELD(ll_abi_entry_t, value),
};

const ll_abi_entry_t *ll_abi_layout(int64_t *count) {
    *count = (int64_t)(sizeof LAYOUT / sizeof LAYOUT[0]);
    return LAYOUT;
}
