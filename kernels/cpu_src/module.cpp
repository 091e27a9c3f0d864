PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("rotate_half", &rotate_half);
  m.def("linear_columns", &linear_columns);
  m.def("silu_and_mul", &silu_and_mul);
  m.def("causal_prefill", &causal_prefill);
}
