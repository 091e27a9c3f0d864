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
