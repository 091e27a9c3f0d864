"""The second hardening round (issue 25), each finding through HTTP against a live server
on the tiny model (tests/round2_server.py): sampler underflow, amplification bounds, read
timeouts, duplicate Authorization, error codes and headers (Allow, Retry-After), the
document's bounds; CORS, generation-config defaults, continue_final_message and served
model names: tests/test_server_round2_options.py."""

from __future__ import annotations

import re
import select
import socket
import threading
import time

import httpx
import pytest

from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.server.background import BackgroundServer
from headwise.server.settings import ServerSettings
from tests.round2_server import (
    AUTH,
    BODY_TIMEOUT,
    CHAT,
    COMPLETIONS,
    HEADER_TIMEOUT,
    KEY,
    MAX_QUEUE,
    error_of,
    post,
    serve,
    text_of,
    write_model,
)
from tests.tiny_model import VOCAB


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return write_model(tmp_path_factory)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    yield from serve(tiny, tmp_path_factory)


# -- silent wrong output ---------------------------------------------------------------
@pytest.mark.parametrize("knobs", [{"temperature": 1e-300}, {"top_p": 1e-46}, {"temperature": 1e-38, "seed": 3}])
def test_sampling_values_that_underflow_are_greedy_over_http(server, knobs):
    greedy = text_of(server, temperature=0)
    assert greedy  # the tiny model's greedy text is words, never the empty id-0 text
    assert text_of(server, **knobs) == greedy


def test_repetition_penalty_that_overflows_fp32_is_a_400_naming_it(server):
    error = error_of(post(server, COMPLETIONS, {"prompt": "w1", "repetition_penalty": 1e-308}), 400)
    assert error["param"] == "repetition_penalty"


# -- amplification ---------------------------------------------------------------------
@pytest.mark.parametrize("prompt", [[[5, 6]] * 10_000, ["w1 w2"] * 10_000], ids=["10000 token lists", "10000 strings"])
def test_ten_thousand_prompts_are_refused_at_once_without_queueing(server, prompt):
    started = time.monotonic()
    error = error_of(post(server, COMPLETIONS, {"prompt": prompt, "max_tokens": 1}), 400)
    assert error["param"] == "prompt" and error["code"] == "too_many_prompts"
    elapsed = time.monotonic() - started
    print(f"round2: {len(prompt)} prompts refused in {elapsed:.3f} s")
    assert elapsed < 10.0
    assert server.state.admission.in_flight == 0 and server.state.async_engine.num_unfinished == 0


def test_prompts_times_n_beyond_max_queue_is_400_never_429(server):
    error = error_of(post(server, COMPLETIONS, {"prompt": ["w1", "w2"], "n": 3, "max_tokens": 1}), 400)
    assert (error["param"], error["code"]) == ("n", "exceeds_max_queue")
    error = error_of(post(server, CHAT, {"messages": [{"role": "user", "content": "w1"}], "n": 5}), 400)
    assert error["code"] == "exceeds_max_queue"


@pytest.mark.parametrize(
    "stop, bound",
    [(["w1"] * 10_000, "at most 32 items"), (["w" * 2000], "at most 1024 characters")],
    ids=["10000", "long"],
)
def test_stop_strings_are_bounded_in_number_and_length(server, stop, bound):
    error = error_of(post(server, COMPLETIONS, {"prompt": "w1", "stop": stop}), 400)
    assert error["param"] == "stop" and bound in error["message"]


def test_a_full_queue_is_429_with_retry_after(server):
    body = {"prompt": "w1 w2", "n": MAX_QUEUE, "max_tokens": 60, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + COMPLETIONS, json=body, headers=AUTH, timeout=60) as stream:
        assert stream.status_code == 200
        response = post(server, COMPLETIONS, {"prompt": "w1", "max_tokens": 1})
        assert error_of(response, 429)["code"] == "queue_full"
        assert response.headers["Retry-After"] == "1"


