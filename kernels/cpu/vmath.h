/*
 * Elementwise functions as straight-line arithmetic the compiler vectorises (libm's are a call per element).
 * e^x: Cephes' expf --
 * range reduction by ln 2, a degree-6 polynomial, the exponent put in by integer bits; relative error ~1e-7.
 * x is clamped to [-87, 88] (e^-87 ~ 1.6e-38 instead of underflow, e^88 ~ 1.7e38 instead of overflow), which no
 * caller distinguishes: softmax weights after the max, sigmoid and SiLU gates, the delta rules' decays.
 */
#ifndef SUPERNET_VMATH_H
#define SUPERNET_VMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

static inline float sigmoid_approx(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

/* log(1 + e^x) = max(x, 0) + log(1 + t), t = e^-|x| in (0, 1], with log(1 + t) = 2 atanh(s), s = t / (2 + t)
 * <= 1/3 (t itself, not (1 + t) - 1, so small t keeps its precision), by the odd series to s^13 (truncation
 * < 1e-8 relative). */
static inline float softplus_approx(float x) {
    float ax = x < 0.0f ? -x : x;
    float t = exp_approx(-ax);
    float s = t / (2.0f + t), s2 = s * s;
    float p = 1.0f / 13.0f;
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return (x > 0.0f ? x : 0.0f) + 2.0f * s * p;
}

#endif
