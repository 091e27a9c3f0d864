"""Profilers on a tiny random Llama with one planted needle-reading head find that head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headwise.engine.loader import ModelConfig
from headwise.engine.model import LlamaModel
from headwise.kvcache.plan_build import plan_from_scores, reduce_query_scores
from headwise.kvcache.plans import HeadSpec, load_plan, save_plan
from headwise.profilers import dense_forward as D
from headwise.profilers.retrieval import NeedleTest, copy_paste, retrieval_scores

VOCAB, HIDDEN, D_HEAD = 64, 64, 16
MARKER = 7  # the needle token and, through lm_head, the token the model always generates
CONST, FLAG, READ = 0, 1, 2  # residual dims: 1 for every token / 1 only for MARKER / planted head's output
PLANTED = (1, 3)  # (layer, query head) that attends to MARKER tokens; kv head 1 of layer 1


def tiny_config() -> ModelConfig:
    return ModelConfig(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=D_HEAD,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        qkv_bias=False,
        id="tiny",
    )


def planted_model(seed: int = 0) -> LlamaModel:
    """Random weights, except: every token carries CONST, MARKER also FLAG, no layer writes
    those two dims, lm_head reads only CONST into MARKER's logit (so MARKER is always
    generated), and query head PLANTED's score is large exactly on FLAG keys. Its value
    carries FLAG into READ, which only it writes and which raises MARKER's logit, so the
    loss depends on what that head sees. The planted
    rotary pair is the lowest frequency one, which barely turns over a few hundred tokens."""
    torch.manual_seed(seed)
    cfg = tiny_config()
    model = LlamaModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
        emb = model.embed_tokens.weight
        emb[:, CONST], emb[:, FLAG] = 1.0, 0.0
        emb[MARKER, FLAG] = 1.0
        for layer in model.layers:
            layer.self_attn.o_proj.weight[[CONST, FLAG]] = 0
            layer.mlp.down_proj.weight[[CONST, FLAG, READ]] = 0
            layer.self_attn.o_proj.weight[READ] = 0
        model.norm.weight.zero_()
        model.norm.weight[[CONST, READ]] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[MARKER, CONST] = 1.0
        model.lm_head.weight[MARKER, READ] = 1.0
        layer, head = PLANTED
        qkv = model.layers[layer].self_attn.qkv_proj.weight
        pair = D_HEAD // 2 - 1
        q_rows = slice(head * D_HEAD, (head + 1) * D_HEAD)
        qkv[q_rows] = 0
        qkv[head * D_HEAD + pair, CONST] = 4.0
        kv_head = head // (cfg.num_heads // cfg.num_kv_heads)
        k_row = cfg.num_heads * D_HEAD + kv_head * D_HEAD + pair
        qkv[k_row] = 0
        qkv[k_row, FLAG] = 40.0
        v_row = cfg.num_heads * D_HEAD + cfg.num_kv_heads * D_HEAD + kv_head * D_HEAD
        qkv[v_row] = 0
        qkv[v_row, FLAG] = 1.0
        model.layers[layer].self_attn.o_proj.weight[READ, head * D_HEAD] = 5.0
    return model


def needle_test(length: int = 96, needle: tuple[int, int] = (40, 44), seed: int = 0) -> NeedleTest:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(MARKER + 1, VOCAB, (length,), generator=g).tolist()
    ids[needle[0] : needle[1]] = [MARKER] * (needle[1] - needle[0])
    return NeedleTest(ids, needle, "x", needle[1] - needle[0])


def test_dense_forward_matches_engine_attention():
    model = planted_model()
    ids = torch.tensor(needle_test().prompt_ids)
    with torch.no_grad():
        full = D.forward(model, ids, logits=True)
    logits, cache = D.prefill(model, ids[:-1])
    step = D.decode_step(model, cache, int(ids[-1]))
    torch.testing.assert_close(step, full[-1], rtol=1e-4, atol=1e-4)


def test_planted_head_attends_to_needle():
    model = planted_model()
    test = needle_test()
    probs = {}
    D.greedy(model, test.prompt_ids, 1, record=lambda tok, layer, p: probs.setdefault(layer, p))
    layer, head = PLANTED
    assert probs[layer][head, 40:44].sum() > 0.99


def test_retrieval_finds_the_planted_head():
    model = planted_model()
    tests = [needle_test(needle=(a, a + 4), seed=i) for i, a in enumerate((10, 40, 80))]
    q_scores, n_correct = retrieval_scores(model, tests, lambda t, gen: gen[:4] == [MARKER] * 4, progress=False)
    assert n_correct == 3
    layer, head = PLANTED
    assert q_scores[layer, head] >= 1.0  # copies on every answer token (and beyond)
    assert q_scores.argmax() == layer * 4 + head
    kv = torch.tensor(reduce_query_scores(q_scores.tolist(), 2))
    assert kv[1, 1] == q_scores[layer, head]  # max over the GQA group (query heads 2, 3)
    kv[1, 1] = 0
    assert kv.max() < 0.5  # query head 2 shares the planted keys, so only other KV heads are low


def test_retrieval_plan_keeps_planted_kv_head_full(tmp_path):
    model = planted_model()
    q_scores, _ = retrieval_scores(model, [needle_test()], lambda t, gen: True, progress=False)
    shape = model.cfg.shape
    rest = HeadSpec("select", sink=4, recent=8, select=8, window=4)
    plan = plan_from_scores(shape, reduce_query_scores(q_scores.tolist(), 2), 0.25, rest, "r")
    save_plan(plan, tmp_path / "p.json")
    loaded = load_plan(tmp_path / "p.json", shape)
    assert [[s.kind for s in row] for row in loaded.heads] == [["select", "select"], ["select", "full"]]
    assert sum(loaded.scores, []) == pytest.approx(sum(plan.scores, []))
    assert loaded.scores[1][1] > 0


def test_copy_paste_counts_only_needle_positions():
    model = planted_model()
    test = needle_test()
    outside = NeedleTest(test.prompt_ids, (0, 4), "x", 4)  # a span without the marker
    _, scores = copy_paste(model, outside)
    assert scores[PLANTED] == 0


def test_moa_gives_the_planted_head_the_long_span():
    from headwise.kvcache.milp import band_density, solve_rules
    from headwise.profilers.moa import influence, rule_costs

    model = planted_model()
    test = needle_test(length=128, needle=(8, 12))
    ids = test.prompt_ids + [MARKER]  # the last query must find the far-away marker to predict it
    hist = influence(model, ids, len(ids) - 1, sink=4)
    assert hist.shape == (2, 2, 9)
    n = len(ids)
    rule_list = [(16, 0.0), (32, 0.0), (0, 1.0)]
    cost = rule_costs({n: hist}, [n], rule_list)
    assert cost[3].argmin() == 2 and cost[3, 0] > 0.9  # kv head (1, 1): all its influence is far
    dens = np.array([[band_density(4, a + b * n, n)] for a, b in rule_list])
    choice = solve_rules(cost, dens, [0, 0, 1, 1], bound=(3 * dens[0, 0] + 1) / 4, max_rules=2)
    assert choice[3] == 2 and choice[:3] == [0, 0, 0]


def test_duo_keeps_the_planted_head_gate_high():
    from headwise.profilers.duo import train_gates

    model = planted_model()
    data = []
    for i in range(2):
        ids = needle_test(length=64, needle=(6, 10), seed=i).prompt_ids + [MARKER]
        data.append((ids, [len(ids) - 3, len(ids) - 2]))  # queries far past the window (sink 4 + recent 8)
    gates, _ = train_gates(model, data, steps=30, lr=0.05, seed=0, sink=4, recent=8, progress=False)
    assert gates[1, 1] == gates.max() and gates[1, 1] > 0.5
    others = gates.clone()
    others[1, 1] = 0
    assert others.max() < 0.1  # only the gate penalty acts on them


def test_taskkv_finds_the_head_pointing_away_from_its_layer():
    from headwise.profilers.taskkv import profile_taskkv

    torch.manual_seed(0)
    cfg = tiny_config().__class__(**{**tiny_config().__dict__, "num_heads": 4, "num_kv_heads": 4})
    model = LlamaModel(cfg).eval()
    with torch.no_grad():
        qkv = model.layers[0].self_attn.qkv_proj.weight
        v0 = slice(2 * cfg.num_heads * D_HEAD, 2 * cfg.num_heads * D_HEAD + D_HEAD)
        base = qkv[v0].clone()
        for h in range(4):  # every head's values the same, head 2's reversed
            rows = slice(v0.start + h * D_HEAD, v0.start + (h + 1) * D_HEAD)
            qkv[rows] = -base if h == 2 else base
        qkv[: cfg.num_heads * D_HEAD] = 0  # uniform attention: each output is the mean value
    prompts = [needle_test(seed=i).prompt_ids for i in range(3)]
    rest = HeadSpec("select", sink=4, recent=8, select=8, window=4)
    plan, _ = profile_taskkv(model, prompts, 0.125, rest, window=8, name=None, progress=False)
    assert plan.scores[0] == pytest.approx([0.0, 0.0, 2.0, 0.0], abs=1e-4)
    assert [s.kind for s in plan.heads[0]] == ["select", "select", "full", "select"]
    assert plan.name == "taskkv-12.5"


def test_taskkv_scores_a_kv_head_by_its_farthest_query_head():
    from headwise.kvcache.selection import head_distances, query_head_distances

    v = torch.tensor([1.0, 2.0, -0.5, 3.0])
    out = torch.stack([v, v, v, -v])[None].repeat(5, 1, 1)  # [W=5, Hq=4, D=4], 2 KV heads of 2 query heads
    # center = v / 2: query heads 0-2 point along it (distance 0), head 3 against it (distance 2)
    assert query_head_distances(out, 2).tolist() == pytest.approx([0.0, 2.0], abs=1e-6)
    # concatenating each group's outputs hides the one distinct query head: both groups sit at 1 - 1/sqrt(2)
    assert head_distances(out, 2).tolist() == pytest.approx([1 - 2**-0.5] * 2, abs=1e-6)
