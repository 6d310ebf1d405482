/* Fused elementwise ops of a decoder layer on the CPU, float32, one pass over memory each.
 *
 * In eager torch each of these is four to ten separate kernels (RMSNorm alone: square, mean,
 * add, rsqrt, two multiplies), every one reading and writing the whole activation; here each
 * row is read once and written once. The arithmetic is the reference's: RMSNorm in float32,
 * rotary embedding as x * cos + rotate_half(x) * sin, SiLU as g / (1 + e^-g) times up.
 * Rows are shared out by OpenMP; `num_threads` is torch's intra-op thread count.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "fast_math.h"

#define PARALLEL_MIN_ELEMENTS 32768 /* below this, threads cost more than they save */

/* residual[t] += x[t] (when residual is not NULL; then the sum is what is normalised), and
 * out[t] = residual[t] * rsqrt(mean(residual[t]^2) + eps) * weight. */
void manta_add_rms_norm_f32(
    const float *x, float *residual, const float *weight, float *out,
    int64_t rows, int64_t dim, float eps, int64_t num_threads)
{
#pragma omp parallel for num_threads(num_threads) if (rows * dim >= PARALLEL_MIN_ELEMENTS)
    for (int64_t t = 0; t < rows; t++) {
        const float *xr = x + t * dim;
        float *h = residual != NULL ? residual + t * dim : (float *)xr;
        float sum = 0.0f;
        if (residual != NULL) {
#pragma omp simd reduction(+ : sum)
            for (int64_t d = 0; d < dim; d++) {
                h[d] += xr[d];
                sum += h[d] * h[d];
            }
        } else {
#pragma omp simd reduction(+ : sum)
            for (int64_t d = 0; d < dim; d++) sum += h[d] * h[d];
        }
        const float inv = 1.0f / sqrtf(sum / (float)dim + eps);
        float *o = out + t * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; d++) o[d] = weight[d] * (h[d] * inv);
    }
}

/* In place, for q [T, num_q_heads, D] and k [T, num_k_heads, D] (row strides given, D
 * contiguous): x[:D/2], x[D/2:] <- x1 cos - x2 sin, x2 cos + x1 sin, with the cos/sin rows
 * [max_positions, D] of each token's position. */
void manta_rotary_f32(
    float *q, int64_t q_stride_t, int64_t q_stride_h, int64_t num_q_heads,
    float *k, int64_t k_stride_t, int64_t k_stride_h, int64_t num_k_heads,
    const int64_t *positions, const float *cos, const float *sin,
    int64_t rows, int64_t head_dim, int64_t num_threads)
{
    const int64_t half = head_dim / 2;
    const int64_t heads = num_q_heads + num_k_heads;
#pragma omp parallel for num_threads(num_threads) if (rows * heads * head_dim >= PARALLEL_MIN_ELEMENTS)
    for (int64_t t = 0; t < rows; t++) {
        const float *c = cos + positions[t] * head_dim, *s = sin + positions[t] * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            float *x = h < num_q_heads ? q + t * q_stride_t + h * q_stride_h
                                       : k + t * k_stride_t + (h - num_q_heads) * k_stride_h;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float x1 = x[i], x2 = x[i + half];
                x[i] = x1 * c[i] + (-x2) * s[i];
                x[i + half] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
    }
}

/* out[t] = silu(gate_up[t, :I]) * gate_up[t, I:], with I = `inner`. */
void manta_silu_mul_f32(
    const float *gate_up, float *out, int64_t rows, int64_t inner, int64_t num_threads)
{
#pragma omp parallel for num_threads(num_threads) if (rows * inner >= PARALLEL_MIN_ELEMENTS)
    for (int64_t t = 0; t < rows; t++) {
        const float *g = gate_up + t * 2 * inner, *u = g + inner;
        float *o = out + t * inner;
#pragma omp simd
        for (int64_t i = 0; i < inner; i++) o[i] = g[i] / (1.0f + manta_exp(-g[i])) * u[i];
    }
}
