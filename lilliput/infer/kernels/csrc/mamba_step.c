/*
 * The Mamba-2 mixer of the fused step (core/ssm.py is the reference). Per call: in_proj over all the
 * call's tokens at once (one pass over its weights); per row, token by token in position order, the
 * causal depthwise convolution over x|B|C from the row's window of its last conv - 1 inputs, SiLU,
 * dt = softplus(dt + dt_bias) and each head's SSD update
 *
 *     h = exp(dt A) h + dt x B^T      (head_dim, state)
 *     y = h C + D x
 *
 * then norm(y silu(z)) and out_proj over all tokens at once. The states live per cache row (mamba_t),
 * beside their snapshots of the call's last positions (lilliput.h). The SSD runs on the GEMV pool,
 * one (row, head) pair per work item, when it is large enough to pay for a second thread.
 */
#include "step.h"

/* (n, P) projection z | x B C | dt, (n, conv_dim) x B C after the convolution and SiLU, (n, d_inner) y,
 * (n, heads) dt */
int64_t mamba_scratch_floats(const step_args_t *a, int64_t n) {
    const int64_t di = a->ssm_heads * a->ssm_head_dim, cd = di + 2 * a->ssm_state;
    return n * ((di + cd + a->ssm_heads) + cd + di + a->ssm_heads);
}

typedef struct {
    const step_args_t *a;
    const mamba_t *m;
    const step_rows_t *g;
    const float *xbc; /* (n, conv_dim): x | B | C after the convolution and SiLU */
    const float *dt;  /* (n, heads) */
    float *y;         /* (n, d_inner) */
} ssd_ctx_t;

/* h = da h + xd B^T over one head's (hs, N) state, and y[p] = h[p] . C + D x[p]; the state before the
 * update also goes to `save` where it is not NULL (a snapshot, written as the state is read anyway). */
static inline void ssd_update(float *h, float *save, const float *x, const float *B, const float *C, float dt,
                              float da, float D, float *y, int64_t hs, int64_t N) {
    for (int64_t p = 0; p < hs; p++) {
        float *hp = h + p * N;
        const float xd = dt * x[p];
        float acc = 0.0f;
        int64_t i = 0;
        if (N % 8 == 0) {
            v8 av = {0};
            for (; i < N; i += 8) {
                v8 hv, bv, cv;
                memcpy(&hv, hp + i, 32), memcpy(&bv, B + i, 32), memcpy(&cv, C + i, 32);
                if (save) memcpy(save + p * N + i, &hv, 32);
                hv = da * hv + xd * bv;
                memcpy(hp + i, &hv, 32);
                av += hv * cv;
            }
            for (int k = 0; k < 8; k++) acc += av[k];
        }
        for (; i < N; i++) {
            if (save) save[p * N + i] = hp[i];
            hp[i] = da * hp[i] + xd * B[i];
            acc += hp[i] * C[i];
        }
        y[p] = acc + D * x[p];
    }
}

/* Work items [i0, i1) of (row group, head) pairs: the head's state through the row's tokens in order. */
static void ssd_items(const float *unused, const void *ctxv, void *unused_y, int ydt, int64_t N_, int64_t K_,
                      int64_t i0, int64_t i1) {
    (void)unused, (void)unused_y, (void)ydt, (void)N_, (void)K_;
    const ssd_ctx_t *c = ctxv;
    const step_args_t *a = c->a;
    const mamba_t *m = c->m;
    const int64_t nh = a->ssm_heads, hs = a->ssm_head_dim, N = a->ssm_state, di = nh * hs, cd = di + 2 * N;
    const int64_t hsz = hs * N, slots = a->n_snap + 1;
    for (int64_t item = i0; item < i1; item++) {
        const int64_t gi = item / nh, h = item % nh, row = c->g->row[gi], T = c->g->len[gi];
        float *st = m->state_ssm + (row * nh + h) * hsz;
        float *snap = m->snap_ssm ? m->snap_ssm + (row * slots * nh + h) * hsz : NULL; /* slot s: + s nh hsz */
        for (int64_t j = 0; j < T; j++) {
            const int64_t t = c->g->tok[c->g->first[gi] + j];
            const float *u = c->xbc + t * cd;
            const float dt = c->dt[t * nh + h];
            ssd_update(st, snap && snap_before(j, T, a->n_snap) ? snap : NULL, u + h * hs, u + di, u + di + N, dt,
                       expf(dt * m->A[h]), m->D[h], c->y + t * di + h * hs, hs, N);
            const int64_t s = snap_after(j, T, a->n_snap);
            if (snap && s >= 0) memcpy(snap + s * nh * hsz, st, sizeof(float) * hsz);
        }
    }
}

