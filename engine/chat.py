"""What the engine takes from the tokenizer: chat prompts and end-of-sequence ids."""

from __future__ import annotations

from typing import Any

from headwise.engine.sampling_params import InvalidRequest


def encode_chat(
    tokenizer: Any, messages: list[dict], add_generation_prompt: bool = True, continue_final_message: bool = False
) -> list[int]:
    """Token ids of `messages` through the model's chat template (`continue_final_message`:
    the last message stays open, no end-of-turn after it)."""
    if not messages:
        raise InvalidRequest("messages must not be empty", "messages")
    try:
        ids = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=True,
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
