"""Server pieces that need no model: params mapping, errors, SSE, admission, metrics, flags."""

from __future__ import annotations

import json

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from headwise.clients.cli import build_parser
from headwise.clients.commands.serve import settings_from_args
from headwise.engine.errors import PromptTooLong, UnknownPlan
from headwise.engine.outputs import RequestOutput, TokenLogprob
from headwise.engine.sampling_params import InvalidRequest
from headwise.server.admission import Admission
from headwise.server.errors import APIError, api_error, validation_error
from headwise.server.logprobs import chat_logprobs, completion_logprobs
from headwise.server.metrics import ServerMetrics
from headwise.server.params import sampling_params
from headwise.server.protocol import ChatCompletionRequest, CompletionRequest
from headwise.server.request_id import clean_request_id
from headwise.server.streaming import DONE, sse


def test_seed_becomes_seed_plus_choice_and_chat_defaults_to_the_rest_of_the_context():
    body = ChatCompletionRequest(
        messages=[{"role": "user", "content": "hi"}],
        seed=10,
        temperature=0.5,
        stop="END",
        logprobs=True,
        top_logprobs=3,
    )
    params = [sampling_params(body, prompt_len=100, max_model_len=1000, choice=i) for i in range(3)]
    assert [p.seed for p in params] == [10, 11, 12]
    assert params[0].max_tokens == 900 and params[0].stop == ["END"] and params[0].logprobs == 3
    assert params[0].temperature == 0.5 and params[0].top_p == 1.0


def test_penalties_and_vllm_extensions_reach_the_sampling_params():
    body = CompletionRequest(
        prompt="hi",
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        top_k=5,
        min_p=0.1,
        ignore_eos=True,
        min_tokens=2,
        stop_token_ids=[7],
    )
    p = sampling_params(body, 5, 1000, 0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)
    assert (p.top_k, p.min_p, p.ignore_eos, p.min_tokens, p.stop_token_ids) == (5, 0.1, True, 2, [7])


def test_completion_defaults_to_16_tokens_and_max_completion_tokens_wins():
    body = CompletionRequest(prompt="hi")
    assert sampling_params(body, 5, 1000, 0).max_tokens == 16
    body = CompletionRequest(prompt="hi", max_tokens=7, max_completion_tokens=3, echo=True, logprobs=2)
    params = sampling_params(body, 5, 1000, 0)
    assert (params.max_tokens, params.logprobs, params.prompt_logprobs) == (3, 2, 2)


def test_sampling_params_range_errors_keep_the_parameter_name():
    # the HTTP schema refuses top_p 1.5 first; the engine's own check is the second line
    with pytest.raises(InvalidRequest) as info:
        sampling_params(CompletionRequest.model_construct(prompt="hi", top_p=1.5), 5, 1000, 0)
    assert api_error(info.value).body()["error"]["param"] == "top_p"


@pytest.mark.parametrize(
    "exc, status, code",
    [
        (UnknownPlan("plan 'x' is not loaded", "kv_plan"), 404, "plan_not_found"),
        (
            PromptTooLong("This model's maximum context length is 8 tokens; you requested 9 tokens", "max_tokens"),
            400,
            "context_length_exceeded",
        ),
        (InvalidRequest("bad", "top_k"), 400, "invalid_value"),
        (RuntimeError("kernel exploded"), 500, "internal_error"),
    ],
)
def test_engine_exceptions_map_to_openai_errors(exc, status, code):
    error = api_error(exc)
    assert (error.status, error.code) == (status, code)
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


def test_validation_error_names_the_field_not_the_union_member():
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"prompt": [[1, -2]]})
    errors = [dict(e, loc=("body", *e["loc"])) for e in info.value.errors()]
    error = validation_error(RequestValidationError(errors))
    assert (error.status, error.param) == (400, "prompt")
    assert "greater than or equal to 0" in error.message


def test_unknown_fields_are_kept_for_the_field_policy():
    body = CompletionRequest.model_validate({"prompt": "hi", "frobnicate": 1, "user": "u"})
    assert body.unknown_fields() == ["frobnicate"]


def test_sse_events_are_compact_json_lines():
    assert sse({"a": "é"}) == 'data: {"a":"é"}\n\n'
    assert DONE == "data: [DONE]\n\n"


