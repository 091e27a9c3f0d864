"""The CPU's C++ ops, built on first use: paged decode attention straight from the pool, causal
prefill attention (nothing cached; full heads, or window heads' (sink, recent) mask), few-row fp32 matmuls from a column-block
weight (`linear_columns`, engine/cpu_linear.py), and the fp32 add + RMSNorm, RoPE and SiLU x up
of each layer in one pass each. None has a backward: `serves` refuses inputs that want a gradient.

The torch reference (`reference.paged_decode`) copies each sequence's K and V blocks into a
dense tensor with `index_select` and then runs torch's flash kernel over the copy: every
slot crosses memory three times (read, write, read again). At 16 sequences of 1000 tokens on
the default model the copies were 36% of a decode step (76 of 209 ms, one thread), more than
the attention itself. This op reads each block where it lies: one task per (sequence, KV
head) walks its block-table row, scores the G query heads of that KV head against a block's
slots and folds them into an online softmax (fp32), as
vLLM's CPU paged-attention kernels do.

It serves a cache in the model's dtype (fp32), with the mask `slot < length` while every head's
window still reaches position 0 (full heads, young window heads), and with the (keep, recent)
mask over per-slot positions once a window has moved (blocks nothing sees are skipped); the
reference keeps fp8 scales.

`add_rms_norm` and `rotate_half` replace a chain of ~8 eager ops each (add, pow, mean, rsqrt,
products; float casts, chunks, four products, a concatenation) that cost more in launches than
in arithmetic at decode batch sizes. `g++` builds the module once per machine into torch's
extension cache (~25 s); without a compiler, or with `HEADWISE_CPU_DECODE=torch`, the torch
references run alone.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

// exp(x), vectorisable: 2^(x log2 e) as 2^n * p(f) with a degree-6 polynomial (relative error
// ~2e-7), x clamped to [-87, 88] (below, exp(-87) ~ 1.6e-38; above, the fp32 range ends). Used for
// scores minus their running max (x <= 0) and SiLU's exp(-gate)
static inline float exp_clamped(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.f) - 12582912.f;  // round to nearest (1.5 x 2^23), vectorisable
  const float f = (t - n) * 0.693147180559945309f;
  float p = 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
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
  v16 p = v16{} + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
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

template <int DC>
static void decode_rows(const float* q, const float* kc, const float* vc, const int32_t* tables, const int64_t* rows,
                        const int32_t* lengths, const int32_t* pos, const int32_t* keep, const int64_t* reach,
                        float* out, float* lse, int64_t B, int64_t Hq, int64_t Hkv, int64_t W, int64_t bs,
                        int64_t D_rt, float scale) {
  const int64_t D = DC > 0 ? DC : D_rt;
  const int64_t G = Hq / Hkv;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(G * D), m(G), l(G), sc(bs), vis(bs, 1.f);  // vis: all 1 unless a window moved
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const int64_t len = lengths[b * Hkv + h];
      const int32_t* table = tables + (rows[b] * Hkv + h) * W;
      const float* qh = q + (b * Hq + h * G) * D;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t n0 = 0, j = 0; n0 < len; n0 += bs, ++j) {
        const int64_t cnt = std::min(bs, len - n0);
        const int64_t id = std::max(table[j], 0);  // a released block (-1): only slots below keep count
        const float* kp = kc + id * bs * D;
        const float* vp = vc + id * bs * D;
        if (n0 + bs < len) {  // the next block's K and V while this one is scored
          prefetch_block(kc + int64_t(std::max(table[j + 1], 0)) * bs * D, bs * D * int64_t(sizeof(float)));
          prefetch_block(vc + int64_t(std::max(table[j + 1], 0)) * bs * D, bs * D * int64_t(sizeof(float)));
        }
        if (pos) {  // a moved window: slot n is visible iff n < keep or its position > reach
          const int64_t kb = keep[b * Hkv + h], rb = reach[b * Hkv + h];
          const int32_t* pb = pos + id * bs;
          const bool live = table[j] >= 0;
          bool any = false;
          for (int64_t s = 0; s < cnt; ++s) {
            const bool v = n0 + s < kb || (live && pb[s] > rb);
            vis[s] = v ? 1.f : 0.f;
            any = any || v;
          }
          if (!any) continue;  // nothing visible in this block: its K / V are not read
        }
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qh + g * D;
          float* a = acc.data() + g * D;
          if constexpr (DC > 0) {
            constexpr int R = DC / 16;
            v16 qr[R];
            for (int r = 0; r < R; ++r) qr[r] = load16(qg + 16 * r);
            if (bs % 16 == 0) {  // 16 slots' dot products per reduction (slots past cnt are scored, unused)
              for (int64_t s0 = 0; s0 < cnt; s0 += 16) {
                v16 dots[16];
                for (int s = 0; s < 16; ++s) {
                  const float* ks = kp + (s0 + s) * DC;
                  v16 dot = qr[0] * load16(ks);
                  for (int r = 1; r < R; ++r) dot += qr[r] * load16(ks + 16 * r);
                  dots[s] = dot;
                }
                const v16 z = sum16x16(dots) * scale;
                std::memcpy(sc.data() + s0, &z, sizeof(z));
              }
            } else for (int64_t s = 0; s < cnt; ++s) {
              v16 dot = qr[0] * load16(kp + s * DC);
              for (int r = 1; r < R; ++r) dot += qr[r] * load16(kp + s * DC + 16 * r);
              sc[s] = sum16(dot) * scale;
            }
          } else {
            for (int64_t s = 0; s < cnt; ++s) {
              const float* ks = kp + s * D;
              float dot = 0.f;
#pragma omp simd reduction(+ : dot)
              for (int64_t d = 0; d < D; ++d) dot += qg[d] * ks[d];
              sc[s] = dot * scale;
            }
          }
          if (pos)  // a moved window: hidden slots score -inf
            for (int64_t s = 0; s < cnt; ++s) sc[s] = vis[s] > 0.f ? sc[s] : -std::numeric_limits<float>::infinity();
          float bm = -std::numeric_limits<float>::infinity();  // the block's max over visible slots
#pragma omp simd reduction(max : bm)
          for (int64_t s = 0; s < cnt; ++s) bm = std::max(bm, sc[s]);
          const float nm = std::max(m[g], bm);
          const float alpha = std::exp(m[g] - nm);
          float sum = l[g] * alpha;
#pragma omp simd reduction(+ : sum)
          for (int64_t s = 0; s < cnt; ++s) {
            sc[s] = exp_clamped(sc[s] - nm) * vis[s];
            sum += sc[s];
          }
          if constexpr (DC > 0) {
            constexpr int R = DC / 16;
            v16 o[R];
            for (int r = 0; r < R; ++r) o[r] = load16(a + 16 * r) * alpha;
            for (int64_t s = 0; s < cnt; ++s)
              for (int r = 0; r < R; ++r) o[r] += sc[s] * load16(vp + s * DC + 16 * r);
            std::memcpy(a, o, sizeof(o));
          } else {
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
            for (int64_t s = 0; s < cnt; ++s) {
              const float p = sc[s];
              const float* vs = vp + s * D;
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) a[d] += p * vs[d];
            }
          }
          l[g] = sum;
          m[g] = nm;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* o = out + (b * Hq + h * G + g) * D;
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
        for (int64_t d = 0; d < D; ++d) o[d] = acc[g * D + d] * inv;
        lse[b * Hq + h * G + g] = l[g] > 0.f ? m[g] + std::log(l[g]) : -std::numeric_limits<float>::infinity();
      }
    }
  });
}

static void decode_any(const float* q, const float* kc, const float* vc, const int32_t* tables, const int64_t* rows,
                       const int32_t* lengths, const int32_t* pos, const int32_t* keep, const int64_t* reach,
                       float* out, float* lse, int64_t B, int64_t Hq, int64_t Hkv,
                       int64_t W, int64_t bs, int64_t D, float scale) {
  if (D == 64)
    decode_rows<64>(q, kc, vc, tables, rows, lengths, pos, keep, reach, out, lse, B, Hq, Hkv, W, bs, D, scale);
  else if (D == 128)
    decode_rows<128>(q, kc, vc, tables, rows, lengths, pos, keep, reach, out, lse, B, Hq, Hkv, W, bs, D, scale);
  else
    decode_rows<0>(q, kc, vc, tables, rows, lengths, pos, keep, reach, out, lse, B, Hq, Hkv, W, bs, D, scale);
}

std::vector<at::Tensor> paged_decode(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor tables,
                                     at::Tensor rows, at::Tensor lengths, double scale, at::Tensor pos,
                                     at::Tensor keep, at::Tensor reach) {
  TORCH_CHECK(q.dtype() == at::kFloat && q.is_contiguous() && q.dim() == 3, "q: contiguous fp32 [B, Hq, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches: contiguous");
  TORCH_CHECK(k_cache.dtype() == at::kFloat && v_cache.dtype() == at::kFloat, "caches: fp32");
  TORCH_CHECK(tables.dtype() == at::kInt && tables.is_contiguous() && tables.dim() == 3, "tables: int32 [R, Hkv, W]");
  TORCH_CHECK(rows.dtype() == at::kLong && lengths.dtype() == at::kInt && lengths.is_contiguous(), "rows / lengths");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = tables.size(1), W = tables.size(2);
  const int64_t bs = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == D && Hq % Hkv == 0 && lengths.size(0) == B && lengths.size(1) == Hkv, "shapes");
  const bool moved = pos.numel() > 0;  // else every slot below its head's length is visible
  if (moved) {
    TORCH_CHECK(pos.dtype() == at::kInt && pos.is_contiguous() && pos.size(0) == k_cache.size(0) && pos.size(1) == bs,
                "pos: int32 [blocks, block_size]");
    TORCH_CHECK(keep.dtype() == at::kInt && keep.is_contiguous() && keep.numel() == B * Hkv, "keep: int32 [B, Hkv]");
    TORCH_CHECK(reach.dtype() == at::kLong && reach.is_contiguous() && reach.numel() == B * Hkv, "reach: int64 [B, Hkv]");
  }
  auto out = at::empty({B, Hq, D}, q.options());
  auto lse = at::empty({B, Hq}, q.options());
  {
    pybind11::gil_scoped_release nogil;
    decode_any(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), tables.data_ptr<int32_t>(),
               rows.data_ptr<int64_t>(), lengths.data_ptr<int32_t>(), moved ? pos.data_ptr<int32_t>() : nullptr,
               moved ? keep.data_ptr<int32_t>() : nullptr, moved ? reach.data_ptr<int64_t>() : nullptr,
               out.data_ptr<float>(), lse.data_ptr<float>(), B, Hq, Hkv, W, bs, D, float(scale));
  }
  return {out, lse};
}

// y [M, N] = x [M, K] W^T for few rows, fp32, from W packed as [N / 32, K, 32] (`pack_columns`):
// each k of a 32-column block is two vectors that update 8 rows' accumulators (16 registers),
// the weight streams once per 8 rows and is prefetched 8 KB ahead. oneDNN's packed kernel
// reaches 10 GB/s of weight at 8 rows on the default model, this one 12.7
constexpr int64_t COLS = 32;

template <int MT>
static inline void columns_tile(const float* x, const float* wb, float* y, int64_t K, int64_t N) {
  v16 acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = v16{};
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = wb + k * COLS;
    __builtin_prefetch(wk + 2048, 0, 3);
    __builtin_prefetch(wk + 2048 + 16, 0, 3);
    const v16 w0 = load16(wk), w1 = load16(wk + 16);
    for (int m = 0; m < MT; ++m) {
      const float xm = x[m * K + k];
      acc[m][0] += xm * w0;
      acc[m][1] += xm * w1;
    }
  }
  for (int m = 0; m < MT; ++m) std::memcpy(y + m * N, acc[m], sizeof(acc[m]));
}

at::Tensor linear_columns(at::Tensor x, at::Tensor packed) {
  TORCH_CHECK(x.dtype() == at::kFloat && packed.dtype() == at::kFloat && x.dim() == 2 && packed.dim() == 3, "fp32");
  TORCH_CHECK(x.is_contiguous() && packed.is_contiguous() && packed.size(2) == COLS, "contiguous, packed [N/32, K, 32]");
  const int64_t M = x.size(0), K = x.size(1), NB = packed.size(0), N = NB * COLS;
  TORCH_CHECK(packed.size(1) == K, "x [M, K] against packed [N/32, K, 32]");
  auto y = at::empty({M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  pybind11::gil_scoped_release nogil;
  at::parallel_for(0, NB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      const float* wb = wp + nb * K * COLS;
      float* yb = yp + nb * COLS;
      int64_t m = 0;
      for (; m + 8 <= M; m += 8) columns_tile<8>(xp + m * K, wb, yb + m * N, K, N);
      const float* xr = xp + m * K;
      float* yr = yb + m * N;
      switch (M - m) {
        case 1: columns_tile<1>(xr, wb, yr, K, N); break;
        case 2: columns_tile<2>(xr, wb, yr, K, N); break;
        case 3: columns_tile<3>(xr, wb, yr, K, N); break;
        case 4: columns_tile<4>(xr, wb, yr, K, N); break;
        case 5: columns_tile<5>(xr, wb, yr, K, N); break;
        case 6: columns_tile<6>(xr, wb, yr, K, N); break;
        case 7: columns_tile<7>(xr, wb, yr, K, N); break;
        default: break;
      }
    }
  });
  return y;
}

// Causal attention inside each sequence of a flat prefill batch (nothing cached, every head
// full), fp32: q [T, Hq, D], k / v [T, Hkv, D] (token and head strides free, D contiguous), out
// [T, Hq, D]. Per sequence, each KV head's K is first transposed to [T / BK, D, BK] (a key
// block's K^T contiguous: rows 4 KB apart would share L1 sets), padded to whole blocks, so
// both products are broadcast-FMA tiles of 4 rows x 4 vectors: S = Q K^T for 16 queries x 64
// keys from K^T's rows, O += P V from V's rows; online softmax per query row in between
constexpr int64_t BQ = 16, BK = 64;

template <int D>
static void causal_queries(const float* qs, int64_t qst, const float* kt, int64_t Tp, const float* vs, int64_t vst,
                           float* os, int64_t ost, int64_t r0, int64_t nr, float scale, int64_t sink, int64_t recent) {
  alignas(64) float Q[BQ][D];
  alignas(64) float S[BQ][BK];
  alignas(64) float O[BQ][D];
  float m[BQ], l[BQ];
  for (int64_t r = 0; r < BQ; ++r) {
    for (int d = 0; d < D; ++d) Q[r][d] = r < nr ? qs[(r0 + r) * qst + d] * scale : 0.f;
    for (int d = 0; d < D; ++d) O[r][d] = 0.f;
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.f;
  }
  const int64_t rows = (nr + 3) / 4 * 4, kend = r0 + nr;
  for (int64_t k0 = 0; k0 < kend; k0 += BK) {
    const int64_t nk = std::min(BK, kend - k0);
    if (k0 >= sink && k0 + nk - 1 <= r0 - recent) continue;  // past every sink, before every row's window
    for (int64_t rt = 0; rt < rows; rt += 4) {
      v16 acc[4][4];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = v16{};
      for (int d = 0; d < D; ++d) {
        const float* kd = kt + (k0 * D + d * BK);
        const v16 k0v = load16(kd), k1v = load16(kd + 16), k2v = load16(kd + 32), k3v = load16(kd + 48);
        for (int i = 0; i < 4; ++i) {
          const float qv = Q[rt + i][d];
          acc[i][0] += qv * k0v;
          acc[i][1] += qv * k1v;
          acc[i][2] += qv * k2v;
          acc[i][3] += qv * k3v;
        }
      }
      for (int i = 0; i < 4; ++i) std::memcpy(S[rt + i], acc[i], sizeof(acc[i]));
    }
    const v16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const v16 neg_inf = v16{} - std::numeric_limits<float>::infinity();
    // key k0 + s is visible to the query at position i iff s < lim (k0 + s <= i) and it is a
    // sink (s < sink - k0) or inside the window (s > i - recent - k0)
    const float sink_lim = float(std::min(sink - k0, BK));
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t lim = std::min(nk, r0 + r - k0 + 1);
      const float win = float(std::max(r0 + r - recent - k0, int64_t(-1)));
      float* sr = S[r];
      if (lim <= 0 || (sink_lim <= 0.f && win >= float(lim - 1))) {
        std::fill(sr, sr + BK, 0.f);
        continue;
      }
      v16 x[4], mx = neg_inf;
      v16 seen[4];
      for (int j = 0; j < 4; ++j) {
        const v16 s = lane + float(16 * j);
        seen[j] = (s < float(lim)) & ((s < sink_lim) | (s > win)) ? v16{} + 1.f : v16{};
        x[j] = seen[j] > 0.f ? load16(sr + 16 * j) : neg_inf;
        mx = mx > x[j] ? mx : x[j];
      }
      float bm = mx[0];
      for (int i = 1; i < 16; ++i) bm = std::max(bm, mx[i]);
      if (bm == -std::numeric_limits<float>::infinity()) {  // the row sees nothing in this block
        std::fill(sr, sr + BK, 0.f);
        continue;
      }
      const float nm = std::max(m[r], bm);
      const float alpha = exp_clamped(m[r] - nm);  // 0 (to fp32) on the first block: m = -inf
      v16 sum = v16{};
      for (int j = 0; j < 4; ++j) {
        const v16 p = seen[j] > 0.f ? exp16_nonpositive(x[j] - nm) : v16{};
        sum += p;
        std::memcpy(sr + 16 * j, &p, sizeof(p));
      }
      l[r] = l[r] * alpha + sum16(sum);
      m[r] = nm;
      if (alpha != 1.f)
        for (int d = 0; d < D; ++d) O[r][d] *= alpha;
    }
    for (int64_t rt = 0; rt < rows; rt += 4) {
      for (int dj = 0; dj < D; dj += 64) {
        v16 acc[4][4];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] = load16(O[rt + i] + dj + 16 * j);
        for (int64_t s = 0; s < nk; ++s) {
          const float* vr = vs + (k0 + s) * vst + dj;
          const v16 v0 = load16(vr), v1 = load16(vr + 16), v2 = load16(vr + 32), v3 = load16(vr + 48);
          for (int i = 0; i < 4; ++i) {
            const float p = S[rt + i][s];
            acc[i][0] += p * v0;
            acc[i][1] += p * v1;
            acc[i][2] += p * v2;
            acc[i][3] += p * v3;
          }
        }
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) std::memcpy(O[rt + i] + dj + 16 * j, &acc[i][j], sizeof(v16));
      }
    }
  }
  for (int64_t r = 0; r < nr; ++r) {
    const float inv = 1.f / l[r];  // l >= 1: every query sees itself
    for (int d = 0; d < D; ++d) os[(r0 + r) * ost + d] = O[r][d] * inv;
  }
}

template <int D>
static void causal_prefill_d(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                             const std::vector<int64_t>& bounds, float scale, const int32_t* sink,
                             const int32_t* recent) {
  const int64_t Hq = q.size(1), Hkv = k.size(1), G = Hq / Hkv;
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t qst = q.stride(0), qsh = q.stride(1), kst = k.stride(0), ksh = k.stride(1);
  const int64_t vst = v.stride(0), vsh = v.stride(1);
  std::vector<float> kt;
  for (size_t i = 0; i + 1 < bounds.size(); ++i) {
    const int64_t a = bounds[i], T = bounds[i + 1] - a;
    if (T <= 0) continue;
    const int64_t Tp = (T + BK - 1) / BK * BK, QB = (T + BQ - 1) / BQ;
    kt.assign(Hkv * D * Tp, 0.f);
    at::parallel_for(0, Hkv, 1, [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h)
        for (int64_t t = 0; t < T; ++t)
          for (int d = 0; d < D; ++d) kt[h * D * Tp + (t / BK * D + d) * BK + t % BK] = kp[(a + t) * kst + h * ksh + d];
    });
    at::parallel_for(0, Hq * QB, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t task = b0; task < b1; ++task) {
        const int64_t hq = task / QB, qb = task % QB, h = hq / G;
        const int64_t sk = sink ? sink[i * Hkv + h] : 0, rc = recent ? recent[i * Hkv + h] : T;
        causal_queries<D>(qp + a * qst + hq * qsh, qst, kt.data() + h * D * Tp, Tp, vp + a * vst + h * vsh, vst,
                          op + a * Hq * D + hq * D, Hq * D, qb * BQ, std::min(BQ, T - qb * BQ), scale, sk, rc);
      }
    });
  }
}

at::Tensor causal_prefill(at::Tensor q, at::Tensor k, at::Tensor v, std::vector<int64_t> bounds, double scale,
                          at::Tensor sink, at::Tensor recent) {
  TORCH_CHECK(q.dtype() == at::kFloat && k.dtype() == at::kFloat && v.dtype() == at::kFloat, "fp32");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "[T, H, D] with D contiguous");
  const int64_t D = q.size(2);
  TORCH_CHECK(k.size(2) == D && v.size(2) == D && q.size(1) % k.size(1) == 0 && v.size(1) == k.size(1), "shapes");
  TORCH_CHECK(D == 64 || D == 128, "head_dim 64 or 128");
  const bool windowed = sink.numel() > 0;  // else every head is full
  if (windowed) {
    const int64_t n = int64_t(bounds.size()) - 1;
    TORCH_CHECK(sink.dtype() == at::kInt && recent.dtype() == at::kInt && sink.is_contiguous() && recent.is_contiguous() &&
                sink.numel() == n * k.size(1) && recent.numel() == n * k.size(1), "sink / recent: int32 [S, Hkv]");
    TORCH_CHECK(recent.min().item<int32_t>() >= 1, "every query must see itself: recent >= 1");
  }
  const int32_t* sp = windowed ? sink.data_ptr<int32_t>() : nullptr;
  const int32_t* rp = windowed ? recent.data_ptr<int32_t>() : nullptr;
  auto out = at::empty({q.size(0), q.size(1), D}, q.options());
  pybind11::gil_scoped_release nogil;
  if (D == 64)
    causal_prefill_d<64>(q, k, v, out, bounds, float(scale), sp, rp);
  else
    causal_prefill_d<128>(q, k, v, out, bounds, float(scale), sp, rp);
  return out;
}

// silu(gate) * up of x = [gate | up] [T, 2I] -> [T, I], fp32: one pass instead of the chunk's
// strided silu and a product (two temporaries); exp(-g) by exp_clamped (-g above 88: silu is 0
// to fp32 precision anyway)
at::Tensor silu_and_mul(at::Tensor x) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0, "fp32 [T, 2I]");
  const int64_t T = x.size(0), I = x.size(1) / 2;
  auto out = at::empty({T, I}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  pybind11::gil_scoped_release nogil;
  at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float *g = xp + t * 2 * I, *u = g + I;
      float* o = op + t * I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) o[i] = g[i] / (1.f + exp_clamped(-g[i])) * u[i];
    }
  });
  return out;
}

// products rounded one by one, not fused into FMAs: the layer ops equal torch's eager formulas
// (and the Triton kernels) bit for bit
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

// s = x + residual; out = weight * (s / rms(s)) per row, fp32 (what F.rms_norm computes, one pass
// over memory instead of the add, pow, mean, rsqrt and two products)
std::vector<at::Tensor> add_rms_norm(at::Tensor x, at::Tensor residual, at::Tensor weight, double eps) {
  TORCH_CHECK(x.dtype() == at::kFloat && residual.dtype() == at::kFloat && weight.dtype() == at::kFloat, "fp32");
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous(), "contiguous");
  const int64_t H = x.size(-1), T = x.numel() / H;
  TORCH_CHECK(residual.sizes() == x.sizes() && weight.numel() == H, "shapes");
  auto out = at::empty_like(x);
  auto sum = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *rp = residual.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float *op = out.data_ptr<float>(), *sp = sum.data_ptr<float>();
  pybind11::gil_scoped_release nogil;
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float *a = xp + t * H, *b = rp + t * H;
      float* st = sp + t * H;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < H; ++i) {
        st[i] = a[i] + b[i];
        ss += st[i] * st[i];
      }
      const float inv = 1.f / std::sqrt(ss / float(H) + float(eps));
      float* o = op + t * H;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) o[i] = st[i] * inv * wp[i];
    }
  });
  return {out, sum};
}

// RoPE, rotate-half layout, of x [T, H, D] by cos / sin [T, D/2], fp32: one pass per row
at::Tensor rotate_half(at::Tensor x, at::Tensor cos, at::Tensor sin) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 3 && cos.dtype() == at::kFloat && sin.dtype() == at::kFloat, "fp32");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == T && cos.size(1) == half, "cos / sin");
  auto xc = x.contiguous();
  auto out = at::empty({T, H, D}, x.options());
  const float *xp = xc.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  pybind11::gil_scoped_release nogil;
  at::parallel_for(0, T * H, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *x1 = xp + r * D, *x2 = x1 + half, *c = cp + (r / H) * half, *s = sp + (r / H) * half;
      float *o1 = op + r * D, *o2 = o1 + half;
#pragma omp simd
      for (int64_t j = 0; j < half; ++j) {
        o1[j] = x1[j] * c[j] - x2[j] * s[j];
        o2[j] = x2[j] * c[j] + x1[j] * s[j];
      }
    }
  });
  return out;
}

#pragma GCC pop_options

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("rotate_half", &rotate_half);
  m.def("linear_columns", &linear_columns);
  m.def("silu_and_mul", &silu_and_mul);
  m.def("causal_prefill", &causal_prefill);
}
"""


