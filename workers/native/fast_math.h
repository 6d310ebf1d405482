/* Math the CPU kernels share, written without calls so the compiler vectorises the loops
 * that use it. */
#ifndef MANTA_FAST_MATH_H
#define MANTA_FAST_MATH_H

#include <stdint.h>

/* e^x to within 2 ulp of expf: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor
 * polynomial, 2^n by building the exponent bits; n is rounded by the 1.5 * 2^23 trick, which
 * vectorises where rintf may not. Saturates outside [-87, 88] (e^-87 is about FLT_MIN). */
static inline float manta_exp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int32_t i; float f; } scale = { .i = ((int32_t)n + 127) << 23 };
    return p * scale.f;
}

#endif
