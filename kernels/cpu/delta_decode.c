/*
 * One decode token of GDN / KDA for a batch of rows, fp32, CPU: everything between the input projections and
 * the output projection in one call per layer (kernels/cpu/__init__.py builds and loads it).
 *
 * The torch form (kernels/delta_rule/decode.py and supernet/mixers/delta_decode.py) is ~35 small ops per layer
 * -- conv window, SiLU, two L2 norms, the decay's softplus and exp, the sigmoid of beta, the state's decay,
 * reads and rank-1 write, the gated RMSNorm -- each a few microseconds of dispatch over a few kilobytes, which
 * at short context cost more than the FA cache a linear mixer saves reading. Here each row and head goes
 * through them once, with the head's [K, V] state hot in cache between its two passes; the low-rank up
 * projections (LoRA B factors, the output gate, KDA's decay) are done here too, each ~150 KB of weights.
 *
 * The conv input is assembled here too: the packed projection in front of it reads the teacher's KV heads
 * untiled and their LoRA factors, and this tiles and adds (conv_input).
 *
 * Same math as the reference path (REFERENCE.md "Mixer math"; kernels/delta_rule/naive.py), accumulated in fp32;
 * tests/core/test_fast_decode.py pins the two together.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vmath.h"

#define MAX_HEAD_DIM 256 /* kernels/cpu/__init__.py MAX_DELTA_HEAD_DIM: callers check it first */

/* The delta rule for one head: S <- diag(decay) S + k u^T with u = beta (v - (diag(decay) S)^T k), and
 * o = S_new^T q, from two passes over S [d, d] (row kk = key channel kk). ``decay`` has d entries (KDA) or is
 * NULL with ``decay_all`` for every channel (GDN). q is already L2-normalised and scaled. */
static inline __attribute__((always_inline)) void delta_head(
    float *restrict S, const float *restrict q, const float *restrict k, const float *restrict v,
    const float *restrict decay, float decay_all, float beta, int64_t d, float *restrict o) {
    float rq[MAX_HEAD_DIM], rk[MAX_HEAD_DIM], u[MAX_HEAD_DIM];
    for (int64_t j = 0; j < d; j++) rq[j] = rk[j] = 0.0f;
    for (int64_t r = 0; r < d; r++) {  /* pass 1: decay each row, read S^T q and S^T k from it */
        float *row = S + r * d;
        float e = decay ? decay[r] : decay_all, qr = q[r], kr = k[r];
        for (int64_t j = 0; j < d; j++) {
            float s = row[j] * e;
            row[j] = s;
            rq[j] += qr * s;
            rk[j] += kr * s;
        }
    }
    float qk = 0.0f;
    for (int64_t j = 0; j < d; j++) qk += q[j] * k[j];
    for (int64_t j = 0; j < d; j++) {
        u[j] = beta * (v[j] - rk[j]);
        o[j] = rq[j] + qk * u[j];  /* S_new^T q = S'^T q + u (k . q) */
    }
    for (int64_t r = 0; r < d; r++) {  /* pass 2: the rank-1 write */
        float *row = S + r * d;
        float kr = k[r];
        for (int64_t j = 0; j < d; j++) row[j] += kr * u[j];
    }
}

static void delta_head_dispatch(float *S, const float *q, const float *k, const float *v, const float *decay,
                                float decay_all, float beta, int64_t d, float *o) {
    switch (d) {  /* constant head dims unroll and keep the row in registers */
        case 64: delta_head(S, q, k, v, decay, decay_all, beta, 64, o); return;
        case 128: delta_head(S, q, k, v, decay, decay_all, beta, 128, o); return;
        default: delta_head(S, q, k, v, decay, decay_all, beta, d, o);
    }
}

/* x *= 1 / sqrt(sum(x^2) + eps) * scale (kernels.norm.l2_norm, eps inside the root) */
static inline void l2_normalise(float *x, int64_t d, float scale) {
    float ss = 0.0f;
    for (int64_t j = 0; j < d; j++) ss += x[j] * x[j];
    float inv = scale / sqrtf(ss + 1e-6f);
    for (int64_t j = 0; j < d; j++) x[j] *= inv;
}