# -- read timeouts ---------------------------------------------------------------------
def _connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _drip(socks: list[socket.socket], data: bytes, seconds: float) -> tuple[list[bytes], list[float]]:
    """Send `data` one byte per 0.3 s on every socket until each is closed by the server or
    `seconds` pass; what each received and when it closed (seconds from the start; inf:
    still open)."""
    started = time.monotonic()
    received = [b""] * len(socks)
    closed = [float("inf")] * len(socks)
    i = 0
    while time.monotonic() - started < seconds and any(t == float("inf") for t in closed):
        open_ = [j for j in range(len(socks)) if closed[j] == float("inf")]
        for j in open_:
            try:
                socks[j].sendall(data[i % len(data) : i % len(data) + 1])
            except OSError:
                pass  # closed by the server: recv says so below
        ready, _, _ = select.select([socks[j] for j in open_], [], [], 0.3)
        for sock in ready:
            j = socks.index(sock)
            try:
                chunk = sock.recv(65536)
            except OSError:
                chunk = b""
            received[j] += chunk
            if not chunk:
                closed[j] = time.monotonic() - started
        i += 1
    return received, closed


def test_a_slow_loris_on_the_headers_is_closed_after_the_header_timeout(server):
    socks = [_connect(server) for _ in range(20)]
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    received, closed = _drip(socks, head, seconds=HEADER_TIMEOUT + 8)
    for sock in socks:
        sock.close()
    print(f"round2: {len(socks)} header slow lorises closed after {min(closed):.2f}-{max(closed):.2f} s")
    assert max(closed) < HEADER_TIMEOUT + 4, closed  # 1 s timeout; a loaded 2-core machine adds its latency
    assert all(r.startswith(b"HTTP/1.1 408 ") and b'"code":"request_timeout"' in r for r in received)
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_slow_loris_on_the_body_gets_408_after_the_body_timeout(server):
    socks = [_connect(server) for _ in range(5)]
    for sock in socks:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n"
        )
    received, closed = _drip(socks, b'{"prompt": "' + b"w" * 600, seconds=BODY_TIMEOUT + 8)
    for sock in socks:
        sock.close()
    print(f"round2: {len(socks)} body slow lorises got 408 after {min(closed):.2f}-{max(closed):.2f} s")
    assert max(closed) < BODY_TIMEOUT + 4, closed
    assert all(r.startswith(b"HTTP/1.1 408 ") and b'"code":"request_timeout"' in r for r in received)


# -- auth, codes, headers ----------------------------------------------------------------
@pytest.mark.parametrize("order", [["Bearer wrong", f"Bearer {KEY}"], [f"Bearer {KEY}", "Bearer wrong"]])
def test_two_authorization_headers_are_refused_in_either_order(server, order):
    headers = [("Authorization", value) for value in order] + [("Content-Type", "application/json")]
    response = httpx.post(server.url + COMPLETIONS, content=b'{"prompt": "w1"}', headers=headers, timeout=30)
    assert error_of(response, 401)["code"] == "duplicate_authorization"


@pytest.mark.parametrize(
    "raw", [b"[" * 100_000 + b"]" * 100_000, b'{"prompt": "\xff\xfe"}'], ids=["deep nesting", "invalid UTF-8"]
)
def test_a_body_that_fails_to_parse_has_a_code(server, raw):
    headers = {**AUTH, "Content-Type": "application/json"}
    response = httpx.post(server.url + COMPLETIONS, content=raw, headers=headers, timeout=30)
    assert error_of(response, 400)["code"] == "invalid_json"


def test_405_names_the_allowed_methods(server):
    response = httpx.get(server.url + COMPLETIONS, headers=AUTH)
    assert error_of(response, 405)["code"] == "method_not_allowed"
    assert response.headers["Allow"] == "POST"


