/*
 * One decode token of softmax attention (FA, SWA) for a batch of sequences, fp32, CPU.
 *
 * Built and loaded by kernels/cpu/__init__.py (plain C, no Python or torch headers: it compiles in well
 * under a second, and its inputs are raw pointers into torch tensors). Why it exists: PyTorch's CPU
 * scaled_dot_product_attention reads a cold KV cache at ~10 GB/s on one thread for a single query row per KV
 * head group, where a plain streaming read reaches ~26-38 GB/s, so a long-context decode step was mostly spent
 * there. Here each KV head's keys are read once for all the query heads of its group (pass 1: scores), the
 * scores are exponentiated in cache, and the values are read once (pass 2): each cache byte is read once per
 * step, sequentially.
 *
 * One call also does what used to be ~20 small torch ops per layer: rotary embedding of the new q and k
 * (Llama's rotate-half convention), the write of the new key/value into the cache slot, and the output in the
 * [heads * head_dim] layout the output projection reads.
 *
 * Accumulation is fp32 throughout. Reductions are reassociated (built with -fassociative-math so dot products
 * vectorise), so results match the reference path to fp32 rounding, not bit for bit
 * (tests/kernels/test_cpu_kernels.py).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vmath.h"

/* Llama's rotate-half rotary embedding of one head: out[j] = x[j] cos[j] - x[j + d/2] sin[j] and
 * out[j + d/2] = x[j + d/2] cos[j + d/2] + x[j] sin[j + d/2]; times ``scale`` (1, or the softmax scale for q). */
static inline void rotate(const float *restrict x, const float *restrict cos_, const float *restrict sin_,
                          int64_t d, float scale, float *restrict out) {
    int64_t half = d / 2;
    for (int64_t j = 0; j < half; j++) {
        out[j] = (x[j] * cos_[j] - x[j + half] * sin_[j]) * scale;
        out[j + half] = (x[j + half] * cos_[j + half] + x[j] * sin_[j + half]) * scale;
    }
}

/* Attention of ``groups`` query rows q [groups, d] (already scaled) over n cached keys/values [n, d] of one KV
 * head; out [groups, d]. ``scores`` has room for groups * n floats. Inlined into callers with constant d and
 * groups, so the loops unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void attend_head(
    const float *restrict q, const float *restrict k, const float *restrict v, int64_t n, int64_t d,
    int64_t groups, float *restrict scores, float *restrict out) {
    for (int64_t t = 0; t < n; t++) {  /* pass 1: every key read once, dotted with each query of the group */
        const float *kt = k + t * d;
        for (int64_t g = 0; g < groups; g++) {
            const float *qg = q + g * d;
            float s = 0.0f;
            for (int64_t j = 0; j < d; j++) s += qg[j] * kt[j];
            scores[g * n + t] = s;
        }
    }
    float inv_sum[16];
    for (int64_t g = 0; g < groups; g++) {  /* softmax numerators in place; the sums divide the output */
        float *s = scores + g * n;
        float m = s[0];
        for (int64_t t = 1; t < n; t++) m = s[t] > m ? s[t] : m;
        float sum = 0.0f;
        for (int64_t t = 0; t < n; t++) {
            float e = exp_approx(s[t] - m);
            s[t] = e;
            sum += e;
        }
        inv_sum[g] = 1.0f / sum;
    }
    for (int64_t g = 0; g < groups; g++)
        for (int64_t j = 0; j < d; j++) out[g * d + j] = 0.0f;
    for (int64_t t = 0; t < n; t++) {  /* pass 2: every value read once, accumulated into each query's output */
        const float *vt = v + t * d;
        for (int64_t g = 0; g < groups; g++) {
            float p = scores[g * n + t];
            float *og = out + g * d;
            for (int64_t j = 0; j < d; j++) og[j] += p * vt[j];
        }
    }
    for (int64_t g = 0; g < groups; g++)
        for (int64_t j = 0; j < d; j++) out[g * d + j] *= inv_sum[g];
}

#define ATTEND_CASE(G, D)                                                                        \
    case (G) * 1024 + (D):                                                                       \
        attend_head(q, k, v, n, (D), (G), scores, out);                                          \
        return;

