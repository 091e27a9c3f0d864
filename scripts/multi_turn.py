"""A chat re-sent in full every turn, through the engine with the prefix cache: how many
prompt tokens each turn computes against how many are new (issue 14's multi-turn target).

    python scripts/multi_turn.py --turns 8 [--model smollm2-135m] [--plan NAME=PATH --kv-plan NAME]
"""

from __future__ import annotations

import argparse
import random
import time

from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.engine.sampling_params import SamplingParams

TOPICS = ("rivers", "mountains", "bread", "trains", "birds", "music", "clocks", "gardens", "bridges", "tea")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--plan", action="append", default=[], help="NAME=PATH")
    p.add_argument("--kv-plan", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    plans = dict(x.split("=", 1) for x in args.plan)
    rng = random.Random(args.seed)
    results = {}
    for caching in (True, False):
        eng = LLMEngine(EngineConfig(model=args.model, plans=plans, kv_cache_mb=256, enable_prefix_caching=caching))
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
        messages = [{"role": "system", "content": "You are a helpful assistant who answers briefly."}]
        seen = computed = new = 0
        outputs, started = [], time.perf_counter()
        for turn in range(args.turns):
            topic = TOPICS[turn % len(TOPICS)]
            words = " ".join(rng.choice(TOPICS) for _ in range(20))
            messages.append({"role": "user", "content": f"Tell me one fact about {topic}. Context words: {words}."})
            prompt = eng.encode_chat(messages)
            out = eng.generate([prompt], params, args.kv_plan)[0]
            computed += len(prompt) - out.num_cached_tokens
            new += len(prompt) - seen
            seen = len(prompt) + len(out.token_ids)
            outputs.append(out.token_ids)
            messages.append({"role": "assistant", "content": out.text})
        results[caching] = outputs
        print(
            f"prefix caching {'on' if caching else 'off'}: {args.turns} turns, {computed} prompt tokens computed "
            f"for {new} new ones ({computed / new:.2f}x), {time.perf_counter() - started:.1f} s"
        )
        rng = random.Random(args.seed)
    same = sum(a == b for a, b in zip(results[True], results[False]))
    print(f"multi-turn: {same} of {args.turns} turns give the same tokens with and without the cache")


if __name__ == "__main__":
    main()