def test_503_while_loading_carries_retry_after(tiny):
    release = threading.Event()

    def slow_load() -> LLMEngine:
        release.wait(60)
        return LLMEngine(EngineConfig(model=tiny, kv_cache_mb=4, max_model_len=64))

    with BackgroundServer(ServerSettings(port=0), slow_load, wait_ready=False) as loading:
        health = httpx.get(loading.url + "/health")
        models = httpx.get(loading.url + "/v1/models")
        release.set()
    assert (health.status_code, health.json(), health.headers["Retry-After"]) == (503, {"status": "loading"}, "5")
    assert (error_of(models, 503)["code"], models.headers["Retry-After"]) == ("model_loading", "5")


def test_the_document_states_the_bounds_the_server_enforces(server):
    schemas = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert prompt[0] == {"minLength": 1, "type": "string"}
    assert prompt[1]["items"]["maximum"] == VOCAB - 1
    assert prompt[2]["maxItems"] == prompt[3]["maxItems"] == ServerSettings().max_prompts_per_request
    max_tokens = schemas["CompletionRequest"]["properties"]["max_tokens"]["anyOf"][0]
    assert (max_tokens["minimum"], max_tokens["maximum"]) == (1, 64)
    assert schemas["TokenizeRequest"]["oneOf"] == [{"required": ["prompt"]}, {"required": ["messages"]}]
    assert schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]["maximum"] == VOCAB - 1
    # and what the document forbids is refused: neither field, an id past the vocabulary
    assert error_of(post(server, "/tokenize", {}), 400)["param"] == "prompt"
    assert error_of(post(server, "/detokenize", {"tokens": [VOCAB]}), 400)["param"] == "tokens"
    # a whole float is an integer to JSON Schema, so it is one here too
    assert post(server, COMPLETIONS, {"prompt": "w1", "max_tokens": 2.0}).json()["usage"]["completion_tokens"] <= 2


def test_the_document_closes_the_bodies_to_what_the_field_policy_accepts(server):
    """Undeclared fields are 400s (server/field_policy.py), so the document says
    additionalProperties false and lists the accepted extras: `user` with any value, `store`
    only at its no-effect values; messages likewise; logit_bias keys are ids in the vocabulary."""
    schemas = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]
    assert chat["additionalProperties"] is False and schemas["ChatMessage"]["additionalProperties"] is False
    assert chat["properties"]["store"]["enum"] == [False, None]
    assert schemas["ChatMessage"]["properties"]["reasoning_content"]["enum"] == [None, ""]
    keys = schemas["CompletionRequest"]["properties"]["logit_bias"]["anyOf"][0]["propertyNames"]["pattern"]
    assert [bool(re.fullmatch(keys, k)) for k in ("0", str(VOCAB - 1), str(VOCAB), "01", "+1", " 1")] == [
        True,
        True,
        False,
        False,
        False,
        False,
    ]
    # each documented refusal is one the server makes
    assert error_of(post(server, COMPLETIONS, {"prompt": "w1", "logit_bias": {"+1": 5}}), 400)["param"] == "logit_bias"
    message = {"role": "user", "content": "w1", "reasoning_content": {}}
    refused = error_of(post(server, "/tokenize", {"messages": [message]}), 400)
    assert (refused["param"], refused["code"]) == ("messages.0.reasoning_content", "unsupported_parameter")
    assert post(server, "/tokenize", {"messages": [{**message, "reasoning_content": ""}]}).status_code == 200


def test_a_grammar_the_vocabulary_cannot_start_is_a_400_not_a_failed_request(server):
    """The tiny model's words have no `{`: a JSON constraint could only ever mask every token."""
    body = {"prompt": "w1", "max_tokens": 3, "response_format": {"type": "json_object"}}
    error = error_of(post(server, COMPLETIONS, body), 400)
    assert (error["param"], error["code"]) == ("response_format", "invalid_grammar")
    fmt = {"type": "json_schema", "name": None, "schema": {"type": "object"}, "strict": None}
    error = error_of(post(server, "/v1/responses", {"input": "w1", "text": {"format": fmt}}), 400)
    assert (error["param"], error["code"]) == ("text.format.schema", "invalid_grammar")