@functools.cache
def _module():
    """The built op, or None (no compiler, a failed build, or HEADWISE_CPU_DECODE=torch)."""
    if os.environ.get("HEADWISE_CPU_DECODE", "").strip().lower() == "torch":
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        if shutil.which("ninja") is None:  # torch runs `ninja` from PATH: the venv's may not be on it
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")

        # the build uses -march=native: a cache shared by different CPUs gets one build each
        tag = torch.backends.cpu.get_cpu_capability().lower()
        return load_inline(
            f"headwise_cpu_ops_{tag}",
            _SOURCE,
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:  # a build failure must not stop the engine: the reference serves
        log.warning("the CPU paged-decode op did not build (%s); decode attention gathers blocks instead", exc)
        return None


_ABSENT = torch.empty(0, dtype=torch.int32)  # an optional tensor argument not given (the C++ side tests numel)


def available() -> bool:
    return _module() is not None


def serves(*tensors: torch.Tensor) -> bool:
    """Every tensor is an fp32 CPU tensor (the only kind the ops take), the ops are built, and
    no gradient is wanted through them: they have no backward, so a profiler that trains through
    the model (duo's gates) keeps the torch formulas and their autograd.

    fp32 only: a bf16 engine keeps the gathering reference, whose greedy tokens matched fp32
    transformers on 7 of the 10 parity prompts where this decode op's gave 5 (its fp32 sums round
    differently to bf16 at 0.3% of the outputs, by one bf16 ulp: no better or worse, but the
    bf16 parity bar of tests/test_hf_parity.py is set by the reference's rounding)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and available()


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    pos_cache: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    reach: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.paged_decode`: out `[B, Hq, D]` in q's dtype and lse `[B, Hq]` fp32 (-inf,
    output 0, for a head with no visible slot). Without `pos_cache` every slot below a head's
    length is visible; with it (a moved window), slot n of a head is visible iff n < keep or its
    position (`pos_cache [blocks, block_size]`, a released block's none) > reach `[B, Hkv]`."""
    module = _module()
    assert module is not None
    out, lse = module.paged_decode(
        q.float().contiguous(),
        k_cache,
        v_cache,
        block_tables.to(torch.int32).contiguous(),
        rows.long(),
        lengths.to(torch.int32).contiguous(),
        scale,
        _ABSENT if pos_cache is None else pos_cache.to(torch.int32).contiguous(),
        _ABSENT if keep is None else keep.to(torch.int32).contiguous(),
        _ABSENT if reach is None else reach.long().contiguous(),
    )
    return out.to(q.dtype), lse


COLUMNS = 32  # output columns per block of a `pack_columns` weight


def pack_columns(weight: torch.Tensor) -> torch.Tensor:
    """fp32 `weight [N, K]` (N a multiple of COLUMNS) as `[N / COLUMNS, K, COLUMNS]`, the layout
    `linear_columns` streams."""
    n, k = weight.shape
    return weight.detach().reshape(n // COLUMNS, COLUMNS, k).transpose(1, 2).contiguous()


def linear_columns(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """`x [M, K] @ W^T` for fp32 `x` from `pack_columns(W)`: for few rows (decode batches)."""
    module = _module()
    assert module is not None
    return module.linear_columns(x.contiguous(), packed)


def causal_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    sink: torch.Tensor | None = None,
    recent: torch.Tensor | None = None,
) -> torch.Tensor:
    """`reference_cpu.causal_prefill` for fp32 `q [T, Hq, D]`, `k / v [T, Hkv, D]` with D 64 or
    128 (contiguous within a head): causal attention inside each sequence of `cu_seqlens`,
    whose tokens are at positions 0, 1, ... With `sink / recent [S, Hkv]` (recent >= 1), the
    mask of `reference.sink_window_prefill` instead: key j is visible to query i iff j <= i
    and (j < sink or j > i - recent); key blocks no query of a tile sees are not read."""
    module = _module()
    assert module is not None
    return module.causal_prefill(
        q,
        k,
        v,
        cu_seqlens.tolist(),
        scale,
        _ABSENT if sink is None else sink.to(torch.int32).contiguous(),
        _ABSENT if recent is None else recent.clamp(max=2**30).to(torch.int32).contiguous(),
    )


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` of fp32 CPU `x = [gate | up]` `[T, 2I]` -> `[T, I]`."""
    module = _module()
    assert module is not None
    return module.silu_and_mul(x.contiguous())


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference_layer.add_rms_norm` for fp32 CPU tensors: (rms_norm(x + residual), x + residual)."""
    module = _module()
    assert module is not None
    out, total = module.add_rms_norm(x.contiguous(), residual.contiguous(), weight.contiguous(), eps)
    return out, total


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of fp32 `x [T, H, D]` by fp32 cos / sin `[T, D / 2]` (`reference_layer.apply_rotary`)."""
    module = _module()
    assert module is not None
    return module.rotate_half(x, cos.contiguous(), sin.contiguous())
