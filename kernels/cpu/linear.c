/*
 * y = x W^T + b for one input row, fp32, CPU: a decode step at batch 1 multiplies one vector by every weight
 * matrix of the model, so it is a pure stream over the weights. Row-major W [out, in] is read once,
 * sequentially, each row dotted with x (in L1). One thread reached 30-34 GB/s this way against 24-31 GB/s for
 * oneDNN's packed product at one row (benchmarks/bench_linear.py); from two rows on oneDNN's blocked kernels
 * are as fast or faster, so kernels/linear.py calls this only for single rows.
 */
#include <stdint.h>

void linear_row_f32(const float *restrict x, const float *restrict w, const float *restrict bias, int64_t out,
                    int64_t in, float *restrict y) {
    for (int64_t o = 0; o < out; o++) {
        const float *wr = w + o * in;
        float s = 0.0f;
        for (int64_t j = 0; j < in; j++) s += wr[j] * x[j];
        y[o] = bias ? s + bias[o] : s;
    }
}
