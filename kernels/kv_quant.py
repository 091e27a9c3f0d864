"""8-bit KV cache: the `--kv-cache-dtype` names and the scale contract every op shares.

`auto` keeps K and V in the model's dtype. `fp8` / `fp8_e4m3` (torch `float8_e4m3fn`,
max 448, 3 mantissa bits) and `fp8_e5m2` (max 57344, 2 mantissa bits) store each element in
one byte with a float32 scale per (layer, KV head): the cache holds `x / scale` rounded to
the 8-bit format, a reader gets `stored * scale` (vLLM's `k_scale` / `v_scale`, per head).
Values beyond `scale x format max` are clamped to it (saturation): the scale is fixed once
data is written, since every slot written under it would otherwise change meaning. The
engine calibrates it from the first prefill step's K / V (`calibrated_scale`: the absmax
per head with CALIBRATION_HEADROOM) unless `--kv-scales FILE` gives it.
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")  # engine/config.py repeats them without torch
_FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class KVCacheDtypeError(ValueError):
    """An unknown `--kv-cache-dtype` name."""


def cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's element dtype for `--kv-cache-dtype name` under a model in `model_dtype`."""
    if name == "auto":
        return model_dtype
    if name not in _FP8:
        raise KVCacheDtypeError(f"kv_cache_dtype {name!r} is not supported; choose one of {', '.join(KV_CACHE_DTYPES)}")
    return _FP8[name]


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def element_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x [..., H, D]` / `scale [H]`, clamped to the format's range, in `dtype` (fp8)."""
    top = fp8_max(dtype)
    return (x.float() / scale[:, None]).clamp_(-top, top).to(dtype)


def dequantize(x: torch.Tensor, scale: torch.Tensor | None, head_axis: int) -> torch.Tensor:
    """float32 `x * scale`, `scale [H]` broadcast along `head_axis` of x; as is without a scale."""
    if scale is None:
        return x.float()
    shape = [1] * x.dim()
    shape[head_axis] = scale.numel()
    return x.float() * scale.view(shape)


# calibrated scales leave this much room above the first prompt's absmax: later prompts
# with larger outliers saturate only beyond it, and e4m3 loses only values below ~2^-15 of
# the absmax to its subnormal range, far under the rounding error of the large ones
CALIBRATION_HEADROOM = 4.0


def calibrated_scale(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scale `[H]` of `x [T, H, D]`: its absmax per head x CALIBRATION_HEADROOM mapped to the
    format's max (vLLM's calculate_kv_scales); a head of zeros gets a tiny positive scale."""
    absmax = x.detach().float().abs().amax(dim=(0, 2))
    return (absmax * (CALIBRATION_HEADROOM / fp8_max(dtype))).clamp_(min=1e-12)