def test_admission_refuses_past_the_cap_and_counts_rejections():
    rejected = []
    admission = Admission(3, lambda: rejected.append(1))
    admission.acquire(2)
    with pytest.raises(APIError) as info:
        admission.acquire(2)
    assert info.value.status == 429 and rejected == [1]
    admission.release(2)
    admission.acquire(3)
    assert admission.in_flight == 3


def test_logprobs_render_both_openai_shapes():
    vocab = {1: "Hel", 2: "lo", 3: "!"}

    def text(token_id: int) -> str:
        return vocab[token_id]

    entries = [None, TokenLogprob(2, -0.5, [(2, -0.5), (3, -1.5)])]
    completion = completion_logprobs(entries, text, [1, 2], 0)
    assert completion == {
        "tokens": ["Hel", "lo"],
        "token_logprobs": [None, -0.5],
        "top_logprobs": [None, {"lo": -0.5, "!": -1.5}],
        "text_offset": [0, 3],
    }
    chat = chat_logprobs([TokenLogprob(3, float("-inf"), [(3, float("-inf"))])], text)
    assert chat["content"][0]["logprob"] == -9999.0 and chat["content"][0]["bytes"] == [33]
    json.dumps(chat, allow_nan=False)


def test_metrics_observe_ttft_tokens_and_finish_reason():
    metrics = ServerMetrics()
    metrics.bind("m", lambda: None)
    timer = metrics.track()
    base = dict(request_id="r", prompt_token_ids=[1, 2, 3], kv_bytes=0, plan="full")
    timer.observe(RequestOutput(token_ids=[5], text="a", finished=False, finish_reason=None, **base))
    timer.observe(
        RequestOutput(
            token_ids=[5, 6, 7],
            text="abc",
            finished=True,
            finish_reason="length",
            arrival_time=1.0,
            first_scheduled_time=1.5,
            **base,
        )
    )
    text = metrics.render().decode()
    assert 'headwise:time_to_first_token_seconds_count{model_name="m"} 1.0' in text
    assert 'headwise:inter_token_latency_seconds_count{model_name="m"} 2.0' in text
    assert 'headwise:prompt_tokens_total{model_name="m"} 3.0' in text
    assert 'headwise:generation_tokens_total{model_name="m"} 3.0' in text
    assert 'headwise:request_queue_time_seconds_sum{model_name="m"} 0.5' in text
    assert 'headwise:request_success_total{finished_reason="length",model_name="m"} 1.0' in text


def test_each_app_metrics_registry_is_its_own():
    first, second = ServerMetrics(), ServerMetrics()
    first.bind("a", lambda: None)
    first.rejected.labels("a").inc()
    assert 'headwise:request_rejected_total{model_name="a"} 1.0' in first.render().decode()
    assert 'model_name="a"' not in second.render().decode()


def test_request_ids_are_cleaned_and_bounded():
    assert clean_request_id("abc-123") == "abc-123"
    assert clean_request_id("a b\r\nc") == "abc"
    assert len(clean_request_id("x" * 500)) == 128
    assert clean_request_id("\n\n")


def test_serve_flags_read_headwise_environment_variables(monkeypatch):
    monkeypatch.setenv("HEADWISE_PORT", "9123")
    monkeypatch.setenv("HEADWISE_MAX_QUEUE", "7")
    monkeypatch.setenv("HEADWISE_API_KEY", "secret")
    monkeypatch.setenv("HEADWISE_HOST", "0.0.0.0")
    settings = settings_from_args(build_parser().parse_args(["serve"]))
    assert (settings.host, settings.port, settings.max_queue, settings.api_key) == ("0.0.0.0", 9123, 7, "secret")
    settings = settings_from_args(build_parser().parse_args(["serve", "--port", "1", "--served-model-name", "m"]))
    assert (settings.port, settings.served_model_name) == (1, ("m",))
    settings = settings_from_args(build_parser().parse_args(["serve", "--served-model-name", "a", "b"]))
    assert settings.served_model_name == ("a", "b")


def test_bad_server_settings_name_the_value():
    with pytest.raises(ValueError, match="max_queue must be >= 1, got 0"):
        settings_from_args(build_parser().parse_args(["serve", "--max-queue", "0"]))


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("HEADWISE_MAX_QUEUE", "lots")
    with pytest.raises(SystemExit, match=r"environment HEADWISE_MAX_QUEUE='lots': invalid literal"):
        build_parser()
