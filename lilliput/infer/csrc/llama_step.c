/*
 * One decode step of a Llama-style model (RMSNorm, RoPE rotate-half, grouped-query attention,
 * SwiGLU) for one sequence, entirely in C: the torch version spends ~7 ms per token of a
 * 30-layer model in op dispatch alone, a quarter of the step. Matrix-vector products go to
 * gemv() (threaded, fp32 or bf16 weights); everything else is small and runs on the caller's
 * thread. Activations, norms and the KV cache are fp32.
 *
 * Arguments come packed in one int64 array (pointers and sizes; eps as the bits of a double):
 *   a[0..6]   n_layers, dim, n_heads, n_kv_heads, head_dim, ffn_dim, vocab
 *   a[7..8]   pos (cache slot of this token), L (cache length); a[9] unused
 *   a[10]     eps (double bits)
 *   a[11..16] x (dim fp32, the token's embedding; overwritten), logits out (vocab fp32),
 *             cos, sin (head_dim fp32 each, for this position), scratch (fp32, see below),
 *             final norm weight
 *   a[17..24] the output layer's linear descriptor
 *   a[25 + 36 * l ..] per layer: attn_norm, ffn_norm, k cache (n_kv, L, head_dim), v cache,
 *             then the descriptors of wqkv, wo, w_gate_up, w_down (8 int64 each)
 * scratch holds dim + (n_heads + 2 n_kv) hd + n_heads hd + 2 ffn + L floats.
 *
 * A linear descriptor is int64[8] = {kind, weight, scale, zero, N, K, group, extra}: kind 0 is
 * an fp32 and 1 a bf16 (N, K) weight, run by gemv(); kinds >= 2 are quantized formats, run by
 * qlinear_run() where a quantized-kernel source provides it (a weak symbol until then).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

int gemv(const void *x, int xdt, const void *w, int wdt, void *y, int ydt, int64_t B, int64_t N,
         int64_t K);
int rmsnorm_f32(const float *x, const float *w, float *out, int64_t rows, int64_t dim, double eps);

#define PTR(i) ((void *)(intptr_t)a[i])
#define DESC_LEN 8
#define LAYER_LEN (4 + 4 * DESC_LEN)

int qlinear_run(const int64_t *desc, const float *x, float *y) __attribute__((weak));

static int linear_run(const int64_t *d, const float *x, float *y) {
    if (d[0] == 0 || d[0] == 1) return gemv(x, 0, (const void *)(intptr_t)d[1], (int)d[0], y, 0, 1, d[4], d[5]);
    return qlinear_run ? qlinear_run(d, x, y) : -3;
}

static void rope(float *x, const float *cos, const float *sin, int64_t heads, int64_t hd) {
    const int64_t h2 = hd / 2;
    for (int64_t h = 0; h < heads; h++, x += hd)
        for (int64_t i = 0; i < h2; i++) {
            const float x1 = x[i], x2 = x[i + h2];
            x[i] = x1 * cos[i] - x2 * sin[i];
            x[i + h2] = x2 * cos[i + h2] + x1 * sin[i + h2];
        }
}

static void attend(const float *q, const float *kc, const float *vc, float *out, float *sc,
                   int64_t nh, int64_t nkv, int64_t S, int64_t L, int64_t hd) {
    const float scale = 1.0f / sqrtf((float)hd);
    const int64_t g = nh / nkv;
    for (int64_t h = 0; h < nh; h++) {
        const float *qh = q + h * hd, *kh = kc + (h / g) * L * hd, *vh = vc + (h / g) * L * hd;
        float mx = -INFINITY;
        for (int64_t s = 0; s < S; s++) {
            const float *kr = kh + s * hd;
            float d = 0.0f;
            for (int64_t i = 0; i < hd; i++) d += qh[i] * kr[i];
            sc[s] = d * scale;
            mx = sc[s] > mx ? sc[s] : mx;
        }
        float sum = 0.0f;
        for (int64_t s = 0; s < S; s++) sum += (sc[s] = expf(sc[s] - mx));
        float *o = out + h * hd;
        memset(o, 0, sizeof(float) * hd);
        const float inv = 1.0f / sum;
        for (int64_t s = 0; s < S; s++) {
            const float p = sc[s] * inv, *vr = vh + s * hd;
            for (int64_t i = 0; i < hd; i++) o[i] += p * vr[i];
        }
    }
}

int llama_step(const int64_t *a) {
    const int64_t n_layers = a[0], dim = a[1], nh = a[2], nkv = a[3], hd = a[4], ffn = a[5],
                  vocab = a[6], pos = a[7], L = a[8];
    double eps;
    memcpy(&eps, &a[10], sizeof eps);
    if (pos < 0 || pos >= L || nh % nkv || hd % 2) return -1;
    float *x = PTR(11), *logits = PTR(12);
    const float *cos = PTR(13), *sin = PTR(14);
    float *h = PTR(15);                       /* dim */
    float *qkv = h + dim;                     /* (nh + 2 nkv) hd */
    float *att = qkv + (nh + 2 * nkv) * hd;   /* nh hd */
    float *gu = att + nh * hd;                /* 2 ffn */
    float *sc = gu + 2 * ffn;                 /* L */
    const int64_t nqkv = (nh + 2 * nkv) * hd;
    for (int64_t l = 0; l < n_layers; l++) {
        const int64_t *p = a + 25 + LAYER_LEN * l;
        const float *attn_norm = (const float *)(intptr_t)p[0], *ffn_norm = (const float *)(intptr_t)p[1];
        float *kc = (float *)(intptr_t)p[2], *vc = (float *)(intptr_t)p[3];
        const int64_t *wqkv = p + 4, *wo = wqkv + DESC_LEN, *wgu = wo + DESC_LEN, *wdown = wgu + DESC_LEN;
        int rc;

        rmsnorm_f32(x, attn_norm, h, 1, dim, eps);
        if ((rc = linear_run(wqkv, h, qkv))) return rc;
        rope(qkv, cos, sin, nh + nkv, hd); /* q and k heads */
        const float *k = qkv + nh * hd, *v = k + nkv * hd;
        for (int64_t j = 0; j < nkv; j++) {
            memcpy(kc + (j * L + pos) * hd, k + j * hd, sizeof(float) * hd);
            memcpy(vc + (j * L + pos) * hd, v + j * hd, sizeof(float) * hd);
        }
        attend(qkv, kc, vc, att, sc, nh, nkv, pos + 1, L, hd);
        if ((rc = linear_run(wo, att, h))) return rc;
        for (int64_t i = 0; i < dim; i++) x[i] += h[i];

        rmsnorm_f32(x, ffn_norm, h, 1, dim, eps);
        if ((rc = linear_run(wgu, h, gu))) return rc;
        for (int64_t i = 0; i < ffn; i++) {
            const float g = gu[i];
            gu[i] = g / (1.0f + expf(-g)) * gu[ffn + i];
        }
        if ((rc = linear_run(wdown, gu, h))) return rc;
        for (int64_t i = 0; i < dim; i++) x[i] += h[i];
    }
    rmsnorm_f32(x, PTR(16), h, 1, dim, eps);
    return linear_run(a + 17, h, logits);
}