/* The convolution of one token: o = SiLU(b + sum_k w_k win_k + w_{K-1} u) over conv_dim channels, then
 * the window moves on by u. win (K - 1, cd) holds the row's last inputs, oldest first; w (K, cd). */
static void conv_token(float *win, const float *u, const float *w, const float *b, float *o, int64_t K, int64_t cd) {
    for (int64_t c = 0; c < cd; c++) o[c] = 0.0f;
    for (int64_t k = 0; k < K - 1; k++)
        for (int64_t c = 0; c < cd; c++) o[c] += win[k * cd + c] * w[k * cd + c];
    for (int64_t c = 0; c < cd; c++) o[c] += u[c] * w[(K - 1) * cd + c] + b[c];
    silu_mul(o, NULL, o, cd);
    if (K > 1) {
        memmove(win, win + cd, sizeof(float) * (K - 2) * cd);
        memcpy(win + (K - 2) * cd, u, sizeof(float) * cd);
    }
}

int mamba_mix(const step_args_t *a, const layer_t *ly, const step_rows_t *g, const float *in, float *out,
              float *buf) {
    const mamba_t *m = &ly->mamba;
    const int64_t n = a->n_tok, nh = a->ssm_heads, hs = a->ssm_head_dim, N = a->ssm_state, K = a->ssm_conv;
    const int64_t di = nh * hs, cd = di + 2 * N, P = di + cd + nh, wsz = (K - 1) * cd, slots = a->n_snap + 1;
    if (!m->state_ssm || (K > 1 && !m->state_conv) || !m->conv_w || !m->conv_b || !m->dt_bias || !m->A || !m->D ||
        !m->norm || m->in_proj.n != P || m->in_proj.k != a->dim || m->out_proj.n != a->dim || m->out_proj.k != di)
        return -4;
    float *proj = buf, *xbc = proj + n * P, *y = xbc + n * cd, *dt = y + n * di;
    int rc;
    if ((rc = linear_run(&m->in_proj, in, proj, n))) return rc;
    for (int64_t gi = 0; gi < g->n; gi++) { /* the convolution, in each row's order */
        const int64_t row = g->row[gi], T = g->len[gi];
        float *win = m->state_conv ? m->state_conv + row * wsz : NULL;
        float *snap = m->snap_conv && wsz ? m->snap_conv + row * slots * wsz : NULL;
        for (int64_t j = 0; j < T; j++) {
            const int64_t t = g->tok[g->first[gi] + j];
            if (snap && snap_before(j, T, a->n_snap)) memcpy(snap, win, sizeof(float) * wsz);
            conv_token(win, proj + t * P + di, m->conv_w, m->conv_b, xbc + t * cd, K, cd);
            const int64_t s = snap_after(j, T, a->n_snap);
            if (snap && s >= 0) memcpy(snap + s * wsz, win, sizeof(float) * wsz);
        }
    }
    for (int64_t t = 0; t < n; t++) /* softplus, as torch's (linear above 20) */
        for (int64_t h = 0; h < nh; h++) {
            const float v = proj[t * P + di + cd + h] + m->dt_bias[h];
            dt[t * nh + h] = v > 20.0f ? v : log1pf(expf(v));
        }
    ssd_ctx_t ctx = {a, m, g, xbc, dt, y};
    const int64_t items = g->n * nh;
    gemv_pool_items(ssd_items, &ctx, NULL, items, 0, state_chunk(items, n * di * N));
    for (int64_t t = 0; t < n; t++) silu_mul(proj + t * P, y + t * di, y + t * di, di); /* y silu(z) */
    rmsnorm_f32(y, m->norm, y, n, di, a->eps);
    return linear_run(&m->out_proj, y, out, n);
}
