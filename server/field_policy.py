"""Nothing silently ignored: request fields headwise does not implement are a 400 naming them,
unless they cannot change the output (those are accepted and logged).

Three sets: fields accepted whatever their value (no effect on the output: ACCEPTED), fields
accepted only at their no-effect value (DEFAULT_ONLY: `store: false`, `best_of` == n, ...),
and everything else the body model does not declare, which is rejected. The README's API
section lists both sets."""

from __future__ import annotations

from collections.abc import Iterable

from headwise.server.errors import APIError
from headwise.server.protocol import ChatCompletionRequest, ChatMessage, GenerationRequest

# no effect on what is generated: bookkeeping, routing, caching hints
ACCEPTED = frozenset({"user", "metadata", "service_tier", "prompt_cache_key", "safety_identifier", "request_id"})

_ABSENT = object()

# field -> the values that mean "not asked for" (anything else would change the output)
DEFAULT_ONLY: dict[str, tuple] = {
    "store": (False, None),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "priority": (None, 0),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "truncate_prompt_tokens": (None,),
    "return_tokens_as_token_ids": (None, False),
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "documents": (None,),
    "mm_processor_kwargs": (None,),
    "continue_final_message": (None, False),
    "echo": (None, False),  # chat's echo (vLLM); completions declare their own
    "add_special_tokens": (None, False),  # chat: the template places special tokens
    "cache_salt": (None,),
}

# message fields with no effect on the prompt
MESSAGE_ACCEPTED = frozenset({"refusal", "annotations"})
MESSAGE_DEFAULT_ONLY: dict[str, tuple] = {"audio": (None,), "function_call": (None,), "reasoning_content": (None, "")}


def check_fields(body: GenerationRequest) -> list[str]:
    """APIError 400 for the first field that would change the output and is not implemented;
    returns the accepted no-effect extras (for the log)."""
    accepted = []
    for name, value in sorted((body.model_extra or {}).items()):
        accepted.append(_check(name, value, name, ACCEPTED, DEFAULT_ONLY))
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(
            400,
            f"best_of={body.best_of} is not supported: only best_of equal to n ({body.n}) is (no extra candidates "
            "are generated to pick from)",
            "best_of",
            "unsupported_parameter",
        )
    if isinstance(body, ChatCompletionRequest):
        accepted += check_message_fields(body.messages)
    return [a for a in accepted if a]


def check_message_fields(messages: list[ChatMessage]) -> list[str]:
    """check_fields for the messages' undeclared fields (chat and /tokenize)."""
    accepted = []
    for i, message in enumerate(messages):
        for name, value in sorted((message.model_extra or {}).items()):
            accepted.append(_check(name, value, f"messages.{i}.{name}", MESSAGE_ACCEPTED, MESSAGE_DEFAULT_ONLY))
    return accepted


def _check(name: str, value: object, param: str, accepted: Iterable[str], default_only: dict[str, tuple]) -> str:
    if name in accepted:
        return param
    allowed = default_only.get(name)
    if allowed is not None:
        if any(value == a and type(value) is type(a) or value is a for a in allowed):
            return param
        raise APIError(400, f"{param}={_show(value)} is not supported by this server", param, "unsupported_parameter")
    raise APIError(400, f"unknown field {param}: not supported by this server", param, "unsupported_parameter")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def document_fields(components: dict) -> None:
    """State the policy in /openapi.json: the generation bodies and chat messages are closed
    (`additionalProperties: false`) except for the ACCEPTED fields (any value) and the
    DEFAULT_ONLY ones (their no-effect values as an `enum`), so the document allows exactly
    what check_fields lets through."""
    bodies = {"CompletionRequest": (ACCEPTED, DEFAULT_ONLY), "ChatCompletionRequest": (ACCEPTED, DEFAULT_ONLY)}
    bodies["ChatMessage"] = (MESSAGE_ACCEPTED, MESSAGE_DEFAULT_ONLY)
    for model, (accepted, default_only) in bodies.items():
        schema = components.get(model)
        if schema is None:
            continue
        properties = schema.setdefault("properties", {})
        for name in sorted(accepted):
            properties.setdefault(name, {"description": "accepted; no effect on the output"})
        for name, values in sorted(default_only.items()):
            if name not in properties:
                properties[name] = {"enum": list(values), "description": "accepted only at its no-effect values"}
        schema["additionalProperties"] = False
