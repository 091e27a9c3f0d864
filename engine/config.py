"""Engine configuration: one dataclass, checked on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16", "float16")
# "auto" (vLLM's word) is resolved on construction by `auto_dtype` into one of DTYPES
DTYPE_CHOICES = ("auto", *DTYPES)
# vLLM's --kv-cache-dtype names (kernels/kv_quant.py; kept here so config needs no torch)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
# vLLM's names: auto reads the checkpoint, dummy draws random weights from config.json alone
LOAD_FORMATS = ("auto", "dummy")


@dataclass
class EngineConfig:
    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    load_format: str = "auto"
    block_size: int = 16
    kv_cache_mb: float | None = None  # pool size; default: DEFAULT_KV_CACHE_MB
    num_blocks: int | None = None  # overrides kv_cache_mb
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's context length
    plans: dict[str, str] = field(default_factory=dict)  # name -> plan file
    default_plan: str = "full"
    seed: int = 0
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # no CUDA graphs for decode steps (vLLM's flag)
    tensor_parallel_size: int = 1  # ranks (processes, one device each) the model is split over
    kv_cache_dtype: str = "auto"  # auto (the model's dtype), fp8 / fp8_e4m3, fp8_e5m2 (kernels/kv_quant.py)
    kv_scales: str | None = None  # fp8 scales file (kvcache/kv_scales.py); None: calibrate from the first prompt
    # select heads prefill bounded: candidates kept between chunks = margin x select (kvcache/prefill_selection.py);
    # 0: they hold the whole prompt until it ends
    select_margin: float = 2.0

    def __post_init__(self) -> None:
        if self.dtype == "auto":
            self.dtype = auto_dtype(self.device)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPE_CHOICES)}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(
                f"load_format {self.load_format!r} is not supported; choose one of {', '.join(LOAD_FORMATS)}"
            )
        if self.block_size not in (8, 16, 32, 64):
            raise ValueError(f"block_size must be 8, 16, 32 or 64, got {self.block_size}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_mb is not None and self.kv_cache_mb <= 0:
            raise ValueError(f"kv_cache_mb must be > 0, got {self.kv_cache_mb}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported; choose one of {', '.join(KV_CACHE_DTYPES)}"
            )
        if self.kv_scales is not None and self.kv_cache_dtype == "auto":
            raise ValueError("kv_scales needs an fp8 kv_cache_dtype (fp8, fp8_e4m3 or fp8_e5m2)")
        if self.select_margin != 0 and not self.select_margin >= 1:
            raise ValueError(f"select_margin must be 0 (off) or >= 1, got {self.select_margin}")
        if "full" in self.plans:
            raise ValueError("plan name 'full' is reserved for the uncompressed cache")


DEFAULT_KV_CACHE_MB = 1024


def auto_dtype(device: str) -> str:
    """What `--dtype auto` runs in: bfloat16 on a GPU, and on a CPU whose matrix units
    multiply bf16 natively (AVX512-BF16 or AMX: torch's oneDNN matmuls run about twice the
    fp32 rate there); float32 on other CPUs, where bf16 would be emulated and slower."""
    import torch  # lazily: `headwise --help` reads DTYPE_CHOICES without torch

    if torch.device(device).type != "cpu":
        return "bfloat16"
    return "bfloat16" if cpu_has_bf16_matmul() else "float32"


def cpu_has_bf16_matmul() -> bool:
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own CPUID probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
