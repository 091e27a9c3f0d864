"""`plan show` counts the bytes the engine holds: its default dtype is the engine's (fp32 on
CPU), so its MiB equal the kv_bytes that `eval` and the server report."""

from __future__ import annotations

from headwise.clients.cli import main
from headwise.clients.commands.plan import _fmt_bytes
from headwise.engine.sampling_params import SamplingParams
from headwise.kvcache.plan_build import streaming_plan
from headwise.kvcache.plans import save_plan


def test_plan_show_total_equals_the_engines_kv_bytes(tmp_path, capsys, make_engine, tok):
    plan_path = tmp_path / "w.json"
    engine = make_engine(kv_cache_mb=16)
    save_plan(streaming_plan(engine.model_config.shape, sink=4, recent=32, name="w"), plan_path)
    engine = make_engine(kv_cache_mb=16, plans={"w": str(plan_path)})
    # 60 + 40 = 100 tokens: 99 written, the same 7 blocks of 16 a 100-token context rounds to
    prompt = list(range(1000, 1060))
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    full, window = engine.generate([prompt, prompt], params, ["full", "w"])
    assert main(["plan", "show", str(plan_path), "--context", "100"]) == 0
    total = capsys.readouterr().out.splitlines()[-1]
    # 90 heads x 3 blocks (36 slots) of 16 x (K + V) x 64 dims x 4 bytes, of 90 x 7 blocks
    assert (window.kv_bytes, full.kv_bytes) == (90 * 3 * 8192, 90 * 7 * 8192)
    assert total == (f"total: 0 of 90 kv heads full, KV {_fmt_bytes(window.kv_bytes)} of {_fmt_bytes(full.kv_bytes)} "
                     "full per request = 0.429x at 100 tokens")