/* y (+)= B a (+ bias): the up projection of a low-rank vector a [rank] (LoRA B factors, the output gate's and
 * KDA's decay up projections), with B given transposed, bt [rank, out]: one multiply-add of a row of bt per
 * rank channel, vectorised along the outputs (B [out, rank] row by row would be ``out`` short dot products,
 * each ending in a horizontal sum). accumulate: add to y instead of writing it. */
static void up_project(const float *restrict bt, const float *restrict a, const float *restrict bias, int64_t out,
                       int64_t rank, int accumulate, float *restrict y) {
    if (!accumulate)
        for (int64_t c = 0; c < out; c++) y[c] = 0.0f;
    if (bias)
        for (int64_t c = 0; c < out; c++) y[c] += bias[c];
    for (int64_t j = 0; j < rank; j++) {
        const float *row = bt + j * out;
        float aj = a[j];
        for (int64_t c = 0; c < out; c++) y[c] += aj * row[c];
    }
}

/* One row's conv input q | k | v [3w]: q as given, k and v from ``kv_heads`` heads tiled to h (KV head i serves
 * heads i * r .. i * r + r - 1, as supernet.layers.repeat_heads) plus their LoRA deltas B a (B^T given,
 * [rank, w]) when B is given. Assembled here so the packed projection reads the teacher's untiled k/v weights. */
static void conv_input(const float *q, const float *k, const float *v, const float *ak, const float *av,
                       const float *bk, const float *bv, int64_t rank, int64_t h, int64_t kv_heads, int64_t d,
                       float *x) {
    int64_t w = h * d, r = h / kv_heads;
    for (int64_t c = 0; c < w; c++) x[c] = q[c];
    for (int64_t hh = 0; hh < h; hh++) {
        const float *ks = k + (hh / r) * d, *vs = v + (hh / r) * d;
        for (int64_t j = 0; j < d; j++) {
            x[w + hh * d + j] = ks[j];
            x[2 * w + hh * d + j] = vs[j];
        }
    }
    if (!bk) return;
    up_project(bk, ak, NULL, w, rank, 1, x + w);
    up_project(bv, av, NULL, w, rank, 1, x + 2 * w);
}

/*
 * n rows, h heads of dimension d (width w = h * d); every row pointer below advances by its row stride.
 * q [n, w], k / v [n, kv_heads * d]: the projections before the short convolution; ak / av [n, rank] and
 * bk / bv [rank, w]: k's and v's LoRA factors, B transposed (NULL: none), see conv_input. Every up projection
 * below takes its weight transposed too (see up_project).
 * conv_state [n, 3w, kw - 1] contiguous, oldest first; shifted in place to end with this token's inputs.
 * conv_weight [3w, kw].
 * decay_in [n, m]: the decay's input. GDN (decay_up NULL): a_proj's output, m = h, one logit per head. KDA:
 * f_proj's low-rank input, and decay_up [m, w] (f_proj's up projection, transposed) makes one logit per key
 * channel.
 * dt_bias [h] or [w]; a_log [h]: g = -exp(a_log) softplus(logit + dt_bias), decay = exp(g).
 * beta_logit [n, h]. gate_in [n, rg], gate_up [rg, w] (transposed), gate_bias [w] (or NULL): the output gate
 * gate_up gate_in + gate_bias before its activation (gate_sigmoid: sigmoid, else SiLU).
 * state [n, h, d, d] fp32 contiguous, advanced in place. norm_weight [d], norm_eps: the gated RMSNorm.
 * out [n, w] contiguous. Returns 0, or -1 for a head dim above MAX_HEAD_DIM or a scratch allocation failure.
 */
