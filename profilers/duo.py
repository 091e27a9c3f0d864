"""DuoAttention (Xiao et al. 2024): one trained gate per KV head, full vs streaming.

Each layer's attention is gate * full + (1 - gate) * streaming (sink + recent) per KV head
(its GQA group shares the gate). With the model frozen, AdamW trains the gates to keep the
final hidden states at the answer tokens of multi-passkey prompts equal to the full
model's (mean squared difference) while 0.05 * mean(gate) pushes them toward streaming.
Gates start at 1 and are clamped to [0, 1] after every step; the `ratio` of KV heads with
the highest gates stay full.

CPU defaults: 768-token prompts, training window sink 64 + recent 128 (DuoAttention
trains with a window that is small next to its contexts), 8 prompts cycled for 40 steps
at lr 0.05 (DuoAttention: 2000 steps at 0.02; 40 x 0.05 still lets a gate reach 0).
"""

from __future__ import annotations

import random

import torch
from tqdm import tqdm

from headwise.kvcache.plan_build import plan_from_scores, plan_source, ratio_plan_name
from headwise.kvcache.plans import HeadSpec, Plan
from headwise.profilers.dense_forward import attention, forward, streaming_mask

DEFAULT_STEPS = 40
DEFAULT_LENGTH = 768
DEFAULT_LR = 0.05
PROMPTS = 8
PASSKEYS = 4  # per prompt
PASSKEY_WORDS = 6
TRAIN_SINK, TRAIN_RECENT = 64, 128
GATE_PENALTY = 0.05


def passkey_prompt(tokenizer, length: int, index: int, seed: int) -> tuple[list[int], list[int]]:
    """Passkeys of random words at sorted depths in real prose, then every question with its
    answer; returns the ids and the positions whose hidden states are supervised (the
    answers' tokens, each as predicted from the position before it)."""
    from headwise.synthetic.prompts import Needle, build_prompt
    from headwise.synthetic.text import ADJECTIVES, NOUNS, encode

    rng = random.Random(f"headwise-profile-duo:{seed}:{length}:{index}")
    words = ADJECTIVES + NOUNS
    keys = [" ".join(rng.choice(words) for _ in range(PASSKEY_WORDS)) for _ in range(PASSKEYS)]
    depths = sorted(rng.random() for _ in keys)
    needles = [Needle(f"The pass key number {i + 1} is: {k}.", d) for i, (k, d) in enumerate(zip(keys, depths))]
    qa = [
        (
            encode(tokenizer, f"\nWhat is the pass key number {i + 1}? The pass key number {i + 1} is:"),
            encode(tokenizer, f" {k}."),
        )
        for i, k in enumerate(keys)
    ]
    tail = sum(len(q) + len(a) for q, a in qa)
    prompt = build_prompt(
        tokenizer,
        length - tail,
        "There are important pass keys hidden inside a lot of irrelevant text. Find them and memorize them.",
        needles,
        "",
        "",
        "natural",
        rng,
    )
    ids, supervised = list(prompt.ids), []
    for q, a in qa:
        ids += q
        supervised += range(len(ids) - 1, len(ids) + len(a) - 1)
        ids += a
    return ids, supervised


def train_gates(
    model,
    data: list[tuple[list[int], list[int]]],
    steps: int,
    lr: float,
    seed: int,
    sink: int = TRAIN_SINK,
    recent: int = TRAIN_RECENT,
    progress: bool = True,
) -> tuple[torch.Tensor, float]:
    """Trained gates `[L, Hkv]` and the last step's distillation loss."""
    cfg = model.cfg
    torch.manual_seed(seed)
    group = cfg.num_heads // cfg.num_kv_heads
    targets = []
    for ids, sup in data:
        with torch.no_grad():
            targets.append(forward(model, torch.tensor(ids))[sup])
    gates = torch.ones(cfg.num_layers, cfg.num_kv_heads, requires_grad=True)
    opt = torch.optim.AdamW([gates], lr=lr, weight_decay=0.0)
    masks = {len(ids): streaming_mask(len(ids), sink, recent) for ids, _ in data}
    distill = 0.0
    with tqdm(range(steps), desc="duo gates", unit="step", disable=not progress) as bar:
        for step in bar:
            ids, sup = data[step % len(data)]
            mask = masks[len(ids)]

            def attend(layer, q, k, v):
                g = gates[layer].repeat_interleave(group)[None, :, None]  # [1, Hq, 1]
                return g * attention(q, k, v) + (1 - g) * attention(q, k, v, mask)  # noqa: B023

            hidden = forward(model, torch.tensor(ids), attend)[sup]
            loss_distill = (hidden - targets[step % len(data)]).pow(2).mean()
            loss = loss_distill + GATE_PENALTY * gates.mean()
            opt.zero_grad()
            gates.grad = torch.autograd.grad(loss, [gates])[0]
            opt.step()
            with torch.no_grad():
                gates.clamp_(0, 1)
            distill = float(loss_distill.detach())
            bar.set_postfix_str(f"distill {distill:.4f} mean gate {float(gates.detach().mean()):.3f}")
    return gates.detach(), distill


def profile_duo(
    model,
    tokenizer,
    ratio: float,
    rest: HeadSpec,
    steps: int,
    length: int,
    lr: float,
    seed: int,
    name: str | None,
    progress: bool = True,
) -> tuple[Plan, str]:
    data = [passkey_prompt(tokenizer, length, i, seed) for i in range(PROMPTS)]
    gates, distill = train_gates(model, data, steps, lr, seed, progress=progress)
    params = {
        "steps": steps,
        "length": length,
        "lr": lr,
        "seed": seed,
        "prompts": PROMPTS,
        "train_sink": TRAIN_SINK,
        "train_recent": TRAIN_RECENT,
        "gate_penalty": GATE_PENALTY,
        "final_distill_loss": round(distill, 6),
    }
    plan = plan_from_scores(
        model.cfg.shape,
        [[round(v, 6) for v in row] for row in gates.tolist()],
        ratio,
        rest,
        name or ratio_plan_name("duo", ratio),
        plan_source("duo", params),
    )
    note = (
        f"{steps} steps, final distillation loss {distill:.4f}, gates mean {float(gates.mean()):.3f}, "
        f"{int((gates > 0.5).sum())} above 0.5"
    )
    return plan, note
