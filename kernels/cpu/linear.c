/*
 * y = x W^T + b for a decode step's few rows (1 to a few dozen), fp32, CPU.
 *
 * A decode step multiplies a handful of rows by every weight matrix of the model, so it is a stream over the
 * weights: at 8 rows a weight byte takes 4 flops, which this core does at ~240 GFLOP/s, so even 8 rows should
 * run at the memory's pace. oneDNN's packed product reached only ~18-20 GB/s at 8 rows on one thread here and
 * a row-major dot-product loop ~30 at one row. This kernel reads W in blocks of 16 output channels,
 * wb[n / 16][k][n % 16] (kernels.cpu.block_weight lays it out; the last block zero-padded): for each k one
 * 64-byte load of the block feeds one fused multiply-add per row (x[r][k] broadcast), accumulating 16 outputs
 * per row in a register, and a software prefetch 8 KB ahead keeps the single sequential stream at the memory's
 * rate. Measured here on one thread: 25-34 GB/s at 1-8 rows through benchmarks/bench_linear.py (up to ~38 in a
 * standalone C loop; this VM's bandwidth drifts); past 8 rows a block (in L1/L2 by then) is reread per 8 rows,
 * ~130-180 GFLOP/s at 16-64 rows.
 *
 * GCC/Clang vector extensions, no intrinsics: the 16-float vector is one AVX-512 register, two AVX2 ones, or
 * four NEON ones, whatever -march=native gives.
 */
#include <stdint.h>
#include <string.h>

#define BLOCK 16               /* output channels per block: one 64-byte vector */
#define MAX_ROWS 8             /* rows per pass over a block: their accumulators stay in registers */
#define PREFETCH_FLOATS 2048   /* 8 KB ahead in the block stream (swept 512-4096 here; 8 KB was best) */

typedef float vec16 __attribute__((vector_size(BLOCK * sizeof(float))));

/* acc[r] = sum_k x[r][k] * w[k][0..15] for ``rows`` (a compile-time constant after inlining) rows. */
static inline __attribute__((always_inline)) void block_rows(int rows, const float *restrict x, int64_t x_stride,
                                                             const float *restrict w, int64_t in, vec16 *acc) {
    vec16 sum[MAX_ROWS];
    for (int r = 0; r < rows; r++) sum[r] = (vec16){0};
    for (int64_t k = 0; k < in; k++) {
        vec16 wk;
        memcpy(&wk, w + k * BLOCK, sizeof wk);
        __builtin_prefetch(w + k * BLOCK + PREFETCH_FLOATS, 0, 0);
        for (int r = 0; r < rows; r++) sum[r] += x[r * x_stride + k] * wk;
    }
    for (int r = 0; r < rows; r++) acc[r] = sum[r];
}

/* x [rows, in] (row stride x_stride), wb as above for ``out`` channels, bias [out] or NULL, y [rows, out]
 * (row stride y_stride), overwritten, or added to when ``accumulate`` (a residual connection's y += x W^T). */
void linear_blocked_f32(const float *restrict x, int64_t x_stride, int64_t rows, const float *restrict wb,
                        const float *restrict bias, int64_t out, int64_t in, float *restrict y, int64_t y_stride,
                        int accumulate) {
    for (int64_t b = 0; b * BLOCK < out; b++) {
        const float *w = wb + b * in * BLOCK;
        int64_t n0 = b * BLOCK, width = out - n0 < BLOCK ? out - n0 : BLOCK;
        for (int64_t r0 = 0; r0 < rows; r0 += MAX_ROWS) {
            const float *xr = x + r0 * x_stride;
            vec16 acc[MAX_ROWS];
            int n = rows - r0 < MAX_ROWS ? (int)(rows - r0) : MAX_ROWS;
            switch (n) { /* one specialised loop per row count: every accumulator a register */
                case 1: block_rows(1, xr, x_stride, w, in, acc); break;
                case 2: block_rows(2, xr, x_stride, w, in, acc); break;
                case 3: block_rows(3, xr, x_stride, w, in, acc); break;
                case 4: block_rows(4, xr, x_stride, w, in, acc); break;
                case 5: block_rows(5, xr, x_stride, w, in, acc); break;
                case 6: block_rows(6, xr, x_stride, w, in, acc); break;
                case 7: block_rows(7, xr, x_stride, w, in, acc); break;
                default: block_rows(MAX_ROWS, xr, x_stride, w, in, acc); break;
            }
            for (int r = 0; r < n; r++) {
                float *yr = y + (r0 + r) * y_stride + n0;
                for (int64_t j = 0; j < width; j++) {
                    float v = bias ? acc[r][j] + bias[n0 + j] : acc[r][j];
                    yr[j] = accumulate ? yr[j] + v : v;
                }
            }
        }
    }
}