int delta_decode_f32(int64_t n, int64_t h, int64_t d, int64_t kw, const float *q, int64_t q_stride,
                     const float *k, const float *v, int64_t kv_stride, int64_t kv_heads, const float *ak,
                     const float *av, int64_t a_stride, const float *bk, const float *bv, int64_t rank,
                     float *conv_state, const float *conv_weight, const float *decay_in, int64_t decay_stride,
                     const float *decay_up, int64_t decay_rank, const float *dt_bias, const float *a_log,
                     const float *beta_logit, int64_t beta_stride, const float *gate_in, int64_t gate_stride,
                     const float *gate_up, const float *gate_bias, int64_t gate_rank, int gate_sigmoid,
                     float *state, const float *norm_weight, float norm_eps, float *out) {
    if (d > MAX_HEAD_DIM || kw < 1 || kv_heads < 1 || h % kv_heads) return -1;
    int64_t w = h * d, taps = kw - 1;
    float *y = malloc((size_t)(8 * w + d) * sizeof(float));
    if (!y) return -1;
    float *x = y + 3 * w, *gate = y + 6 * w, *logits = y + 7 * w, *decay = y + 8 * w;
    float scale = 1.0f / sqrtf((float)d);
    for (int64_t i = 0; i < n; i++) {
        conv_input(q + i * q_stride, k + i * kv_stride, v + i * kv_stride, ak ? ak + i * a_stride : NULL,
                   av ? av + i * a_stride : NULL, bk, bv, rank, h, kv_heads, d, x);
        float *cs = conv_state + i * 3 * w * taps;
        for (int64_t c = 0; c < 3 * w; c++) {  /* the short causal conv of the new token, then SiLU */
            const float *wc = conv_weight + c * kw;
            float *sc = cs + c * taps;
            float acc = x[c] * wc[taps];
            for (int64_t j = 0; j < taps; j++) acc += sc[j] * wc[j];
            for (int64_t j = 0; j + 1 < taps; j++) sc[j] = sc[j + 1];
            if (taps) sc[taps - 1] = x[c];
            y[c] = acc;
        }
        for (int64_t c = 0; c < 3 * w; c++) y[c] *= sigmoid_approx(y[c]);  /* apart: vectorises */
        const float *din = decay_in + i * decay_stride;
        if (decay_up) {
            up_project(decay_up, din, NULL, w, decay_rank, 0, logits);
            din = logits;
        }
        up_project(gate_up, gate_in + i * gate_stride, gate_bias, w, gate_rank, 0, gate);
        const float *bl = beta_logit + i * beta_stride;
        float *o_row = out + i * w;
        for (int64_t hh = 0; hh < h; hh++) {
            float *q = y + hh * d, *k = y + w + hh * d, *v = y + 2 * w + hh * d;
            l2_normalise(q, d, scale);
            l2_normalise(k, d, 1.0f);
            float a = expf(a_log[hh]), decay_all = 0.0f;
            if (decay_up) {
                for (int64_t j = 0; j < d; j++)
                    decay[j] = exp_approx(-a * softplus_approx(din[hh * d + j] + dt_bias[hh * d + j]));
            } else {
                decay_all = exp_approx(-a * softplus_approx(din[hh] + dt_bias[hh]));
            }
            float *o = o_row + hh * d;
            delta_head_dispatch(state + (i * h + hh) * d * d, q, k, v, decay_up ? decay : NULL,
                                decay_all, sigmoid_approx(bl[hh]), d, o);
            float ss = 0.0f;  /* gated RMSNorm of the head's output */
            for (int64_t j = 0; j < d; j++) ss += o[j] * o[j];
            float inv = 1.0f / sqrtf(ss / (float)d + norm_eps);
            for (int64_t j = 0; j < d; j++) {
                float g = gate[hh * d + j];
                float act = gate_sigmoid ? sigmoid_approx(g) : g * sigmoid_approx(g);
                o[j] = o[j] * inv * norm_weight[j] * act;
            }
        }
    }
    free(y);
    return 0;
}