/* attend_head with groups and d as compile-time constants for the common shapes, a generic loop otherwise. */
static void attend_dispatch(const float *q, const float *k, const float *v, int64_t n, int64_t d, int64_t groups,
                            float *scores, float *out) {
    switch (groups * 1024 + d) {
        ATTEND_CASE(1, 64) ATTEND_CASE(2, 64) ATTEND_CASE(3, 64) ATTEND_CASE(4, 64)
        ATTEND_CASE(5, 64) ATTEND_CASE(6, 64) ATTEND_CASE(7, 64) ATTEND_CASE(8, 64)
        ATTEND_CASE(1, 128) ATTEND_CASE(2, 128) ATTEND_CASE(3, 128) ATTEND_CASE(4, 128)
        ATTEND_CASE(5, 128) ATTEND_CASE(6, 128) ATTEND_CASE(7, 128) ATTEND_CASE(8, 128)
        default:
            attend_head(q, k, v, n, d, groups, scores, out);
    }
}

static __thread float *scratch = NULL; /* per thread, grown as needed: the scores and the rotated queries */
static __thread int64_t scratch_floats = 0;

static float *scratch_for(int64_t floats) {
    if (floats > scratch_floats) {
        free(scratch);
        scratch = malloc((size_t)floats * sizeof(float));
        scratch_floats = scratch ? floats : 0;
    }
    return scratch;
}

/*
 * n rows (sequences), each with its own cache. Row i's q [num_heads * d] is at q + i * q_stride, its new
 * k / v [num_kv_heads * d] (q and k before rotary) at k_new / v_new + i * kv_stride, its rotary row cos / sin [d]
 * at + i * rope_stride (cos_ NULL: q and k are used as given), its output [num_heads * d] at out + i * out_stride.
 * k_caches[i] / v_caches[i]: [num_kv_heads, capacity, d] with head_strides[i] floats between heads; the new
 * key/value is written at slots[i] and the query attends to slots [0, n_attend[i]) (FA: slot = length,
 * n_attend = length + 1; SWA: its ring slot, and every filled slot of the ring). ring_pos (SWA, else NULL):
 * ring_pos[i] is row i's int64 position-per-slot array, and positions[i] is written to its slot.
 * Returns 0, or -1 when out of memory or given a shape it does not serve (nothing is written then).
 */
int attention_decode_f32(int64_t n, const float *q, int64_t q_stride, const float *k_new, const float *v_new,
                         int64_t kv_stride, const float *cos_, const float *sin_, int64_t rope_stride,
                         float *const *k_caches, float *const *v_caches, const int64_t *head_strides,
                         const int64_t *slots, const int64_t *n_attend, int64_t *const *ring_pos,
                         const int64_t *positions, int64_t num_heads, int64_t num_kv_heads, int64_t d, float scale,
                         float *out, int64_t out_stride) {
    int64_t groups = num_heads / num_kv_heads, longest = 0;
    /* 16: kernels/cpu/__init__.py MAX_QUERY_GROUPS (inv_sum below), which callers check first */
    if (groups < 1 || groups > 16 || groups * num_kv_heads != num_heads || d % 2) return -1;
    for (int64_t i = 0; i < n; i++) {
        if (n_attend[i] < 1) return -1;
        longest = n_attend[i] > longest ? n_attend[i] : longest;
    }
    float *buf = scratch_for(groups * longest + num_heads * d);
    if (!buf) return -1;
    float *qs = buf + groups * longest;
    for (int64_t i = 0; i < n; i++) {
        const float *qi = q + i * q_stride, *ki = k_new + i * kv_stride, *vi = v_new + i * kv_stride;
        const float *ci = cos_ ? cos_ + i * rope_stride : NULL, *si = sin_ ? sin_ + i * rope_stride : NULL;
        int64_t hs = head_strides[i], len = n_attend[i];
        if (ring_pos) ring_pos[i][slots[i]] = positions[i];
        for (int64_t h = 0; h < num_kv_heads; h++) {
            float *kc = k_caches[i] + h * hs + slots[i] * d;
            float *vc = v_caches[i] + h * hs + slots[i] * d;
            if (ci) rotate(ki + h * d, ci, si, d, 1.0f, kc);
            else memcpy(kc, ki + h * d, (size_t)d * sizeof(float));
            memcpy(vc, vi + h * d, (size_t)d * sizeof(float));
        }
        for (int64_t h = 0; h < num_heads; h++) {
            if (ci) rotate(qi + h * d, ci, si, d, scale, qs + h * d);
            else
                for (int64_t j = 0; j < d; j++) qs[h * d + j] = qi[h * d + j] * scale;
        }
        for (int64_t h = 0; h < num_kv_heads; h++)
            attend_dispatch(qs + h * groups * d, k_caches[i] + h * hs, v_caches[i] + h * hs, len, d, groups, buf,
                            out + i * out_stride + h * groups * d);
    }
    return 0;
}
