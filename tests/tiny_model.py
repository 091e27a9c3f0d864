"""A tiny random Llama with a word-level tokenizer, and one plan of each kind for it:
engine tests that must not need the default model (GPU runs, Triton-interpreter runs)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.engine.outputs import RequestOutput
from headwise.kvcache.plans import FULL, DynamicSpec, HeadSpec, Plan, save_plan

VOCAB = 512
PLANS = ["full", "window", "elastic", "select", "dynamic"]


def _mixed(shape, spec: HeadSpec) -> list[list[HeadSpec]]:
    return [[FULL if (l + h) % 3 == 0 else spec for h in range(shape.kv_heads)] for l in range(shape.layers)]


def write_tiny_llama(d: Path, heads: int = 6, kv_heads: int = 2, intermediate: int = 512, layers: int = 4) -> str:
    """4 layers, 6 query / 2 KV heads, head_dim 64, vocab 512; lm_head std 1 makes the
    logits wide (std ~20) so greedy ties between two numerically close paths are rare.
    Other head counts keep head_dim 64 (hidden = 64 x heads); `layers=30, heads=9,
    kv_heads=3` is the default model's attention shape (its KV blocks, plans and block
    counts) at a fraction of its weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"<unk>": VOCAB - 2, "<eos>": VOCAB - 1}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>").save_pretrained(d)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64 * heads,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=VOCAB - 1,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
    model.save_pretrained(d)
    return str(d)


# a plain template for server tests: each message's content, then the reply starts
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)


def add_chat_template(model_dir: str) -> None:
    """Give the tiny model's tokenizer a chat template (the word-level vocabulary maps
    unknown words to <unk>, so any message tokenizes)."""
    (Path(model_dir) / "chat_template.jinja").write_text(TINY_CHAT_TEMPLATE)


def write_plans(model_dir: str, d: Path) -> dict[str, str]:
    """window / elastic / select / dynamic plans (every third head full) -> name: path."""
    shape = LLMEngine(EngineConfig(model=model_dir, kv_cache_mb=4)).model_config.shape
    plans = {
        "window": Plan("window", shape, _mixed(shape, HeadSpec("window", sink=4, recent=32))),
        "elastic": Plan("elastic", shape, _mixed(shape, HeadSpec("elastic", sink=4, alpha=8, beta=0.15))),
        "select": Plan("select", shape, _mixed(shape, HeadSpec("select", sink=4, recent=16, select=16, window=8))),
        "dynamic": Plan(
            "dynamic",
            shape,
            [[FULL] * shape.kv_heads for _ in range(shape.layers)],
            dynamic=DynamicSpec(0.5, HeadSpec("select", sink=4, recent=16, select=16, window=8)),
        ),
    }
    for name, plan in plans.items():
        save_plan(plan, d / f"{name}.json")
    return {name: str(d / f"{name}.json") for name in plans}


def random_prompts(n: int, length: int, step: int = 7) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB - 2, (length + step * i,), generator=g).tolist() for i in range(n)]


def run_to_end(eng: LLMEngine, after_step: Callable[[int], None] | None = None) -> dict[str, RequestOutput]:
    """Step `eng` until no request is left; its final outputs by request id. `after_step(n)`
    runs after the n-th step (1-based): to add or abort requests mid-run, or to check."""
    done: dict[str, RequestOutput] = {}
    steps = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        steps += 1
        if after_step is not None:
            after_step(steps)
    return done
