"""What the engine takes from the tokenizer: chat prompts and end-of-sequence ids.

A request with tools, or with tool turns in its history (assistant `tool_calls`, `role:
"tool"` messages), needs a template that renders them. The model's own template is used when
it mentions tools; otherwise headwise's tool-aware ChatML template (templates/hermes_tools.jinja,
Hermes-style `<tool_call>` JSON) renders them, so no call or result is dropped from the prompt
without a word. `chat_template` (the server's `--chat-template`) overrides both."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from headwise.engine.sampling_params import InvalidRequest


@cache
def tool_template() -> str:
    """The shipped tool-aware ChatML template (Hermes-style tool calls)."""
    return resources.files("headwise.engine").joinpath("templates/hermes_tools.jinja").read_text()


def knows_tools(template: str | None) -> bool:
    """Whether a chat template renders tools (transformers passes them as `tools`)."""
    return template is not None and "tool" in template


def uses_tools(messages: list[dict], tools: list[dict] | None) -> bool:
    return bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def choose_template(tokenizer: Any, messages: list[dict], tools: list[dict] | None, chat_template: str | None):
    """The template to render `messages` with: `chat_template` when given, else the model's,
    unless tools are involved and the model's template knows none (then the shipped one)."""
    if chat_template is not None:
        return chat_template
    own = getattr(tokenizer, "chat_template", None)
    if uses_tools(messages, tools) and not knows_tools(own):
        return tool_template()
    return None  # the tokenizer's own


def encode_chat(
    tokenizer: Any,
    messages: list[dict],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict] | None = None,
    chat_template: str | None = None,
) -> list[int]:
    """Token ids of `messages` through the chat template (`continue_final_message`: the last
    message stays open, no end-of-turn after it); `tools` are OpenAI's tool objects."""
    if not messages:
        raise InvalidRequest("messages must not be empty", "messages")
    kwargs: dict[str, Any] = {}
    template = choose_template(tokenizer, messages, tools, chat_template)
    if template is not None:
        kwargs["chat_template"] = template
    if tools:
        kwargs["tools"] = tools
    try:
        ids = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=True,
            **kwargs,
        )
    except Exception as e:  # template errors carry the reason in their message
        raise InvalidRequest(f"cannot apply the chat template: {e}", "messages") from e
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def eos_token_ids(config_eos: tuple[int, ...] | list[int], tokenizer: Any) -> tuple[int, ...]:
    """The model config's end-of-sequence ids and the tokenizer's, sorted."""
    ids = set(config_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))
