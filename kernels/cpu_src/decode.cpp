// Paged decode attention straight from the pool, one task per (sequence, KV head): see kernels/cpu_ops.py
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
