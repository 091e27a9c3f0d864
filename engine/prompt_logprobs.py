"""Log-probabilities of a request's prompt tokens (`prompt_logprobs`), chunk by chunk."""

from __future__ import annotations

from collections.abc import Callable

import torch

from headwise.engine.outputs import TokenLogprob
from headwise.engine.step_inputs import StepRows


def extend_prompt_logprobs(r: StepRows, hidden: torch.Tensor, logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Append the log-probabilities of the prompt tokens that rows `r` of `hidden` predict
    (`logits`: the model's head); the first prompt token gets None."""
    seq = r.seq
    if not seq.prompt_logprobs:
        seq.prompt_logprobs = [None]
    hi = min(r.end, seq.num_prompt_tokens)
    n = min(hi, seq.num_prompt_tokens - 1) - r.start  # rows whose next token is a prompt token
    if n <= 0:
        return
    lps = logits(hidden[r.row : r.row + hi - r.start]).log_softmax(-1)[:n]
    targets = seq.prompt_token_ids[r.start + 1 : r.start + 1 + n]
    # the chunk's rows at once: a few transfers per chunk, not a few per prompt token
    chosen = lps.gather(1, torch.tensor(targets, device=lps.device)[:, None])[:, 0].tolist()
    k = seq.params.prompt_logprobs or 0
    top_vals, top_ids = (t.tolist() for t in lps.topk(k, dim=-1)) if k else ([[]] * n, [[]] * n)
    seq.prompt_logprobs.extend(
        TokenLogprob(t, lp, list(zip(ids, vals))) for t, lp, ids, vals in zip(targets, chosen, top_ids, top_vals)
    )
