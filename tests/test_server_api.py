"""The OpenAI API through the official `openai` client against a live server (real model)."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.engine.loader import model_id, read_config, resolve_model_dir
from headwise.kvcache.plan_build import streaming_plan
from headwise.kvcache.plans import save_plan
from headwise.server.background import BackgroundServer
from headwise.server.settings import ServerSettings

MODEL = "smollm2-135m"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    shape = read_config(resolve_model_dir(MODEL), model_id(MODEL)).shape
    plan_path = tmp_path_factory.mktemp("plans") / "window.json"
    save_plan(streaming_plan(shape, sink=4, recent=16, name="window"), plan_path)
    config = EngineConfig(model=MODEL, kv_cache_mb=64, plans={"window": str(plan_path)})
    with BackgroundServer(ServerSettings(port=0), lambda: LLMEngine(config)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_completion_answers_with_usage_and_kv_bytes(server, client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=0)
    prompt_len = len(server.state.engine.encode_chat(QUESTION))
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content.startswith("The capital")
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt_len, 4, prompt_len + 4)
    assert r.usage.model_extra["kv_bytes"] > 0


def test_chat_stream_concatenates_to_the_blocking_answer_and_ends_with_usage(client):
    kwargs = dict(model=MODEL, messages=QUESTION, max_tokens=4, temperature=0)
    blocking = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == blocking.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == blocking.usage.prompt_tokens


def test_completion_stream_matches_blocking_and_list_of_parts_content_is_accepted(client):
    blocking = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    streamed = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == blocking.choices[0].text
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    as_parts = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=3, temperature=0)
    as_text = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3, temperature=0)
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content


def test_stop_string_cuts_the_text_and_reports_stop(client):
    full = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=6, temperature=0).choices[0]
    words = re.findall(r"\d+", full.text)
    assert len(words) >= 2, full.text
    stop = words[1]
    cut = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=6, temperature=0, stop=[stop]
    ).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def test_seeded_sampling_is_reproducible_and_n_gives_n_choices(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=1.0, seed=1234, n=3)
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.usage.completion_tokens == 12
    assert first.usage.prompt_tokens == second.usage.prompt_tokens == 4


def test_chat_logprobs_give_top_alternatives_with_the_greedy_token_first(client):
    r = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    assert "".join(entry.token for entry in content) == r.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)
        assert entry.top_logprobs[1].logprob <= entry.logprob <= 0


def test_completion_echo_with_logprobs_covers_prompt_and_completion(client):
    r = client.completions.create(
        model=MODEL, prompt="Paris is a city", max_tokens=2, temperature=0, echo=True, logprobs=1
    )
    choice = r.choices[0]
    assert choice.text.startswith("Paris is a city")
    lp = choice.logprobs
    assert len(lp.tokens) == r.usage.prompt_tokens + 2
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == choice.text


def test_kv_plan_in_extra_body_uses_less_kv_than_the_full_cache(client):
    prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    window = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=2, temperature=0, extra_body={"kv_plan": "window"}
    )
    assert window.choices[0].finish_reason == "length"
    assert 0 < window.usage.model_extra["kv_bytes"] < full.usage.model_extra["kv_bytes"]


def test_models_tokenize_detokenize_and_request_id(server, client):
    card = client.models.list().data[0]
    assert card.id == MODEL and card.model_extra["max_model_len"] == server.state.engine.max_model_len
    assert card.model_extra["kv_plans"] == ["full", "window"]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == "Hello world"
    response = httpx.get(server.url + "/v1/models", headers={"X-Request-Id": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"
    assert httpx.get(server.url + "/v1/models").headers["x-request-id"]


def test_metrics_use_vllm_names_with_the_headwise_prefix(server, client):
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    label = f'{{model_name="{MODEL}"}}'
    for name in (
        "time_to_first_token_seconds_count",
        "inter_token_latency_seconds_count",
        "e2e_request_latency_seconds_count",
        "request_queue_time_seconds_count",
        "prompt_tokens_total",
        "generation_tokens_total",
    ):
        value = re.search(rf"^headwise:{name}{re.escape(label)} (\S+)$", text, re.M)
        assert value and float(value.group(1)) > 0, name
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "num_preemptions_total",
        "kv_bytes_saved_total",
    ):
        assert re.search(rf"^headwise:{name}{re.escape(label)} \S+$", text, re.M), name
    saved = re.search(rf"^headwise:kv_bytes_saved_total{re.escape(label)} (\S+)$", text, re.M)
    assert float(saved.group(1)) >= 0


def _metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    value = re.search(rf'^headwise:{name}{{model_name="{MODEL}"}} (\S+)$', text, re.M)
    assert value, name
    return float(value.group(1))


def test_prefix_cache_hits_show_in_usage_and_metrics(server, client):
    """A second request sharing a long prefix reports the whole blocks it reused as
    `prompt_tokens_details.cached_tokens`, and /metrics counts them (tokens)."""
    engine = server.state.engine
    bs = engine.kv_manager.block_size
    shared = "Cached prefix check. " + " ".join(f"line {i}: the river bends at stone {i * 7}." for i in range(40))
    first_q = [{"role": "user", "content": shared + " What bends at stone 14?"}]
    second_q = [{"role": "user", "content": shared + " Which line mentions stone 21, exactly?"}]
    ids1, ids2 = engine.encode_chat(first_q), engine.encode_chat(second_q)
    ids0 = engine.encode_chat(QUESTION)

    def common(a: list[int], b: list[int]) -> int:
        return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)

    assert common(ids1, ids2) > 8 * bs  # the test needs a prefix spanning several blocks
    client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1, temperature=0)
    queries0, hits0 = _metric(server, "prefix_cache_queries_total"), _metric(server, "prefix_cache_hits_total")

    r1 = client.chat.completions.create(model=MODEL, messages=first_q, max_tokens=2, temperature=0)
    # only the chat template's opening (system prompt) was sent before, by QUESTION
    hit1 = common(ids0, ids1) // bs * bs
    assert r1.usage.prompt_tokens_details.cached_tokens == hit1
    r2 = client.chat.completions.create(model=MODEL, messages=second_q, max_tokens=2, temperature=0)
    expected = min(common(ids1, ids2) // bs, (len(ids2) - 1) // bs) * bs
    assert r2.usage.prompt_tokens == len(ids2)
    assert r2.usage.prompt_tokens_details.cached_tokens == expected
    assert _metric(server, "prefix_cache_queries_total") - queries0 == len(ids1) + len(ids2)
    assert _metric(server, "prefix_cache_hits_total") - hits0 == hit1 + expected
    # the same prompt with caching's answer is the answer computed from scratch (greedy)
    again = client.chat.completions.create(model=MODEL, messages=first_q, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == (len(ids1) - 1) // bs * bs
    assert again.choices[0].message.content == r1.choices[0].message.content
    assert _metric(server, "kv_cache_cached_blocks") > 0
    # with nothing running, the cached blocks count as free
    assert _metric(server, "kv_cache_usage_perc") == 0.0


def test_usage_reports_kv_bytes_decode_below_kv_bytes_under_a_window_plan(client):
    prompt = " ".join(f"word{i}" for i in range(200))
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, temperature=0, extra_body={"kv_plan": "window"}
    )
    extra = r.usage.model_extra
    assert 0 < extra["kv_bytes_decode"] <= extra["kv_bytes"]
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
    assert full.usage.model_extra["kv_bytes_decode"] > extra["kv_bytes_decode"]
