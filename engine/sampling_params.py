"""Per-request sampling settings (vLLM's names), checked on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from headwise.engine.grammar_spec import GrammarSpec

# a seed is a signed 64-bit integer (vLLM's bounds); torch.Generator takes this whole range
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# below this a temperature or top_p is greedy (vLLM's _SAMPLING_EPS): the sampler works in
# fp32, where logits / 1e-38 overflow to inf and a top_p of 1e-46 rounds to 0, and either
# turns every probability into NaN, whose argmax is token 0
SAMPLING_EPS = 1e-5
# repetition_penalty divides positive logits and multiplies negative ones: outside this
# range fp32 overflows (inf, NaN for a logit of 0) and the draw is token 0 again
REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX = 1e-6, 1e6


class InvalidRequest(ValueError):
    """A request parameter is out of range; `param` names it (OpenAI error `param`)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code  # the OpenAI error object's `code`


def check_prompt_ids(prompt_token_ids: list[int], vocab_size: int) -> None:
    """A prompt is a non-empty list of rows of the model's embedding."""
    if not prompt_token_ids:
        raise InvalidRequest("the prompt is empty", "prompt")
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size][:5]
        raise InvalidRequest(
            f"prompt token ids must be in [0, {vocab_size}) (the vocabulary size), got {bad}", "prompt"
        )


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # top alternatives per generated token; None: no logprobs
    prompt_logprobs: int | None = None  # same for prompt tokens
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI: [-100, 100])
    grammar: GrammarSpec | None = None  # constrained decoding (engine/structured_output.py)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        _check(self.max_tokens >= 1, "max_tokens", f"max_tokens must be >= 1, got {self.max_tokens}")
        _check(self.temperature >= 0, "temperature", f"temperature must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= -1, "top_k", f"top_k must be -1, 0 (disabled) or >= 1, got {self.top_k}")
        _check(0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {self.min_p}")
        _check(self.min_tokens >= 0, "min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}")
        _check(
            REPETITION_PENALTY_MIN <= self.repetition_penalty <= REPETITION_PENALTY_MAX,
            "repetition_penalty",
            f"repetition_penalty must be in [{REPETITION_PENALTY_MIN:g}, {REPETITION_PENALTY_MAX:g}], "
            f"got {self.repetition_penalty}",
        )
        _check(
            -2 <= self.presence_penalty <= 2,
            "presence_penalty",
            f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
        )
        _check(
            -2 <= self.frequency_penalty <= 2,
            "frequency_penalty",
            f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
        )
        _check(
            self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
            "seed",
            f"seed must be a signed 64-bit integer in [{SEED_MIN}, {SEED_MAX}], got {self.seed}",
        )
        _check(
            all(t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            f"stop_token_ids must be >= 0, got {[t for t in self.stop_token_ids if t < 0][:5]}",
        )
        if self.grammar is not None and self.min_tokens:
            raise InvalidRequest(
                f"min_tokens ({self.min_tokens}) cannot be combined with a grammar: the grammar decides where the "
                "output may end",
                "min_tokens",
                "conflicting_parameters",
            )
        if self.logit_bias:
            bad = {t: b for t, b in self.logit_bias.items() if not -100 <= b <= 100}
            _check(not bad, "logit_bias", f"logit_bias values must be in [-100, 100], got {bad}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or 0 <= value <= 20, name, f"{name} must be in [0, 20], got {value}")

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids the request names must be rows of the model's logits."""
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        _check(
            not bad,
            "stop_token_ids",
            f"stop_token_ids must be in [0, {vocab_size}) (the vocabulary size), got {bad[:5]}",
        )
        bad = [t for t in self.logit_bias or () if not 0 <= t < vocab_size]
        _check(
            not bad,
            "logit_bias",
            f"logit_bias token ids must be in [0, {vocab_size}) (the vocabulary size), got {bad[:5]}",
        )

    @property
    def greedy(self) -> bool:
        """Argmax: temperature or top_p too small to draw with in fp32 mean the top token too."""
        return self.temperature < SAMPLING_EPS or self.top_p < SAMPLING_EPS or self.top_k == 1


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(message, param)
