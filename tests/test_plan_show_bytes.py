"""`plan show` counts the bytes the engine holds: the blocks of each head at the request's
decode peak, in the engine's dtype (fp32 on CPU by default), so its totals equal what
`eval` reports as a request's decode-time KV bytes."""

from __future__ import annotations

from headwise.clients.cli import main
from headwise.clients.commands.plan import _fmt_bytes
from headwise.engine.sampling_params import SamplingParams
from headwise.kvcache.plan_build import streaming_plan
from headwise.kvcache.plans import save_plan


def test_plan_show_total_equals_the_engines_kv_bytes(tmp_path, capsys, make_engine):
    plan_path = tmp_path / "w.json"
    engine = make_engine(kv_cache_mb=16)
    save_plan(streaming_plan(engine.model_config.shape, sink=4, recent=32, name="w"), plan_path)
    engine = make_engine(kv_cache_mb=16, plans={"w": str(plan_path)})
    prompt = list(range(1000, 1060))
    full, window = engine.generate([prompt, prompt], SamplingParams(max_tokens=40, ignore_eos=True), ["full", "w"])
    assert main(["plan", "show", str(plan_path), "--context", "100", "--prompt", "60"]) == 0
    total = capsys.readouterr().out.splitlines()[-1]
    # 90 heads x 7 blocks (99 positions written) of 16 x (K + V) x 64 dims x 4 bytes; a window
    # head holds its sink block, the 2-3 blocks its 32-token window overlaps and, between
    # release points, one expired block: 4 at its peak
    assert (full.kv_bytes_decode, window.kv_bytes_decode, window.kv_bytes) == (
        90 * 7 * 8192,
        90 * 4 * 8192,
        90 * 4 * 8192,
    )
    assert total == (
        f"total: 0 of 90 kv heads full, KV {_fmt_bytes(window.kv_bytes_decode)} of "
        f"{_fmt_bytes(full.kv_bytes_decode)} full per request = 0.571x at 100 tokens"
    )
