"""Logits -> next tokens for the whole batch, on the logits' device.

Greedy rows take one batched argmax; every other knob (logit_bias, the grammar mask of
constrained requests, penalties, min_tokens stop suppression, temperature, top-k, min-p,
top-p) is one tensor op over the rows that use it. Log-probabilities are computed only for rows whose request asked for them. The
tokens and those log-probabilities come back to the host together: one sync per step.

Seeded draws: each request owns a CPU torch.Generator, and a non-greedy row's token is
`argmax(probs / E)`, E ~ Exp(1) over the vocabulary drawn from that generator (the
exponential race is a draw from probs). So a seed gives the same tokens on every device,
whatever else shares the batch and however often the request is preempted. E does not
depend on the logits: `prefetch_noise` draws each request's next E on worker threads
while the forward runs, and `sample` copies them to the device without a host sync.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from headwise.engine.outputs import TokenLogprob
from headwise.engine.sequence import Sequence
from headwise.engine.structured_output import apply_grammar_masks


@functools.cache
def _noise_pool() -> ThreadPoolExecutor:
    # draws of different requests run in parallel (each generator is used by one draw at a
    # time: a request has at most one draw in flight); exponential_ releases the GIL
    return ThreadPoolExecutor(
        max_workers=max(1, min(8, (os.cpu_count() or 2) // 2)), thread_name_prefix="headwise-noise"
    )


def _draw_noise(generator: torch.Generator, vocab_size: int, pin: bool) -> torch.Tensor:
    return torch.empty(vocab_size, pin_memory=pin).exponential_(generator=generator)


class Sampler:
    def __init__(self, vocab_size: int, eos_ids: tuple[int, ...], device: torch.device | str):
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"

    def prefetch_noise(self, seqs: Iterable[Sequence]) -> None:
        """Start drawing the next noise of every non-greedy sequence that has none in flight."""
        for seq in seqs:
            if seq.noise is None and not seq.params.greedy:
                seq.noise = _noise_pool().submit(_draw_noise, seq.generator, self.vocab_size, self._pin)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """Next token of each row of `logits [B, V]` (fp32, consumed: edited in place) and,
        for rows whose request asked, its TokenLogprob (raw log-probabilities: before
        penalties and temperature)."""
        params = [s.params for s in seqs]
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = logits[self._index(lp_rows, len(seqs))].log_softmax(-1) if lp_rows else None
        self._apply_logit_bias(logits, seqs)
        apply_grammar_masks(logits, seqs)  # after the bias: no bias re-allows a token the grammar forbids
        self._apply_penalties(logits, seqs)
        self._suppress_stop_tokens(logits, seqs)
        draw_rows = [i for i, p in enumerate(params) if not p.greedy]
        tokens = logits.argmax(-1) if len(draw_rows) < len(seqs) else None
        if draw_rows:
            drawn = self._draw(logits[self._index(draw_rows, len(seqs))], [seqs[i] for i in draw_rows])
            tokens = drawn if tokens is None else tokens.index_copy_(0, self._tensor(draw_rows, torch.long), drawn)
        assert tokens is not None  # every row is greedy or drawn
        on_device = [tokens]
        if raw_logprobs is not None:
            chosen = raw_logprobs.gather(1, tokens[self._index(lp_rows, len(seqs))][:, None])[:, 0]
            top_k = max(params[i].logprobs or 0 for i in lp_rows)
            on_device.append(chosen)
            if top_k:
                on_device.extend(raw_logprobs.topk(top_k, dim=-1))
        host = [t.tolist() for t in _to_host(on_device)]
        token_list = host[0]
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        for j, i in enumerate(lp_rows):
            k = params[i].logprobs
            top = list(zip(host[3][j][:k], host[2][j][:k])) if k else []
            logprobs[i] = TokenLogprob(token_list[i], host[1][j], top)
        self.prefetch_noise(seqs[i] for i in draw_rows if len(seqs[i].output_token_ids) + 1 < params[i].max_tokens)
        return token_list, logprobs

    # -- knobs, each one op over the rows that use it ------------------------------------
    def _apply_logit_bias(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        rows, cols, bias = [], [], []
        for i, seq in enumerate(seqs):
            for token, b in (seq.params.logit_bias or {}).items():
                rows.append(i)
                cols.append(token)
                bias.append(b)
        if rows:
            r, c = self._tensor(rows, torch.long), self._tensor(cols, torch.long)
            logits[r, c] += self._tensor(bias, torch.float32)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        rows, cols, pens = [], [], []
        for i, seq in enumerate(seqs):
            p = seq.params.repetition_penalty
            if p != 1.0:
                ids = sorted(set(seq.prompt_token_ids) | set(seq.output_token_ids))
                rows += [i] * len(ids)
                cols += ids
                pens += [p] * len(ids)
        if rows:
            r, c = self._tensor(rows, torch.long), self._tensor(cols, torch.long)
            pen = self._tensor(pens, torch.float32)
            vals = logits[r, c]
            logits[r, c] = torch.where(vals > 0, _divide(vals, pen), vals * pen)
        counted = [
            i
            for i, s in enumerate(seqs)
            if (s.params.presence_penalty or s.params.frequency_penalty) and s.output_token_ids
        ]
        if counted:
            vocab = logits.shape[1]
            flat = [j * vocab + t for j, i in enumerate(counted) for t in seqs[i].output_token_ids]
            counts = torch.zeros(len(counted), vocab, device=logits.device)
            counts.view(-1).index_add_(0, self._tensor(flat, torch.long), torch.ones(len(flat), device=logits.device))
            freq = self._tensor([seqs[i].params.frequency_penalty for i in counted], torch.float32)[:, None]
            pres = self._tensor([seqs[i].params.presence_penalty for i in counted], torch.float32)[:, None]
            ix = self._index(counted, len(seqs))
            logits[ix] -= freq * counts + pres * (counts > 0).float()

    def _suppress_stop_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Before min_tokens, EOS and stop tokens cannot be drawn."""
        rows, cols = [], []
        for i, seq in enumerate(seqs):
            p = seq.params
            if len(seq.output_token_ids) < p.min_tokens:
                ids = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_ids))
                rows += [i] * len(ids)
                cols += ids
        if rows:
            logits[self._tensor(rows, torch.long), self._tensor(cols, torch.long)] = float("-inf")

    def _draw(self, x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Temperature, top-k, min-p, top-p (in that order), then the exponential race."""
        n, vocab = x.shape
        params = [s.params for s in seqs]
        x = _divide(x, self._tensor([p.temperature for p in params], torch.float32)[:, None])
        use = [i for i, p in enumerate(params) if 0 < p.top_k < vocab]
        if use:
            ks = [params[i].top_k for i in use]
            x = self._on_rows(x, use, _keep_top_k, self._tensor([k - 1 for k in ks], torch.long)[:, None], max(ks))
        use = [i for i, p in enumerate(params) if p.min_p > 0]
        if use:
            x = self._on_rows(x, use, _keep_min_p, self._tensor([params[i].min_p for i in use], torch.float32)[:, None])
        use = [i for i, p in enumerate(params) if p.top_p < 1]
        if use:
            x = self._on_rows(x, use, _keep_top_p, self._tensor([params[i].top_p for i in use], torch.float32)[:, None])
        return (x.softmax(-1) / self._noise(seqs, vocab)).argmax(-1)

    def _noise(self, seqs: list[Sequence], vocab: int) -> torch.Tensor:
        """`[n, V]` on the device: each sequence's prefetched draw (drawn now if none is)."""
        self.prefetch_noise(s for s in seqs if s.noise is None)
        rows = []
        for seq in seqs:
            assert seq.noise is not None  # prefetched just above
            rows.append(seq.noise.result())
            seq.noise = None
        if self.device.type == "cpu":
            return torch.stack(rows)
        out = torch.empty(len(rows), vocab, device=self.device)
        for i, row in enumerate(rows):
            out[i].copy_(row, non_blocking=True)  # pinned rows: no host sync, no host-side stack
        return out

    # -- helpers ---------------------------------------------------------------------------
    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A small host list on the device without a sync (pinned, non-blocking copy)."""
        t = torch.tensor(values, dtype=dtype)
        return t if not self._pin else t.pin_memory().to(self.device, non_blocking=True)

    def _index(self, rows: list[int], n: int) -> slice | torch.Tensor:
        """Indexes `rows` of an n-row tensor: a plain slice (no gather) when they are all of them."""
        return slice(None) if len(rows) == n else self._tensor(rows, torch.long)

    def _on_rows(self, x: torch.Tensor, rows: list[int], fn, *args) -> torch.Tensor:
        """`fn(x[rows], *args)` written back into x (x itself when `rows` are all of its rows)."""
        if len(rows) == x.shape[0]:
            return fn(x, *args)
        ix = self._tensor(rows, torch.long)
        x[ix] = fn(x[ix], *args)
        return x


def _divide(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """`x / d`, rounded as the per-row sampler's `x / python_float` was: CUDA multiplies by
    the fp32 reciprocal of a scalar divisor, the CPU divides."""
    return x * d.reciprocal() if x.is_cuda else x / d


def _keep_top_k(x: torch.Tensor, k_minus_1: torch.Tensor, k_max: int) -> torch.Tensor:
    kth = x.topk(k_max, dim=-1).values.gather(1, k_minus_1)
    return x.masked_fill(x < kth, float("-inf"))


def _keep_min_p(x: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = x.softmax(-1)
    return x.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))


def _keep_top_p(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_x, order = x.sort(dim=-1, descending=True)
    probs = sorted_x.softmax(-1)
    # drop a token when the mass before it already reaches top_p (keeps at least one)
    drop = (probs.cumsum(-1) - probs) >= top_p
    return x.scatter(1, order, sorted_x.masked_fill(drop, float("-inf")))


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """CPU copies of `tensors` after one wait for the device (non-blocking copies, one sync)."""
    if not tensors[0].is_cuda:
        return tensors
    copies = [t.to("cpu", non_blocking=True) for t in tensors]
    # an event, not a stream sync: the one intended wait of a step, which
    # torch.cuda.set_sync_debug_mode does not flag (tests/gpu look for any other)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    return copies
