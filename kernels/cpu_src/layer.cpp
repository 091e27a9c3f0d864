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
