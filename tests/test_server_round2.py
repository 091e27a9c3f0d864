"""The second hardening round (issue 25), each finding through HTTP against a live server
on the tiny model: sampler underflow, amplification bounds, read timeouts, duplicate
Authorization, error codes and headers (Allow, Retry-After), CORS, generation-config
defaults, continue_final_message, several served model names, the document's bounds."""

from __future__ import annotations

import json
import re
import select
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from headwise.engine.config import EngineConfig
from headwise.engine.llm_engine import LLMEngine
from headwise.server.background import BackgroundServer
from headwise.server.generation_defaults import GenerationConfigError, load_generation_defaults
from headwise.server.settings import ServerSettings
from tests.test_server_lifecycle import Stream, start_serve, stop
from tests.tiny_model import VOCAB, write_tiny_llama

KEY = "sk-round2"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "https://app.example"
NAMES = ("tiny-a", "tiny-b")
MAX_QUEUE = 4
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.5
DEFAULT_MAX_NEW_TOKENS = 3  # the module's --generation-config folder
# an end-of-turn marker after each message, so that leaving the last one open is visible
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    model_dir = write_tiny_llama(tmp_path_factory.mktemp("tiny"))
    (Path(model_dir) / "chat_template.jinja").write_text(TEMPLATE)
    return model_dir


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    defaults = tmp_path_factory.mktemp("genconfig")
    (defaults / "generation_config.json").write_text(json.dumps({"max_new_tokens": DEFAULT_MAX_NEW_TOKENS}))
    config = EngineConfig(model=tiny, kv_cache_mb=8, max_model_len=64)
    settings = ServerSettings(
        port=0,
        api_key=KEY,
        max_queue=MAX_QUEUE,
        header_timeout=HEADER_TIMEOUT,
        body_timeout=BODY_TIMEOUT,
        allowed_origins=(ORIGIN,),
        served_model_name=NAMES,
        generation_config=str(defaults),
    )
    with BackgroundServer(settings, lambda: LLMEngine(config)) as running:
        yield running


def post(server, path: str, body, headers: dict | None = None) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=AUTH if headers is None else headers, timeout=60)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["code"]
    return error


def text_of(server, **knobs) -> str:
    body = {"prompt": "w1 w2 w3", "max_tokens": 6, "ignore_eos": True, **knobs}
    response = post(server, COMPLETIONS, body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


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


# -- CORS ------------------------------------------------------------------------------
def test_a_cors_preflight_from_an_allowed_origin_is_answered_without_the_key(server):
    headers = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    response = httpx.options(server.url + CHAT, headers=headers)
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert response.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    simple = post(server, COMPLETIONS, {"prompt": "w1", "max_tokens": 1}, {**AUTH, "Origin": ORIGIN})
    assert simple.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_an_origin_not_allowed_gets_no_cors_headers(server):
    headers = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    response = httpx.options(server.url + CHAT, headers=headers)
    assert response.status_code == 400
    assert "Access-Control-Allow-Origin" not in response.headers


def test_without_allowed_origins_there_is_no_cors(tiny):
    with BackgroundServer(ServerSettings(port=0), lambda: LLMEngine(EngineConfig(model=tiny, kv_cache_mb=4))) as s:
        response = httpx.options(s.url + CHAT, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert response.status_code == 405 and "Access-Control-Allow-Origin" not in response.headers


# -- model defaults, prefill, names -----------------------------------------------------
def test_generation_config_defaults_apply_under_the_request_values(server):
    user = [{"role": "user", "content": "w1 w2"}]
    unset = post(server, CHAT, {"messages": user, "ignore_eos": True}).json()
    assert unset["usage"]["completion_tokens"] == DEFAULT_MAX_NEW_TOKENS
    assert unset["choices"][0]["finish_reason"] == "length"
    explicit = post(server, CHAT, {"messages": user, "ignore_eos": True, "max_tokens": 5}).json()
    assert explicit["usage"]["completion_tokens"] == 5


def test_generation_config_sources(tmp_path):
    assert load_generation_defaults("vllm", tmp_path) == {}
    assert load_generation_defaults("auto", tmp_path) == {}  # the model has none
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.9, "top_k": 50, "do_sample": True, "max_new_tokens": 7})
    )
    expected = {"temperature": 0.6, "top_p": 0.9, "top_k": 50, "max_tokens": 7}
    assert load_generation_defaults("auto", tmp_path) == expected
    assert load_generation_defaults(str(tmp_path), None) == expected
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(GenerationConfigError, match="temperature must be >= 0, got -1"):
        load_generation_defaults("auto", tmp_path)
    with pytest.raises(GenerationConfigError, match="no generation_config.json"):
        load_generation_defaults(str(tmp_path / "missing"), None)


def _template_ids(server, messages, **flags) -> list[int]:
    response = post(server, "/tokenize", {"messages": messages, **flags})
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def test_continue_final_message_leaves_the_assistant_turn_open(server):
    prefill = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w5 w6"}]
    closed = _template_ids(server, prefill, add_generation_prompt=False)
    opened = _template_ids(server, prefill, add_generation_prompt=False, continue_final_message=True)
    eos = VOCAB - 1
    assert closed == opened + [eos]  # the same prompt minus the end of the assistant's turn
    assert opened[-2:] == [5, 6]
    body = {"messages": prefill, "add_generation_prompt": False, "continue_final_message": True, "max_tokens": 2}
    assert post(server, CHAT, body).status_code == 200
    error = error_of(post(server, CHAT, {**body, "add_generation_prompt": True}), 400)
    assert error["param"] == "continue_final_message"


def test_every_served_model_name_is_accepted_and_responses_carry_the_first(server):
    listed = httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"]
    assert [card["id"] for card in listed] == list(NAMES)
    for name in NAMES:
        response = post(server, COMPLETIONS, {"model": name, "prompt": "w1", "max_tokens": 1})
        assert response.json()["model"] == NAMES[0]
        assert httpx.get(server.url + f"/v1/models/{name}", headers=AUTH).json()["id"] == name
    assert error_of(post(server, COMPLETIONS, {"model": "tiny-c", "prompt": "w1"}), 404)["param"] == "model"


# -- drain -----------------------------------------------------------------------------
REFUSED_WINDOW_S = 1.0  # from the first refused probe to the exit: interpreter teardown only


def test_the_listening_socket_answers_until_exit_after_sigterm(tiny):
    proc, url = start_serve(tiny, "--drain-timeout", "1")
    try:
        stream = Stream(url, {"prompt": "w1 w2", "max_tokens": 1500, "ignore_eos": True})
        stream.start()
        assert stream.started.wait(120)
        proc.send_signal(signal.SIGTERM)
        answers: list[tuple[float, int | None]] = []
        while proc.poll() is None:
            try:
                status = httpx.get(url + "/health", timeout=1.0, headers={"Connection": "close"}).status_code
            except httpx.HTTPError:
                status = None
            answers.append((time.monotonic(), status))
        exited = time.monotonic()
        assert proc.returncode == 0
        statuses = [status for _, status in answers]
        assert statuses.count(503) >= 5, statuses  # draining, answered, through the whole drain
        refused = [t for t, status in answers if status is None]
        window = exited - refused[0] if refused else 0.0
        print(f"drain: {statuses.count(503)} probes answered 503, refused for the last {window:.3f} s before exit")
        assert window < REFUSED_WINDOW_S, (window, statuses[-10:])
        stream.join(timeout=10)
        assert stream.events[-1] == "[DONE]" and stream.last_payload()["choices"][0]["finish_reason"] == "abort"
    finally:
        stop(proc)
