/*
 * The mLSTM mixer of the fused step (core/xlstm.py is the reference, `mlstm_step`). Per call: w_in
 * over all the call's tokens at once to q | k | v | o | i~ | f~; per row, token by token in position
 * order, each head's stabilised update of its matrix memory C (d, d), normaliser n (d,) and max-state m
 *
 *     m' = max(log sigmoid(f~) + m, i~),  f = exp(log sigmoid(f~) + m - m'),  i = exp(i~ - m')
 *     C' = f C + i k v^T,  n' = f n + i k,  h = C'^T q / max(|n' . q|, exp(-m'))   (q scaled by d^-1/2)
 *
 * then the head's RMSNorm times the norm weight and sigmoid(o), and w_out over all tokens at once.
 * A fresh row holds m = -inf (C = n = 0): its first update gives f = 0, as in torch. The states
 * live per cache row beside their snapshots (lilliput.h); the update runs on the GEMV pool, one
 * (row, head) pair per work item, when it is large enough to pay for a second thread.
 */
#include "step.h"

/* (n, P) projection, P = 4 heads d + 2 heads; (n, heads d) gated head outputs */
int64_t mlstm_scratch_floats(const step_args_t *a, int64_t n) {
    const int64_t nh = a->n_heads, d = a->head_dim;
    return n * (4 * nh * d + 2 * nh + nh * d);
}

typedef struct {
    const step_args_t *a;
    const mlstm_t *m;
    const step_rows_t *g;
    const float *proj; /* (n, P) */
    float *hb;         /* (n, heads d) */
} mlstm_ctx_t;

/* One head's update by one token and its output h (d,) before the norm; C, n, m in place, and C's rows
 * before the update also to `save` where it is not NULL (a snapshot, written as C is read anyway). */
static void mlstm_update(float *C, float *save, float *nv, float *mv, const float *q, const float *k, const float *v,
                         float iv, float fv, float scale, float *h, int64_t d) {
    const float log_f = fminf(fv, 0.0f) - log1pf(expf(-fabsf(fv))); /* log sigmoid, as torch's */
    const float m_new = fmaxf(log_f + *mv, iv);
    const float fg = expf(log_f + *mv - m_new), ig = expf(iv - m_new);
    float qn = 0.0f;
    for (int64_t b = 0; b < d; b++) h[b] = 0.0f;
    for (int64_t r = 0; r < d; r++) { /* row r of C: updated and read in one pass */
        float *row = C + r * d;
        const float kr = ig * k[r], qr = q[r] * scale;
        if (save) memcpy(save + r * d, row, sizeof(float) * d);
        for (int64_t b = 0; b < d; b++) {
            row[b] = fg * row[b] + kr * v[b];
            h[b] += qr * row[b];
        }
        nv[r] = fg * nv[r] + ig * k[r];
        qn += qr * nv[r];
    }
    *mv = m_new;
    const float den = fmaxf(fabsf(qn), expf(-m_new));
    for (int64_t b = 0; b < d; b++) h[b] /= den;
}

/* Work items [i0, i1) of (row group, head) pairs: the head's state through the row's tokens in order. */
static void mlstm_items(const float *unused, const void *ctxv, void *unused_y, int ydt, int64_t N_, int64_t K_,
                        int64_t i0, int64_t i1) {
    (void)unused, (void)unused_y, (void)ydt, (void)N_, (void)K_;
    const mlstm_ctx_t *c = ctxv;
    const step_args_t *a = c->a;
    const mlstm_t *m = c->m;
    const int64_t nh = a->n_heads, d = a->head_dim, P = 4 * nh * d + 2 * nh, slots = a->n_snap + 1;
    const float scale = (float)(1.0 / sqrt((double)d)), eps = (float)a->eps;
    for (int64_t item = i0; item < i1; item++) {
        const int64_t gi = item / nh, h = item % nh, row = c->g->row[gi], T = c->g->len[gi];
        const int64_t at = row * nh + h, snap_at = row * slots * nh + h; /* slot s: snap_at + s nh */
        float *C = m->state_c + at * d * d, *nv = m->state_n + at * d, *mv = m->state_m + at;
        const int snap = m->snap_c && m->snap_n && m->snap_m;
        for (int64_t j = 0; j < T; j++) {
            const int64_t t = c->g->tok[c->g->first[gi] + j];
            const int before = snap && snap_before(j, T, a->n_snap);
            if (before) {
                memcpy(m->snap_n + snap_at * d, nv, sizeof(float) * d);
                m->snap_m[snap_at] = *mv;
            }
            const float *p = c->proj + t * P;
            float *o = c->hb + t * nh * d + h * d;
            mlstm_update(C, before ? m->snap_c + snap_at * d * d : NULL, nv, mv, p + h * d, p + (nh + h) * d,
                         p + (2 * nh + h) * d, p[4 * nh * d + h] + m->gate_bias[h],
                         p[4 * nh * d + nh + h] + m->gate_bias[nh + h], scale, o, d);
            float ss = 0.0f; /* the head's RMSNorm, the norm weight and the output gate sigmoid(o) */
            for (int64_t b = 0; b < d; b++) ss += o[b] * o[b];
            const float inv = 1.0f / sqrtf(ss / (float)d + eps);
            const float *og = p + (3 * nh + h) * d, *w = m->norm + h * d;
            for (int64_t b = 0; b < d; b++) o[b] = o[b] * inv * w[b] / (1.0f + expf(-og[b]));
            const int64_t s = snap_after(j, T, a->n_snap);
            if (snap && s >= 0) {
                memcpy(m->snap_c + (snap_at + s * nh) * d * d, C, sizeof(float) * d * d);
                memcpy(m->snap_n + (snap_at + s * nh) * d, nv, sizeof(float) * d);
                m->snap_m[snap_at + s * nh] = *mv;
            }
        }
    }
}

int mlstm_mix(const step_args_t *a, const layer_t *ly, const step_rows_t *g, const float *in, float *out,
              float *buf) {
    const mlstm_t *m = &ly->mlstm;
    const int64_t n = a->n_tok, nh = a->n_heads, d = a->head_dim, P = 4 * nh * d + 2 * nh;
    if (!m->state_c || !m->state_n || !m->state_m || !m->gate_bias || !m->norm || m->w_in.n != P ||
        m->w_in.k != a->dim || m->w_out.n != a->dim || m->w_out.k != nh * d)
        return -4;
    float *proj = buf, *hb = proj + n * P;
    int rc;
    if ((rc = linear_run(&m->w_in, in, proj, n))) return rc;
    mlstm_ctx_t ctx = {a, m, g, proj, hb};
    const int64_t items = g->n * nh;
    gemv_pool_items(mlstm_items, &ctx, NULL, items, 0, state_chunk(items, n * nh * d * d));
    return linear_run(&m->w_out, hb, out, n);
}
