/*
 * The gated MLP's activation, silu(gate) * up, for a decode step's rows: gu [rows, 2 * width] holds gate | up
 * side by side (the fused gate/up product's output), out [rows, width]. Two torch ops (and a temporary) per
 * layer in eager mode; one pass here.
 */
#include <stdint.h>

#include "vmath.h"

void silu_mul_f32(const float *restrict gu, int64_t rows, int64_t width, float *restrict out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * 2 * width, *u = g + width;
        float *o = out + r * width;
        for (int64_t j = 0; j < width; j++) o[j] = g[j] * sigmoid_approx(g[j]) * u[j];
    }
}
