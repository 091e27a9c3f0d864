// The shared part of the CPU ops' one translation unit: kernels/cpu_ops.py joins this file and
// decode.cpp, prefill.cpp, linear.cpp, layer.cpp, module.cpp (in that order) and builds them
// with load_inline
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

// e^f for |f| <= ln 2 / 2: the degree-6 Taylor polynomial in Horner form, on a float or on
// 16 lanes (v16); exp_clamped and exp16_nonpositive scale it by 2^n
template <class T>
static inline T exp_poly(T f) {
  T p = T{} + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  return p * f + 1.f;
}

// exp(x), vectorisable: 2^(x log2 e) as 2^n * p(f) with a degree-6 polynomial (relative error
// ~2e-7), x clamped to [-87, 88] (below, exp(-87) ~ 1.6e-38; above, the fp32 range ends). Used for
// scores minus their running max (x <= 0) and SiLU's exp(-gate)
static inline float exp_clamped(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.f) - 12582912.f;  // round to nearest (1.5 x 2^23), vectorisable
  const float f = (t - n) * 0.693147180559945309f;
  const float p = exp_poly(f);
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

static void prefetch_block(const float* block, int64_t bytes) {
  const char* c = reinterpret_cast<const char*>(block);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 3);
}

// 16 floats: one AVX-512 register (two AVX2 ones); DC = head_dim when it is a multiple of 16
// (the query row and the running output then live in registers), 0 for any other head_dim
typedef float v16 __attribute__((vector_size(64)));

static inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

static inline float sum16(v16 v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

typedef int32_t v16i __attribute__((vector_size(64)));

// exp_clamped for x <= 0 on 16 lanes
static inline v16 exp16_nonpositive(v16 x) {
  const v16 lo = v16{} - 87.f;
  x = x > lo ? x : lo;
  const v16 t = x * 1.44269504088896341f;
  const v16 n = (t + 12582912.f) - 12582912.f;
  const v16 f = (t - n) * 0.693147180559945309f;
  const v16 p = exp_poly(f);
  const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}


// out[s] = the sum of v[s]'s 16 lanes, for 16 vectors at once: four rounds of pairing halves
// (two-source shuffles and adds, 30 + 15 vector ops) instead of 16 scalar chains of 15 adds
static inline v16 sum16x16(const v16* v) {
  v16 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)  // lanes 0-7: v[2i]'s halves summed, 8-15: v[2i+1]'s
    w[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], v16i{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}) +
           __builtin_shuffle(v[2 * i], v[2 * i + 1], v16i{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  for (int i = 0; i < 4; ++i)  // four lanes per vector v[4i..4i+3]
    x[i] = __builtin_shuffle(w[2 * i], w[2 * i + 1], v16i{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}) +
           __builtin_shuffle(w[2 * i], w[2 * i + 1], v16i{4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31});
  for (int i = 0; i < 2; ++i)  // two lanes per vector v[8i..8i+7]
    y[i] = __builtin_shuffle(x[2 * i], x[2 * i + 1], v16i{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29}) +
           __builtin_shuffle(x[2 * i], x[2 * i + 1], v16i{2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31});
  return __builtin_shuffle(y[0], y[1], v16i{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}) +
         __builtin_shuffle(y[0], y[1], v16i{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31});
}
