"""Constrained decoding: compiled grammars, one matcher per request, the batch's mask.

Compilation runs on a worker thread, started when a request is added (the server starts it
earlier, to answer a grammar that does not compile with a 400); a waiting request whose
grammar is not compiled yet is passed over by admission (`Sequence.grammar_ready`) and the
requests behind it go on. Compiled grammars are cached by their source.

Each step the sampler fills one bitmask for the batch (all-allowed rows for unconstrained
requests, which `apply_token_bitmask_inplace` leaves untouched) and applies it to the logits
on their device before penalties, temperature and the draw. The matcher accepts the token
the request appends; EOS is allowed by the mask only where the grammar may end. Preemption
recomputes the K/V of the kept output tokens without sampling them again, so a matcher that
accepted those tokens stays valid as it is.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache

import torch
import xgrammar as xgr

from headwise.engine.grammar_spec import GrammarSpec, choice_ebnf
from headwise.engine.sampling_params import InvalidRequest

# compiled grammars kept (a JSON schema's is tens of KB to a few MB)
CACHE_SIZE = 256


class GrammarRejected(RuntimeError):
    """The sampled token is not allowed by the request's grammar (an engine bug, not a user error)."""


class GrammarCompiler:
    """Compiles GrammarSpecs for one tokenizer on a worker thread, caching the results."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: tuple[int, ...]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self.eos_ids = eos_ids
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headwise-grammar")
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler: xgr.GrammarCompiler | None = None  # built on first use: the vocabulary scan takes ~1 s

    def compile(self, spec: GrammarSpec) -> Future:
        """A future CompiledGrammar for `spec` (shared with every other request of the same source);
        a grammar that does not compile resolves to an InvalidRequest naming `spec.param`."""
        with self._lock:
            future = self._cache.get(spec.key)
            if future is not None:
                self._cache.move_to_end(spec.key)
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[spec.key] = future
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return future

    def _compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(
                self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=list(self.eos_ids)
            )
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        compiler = self._compiler
        try:
            # compact whitespace: free whitespace lets a small model pad until max_tokens (vLLM's
            # disable_any_whitespace); the documents are the same
            compiled = self._compile_kind(compiler, spec)
        except Exception as e:  # xgrammar's errors name the position and the reason
            reason = str(e).split(": ", 1)[-1].strip() if "] /" in str(e) else str(e).strip()
            raise InvalidRequest(f"{spec.param} does not compile: {reason}", spec.param, "invalid_grammar") from None
        if not _can_start(compiled, self.eos_ids):
            raise InvalidRequest(
                f"{spec.param}: no token of this model's vocabulary can start an output the grammar allows",
                spec.param,
                "invalid_grammar",
            )
        return compiled

    @staticmethod
    def _compile_kind(compiler: xgr.GrammarCompiler, spec: GrammarSpec) -> xgr.CompiledGrammar:
        if spec.kind == "json":
            return compiler.compile_json_schema(spec.source, any_whitespace=False, strict_mode=True)
        if spec.kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if spec.kind == "regex":
            return compiler.compile_regex(spec.source)
        if spec.kind == "choice":
            return compiler.compile_grammar(choice_ebnf(spec.source))
        if spec.kind == "grammar":
            return compiler.compile_grammar(spec.source)
        return compiler.compile_structural_tag(spec.source)


def _can_start(compiled: xgr.CompiledGrammar, eos_ids: tuple[int, ...]) -> bool:
    """Whether some token may come first (a vocabulary without the grammar's first
    characters would leave every logit masked)."""
    matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=list(eos_ids))
    bitmask = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask, 0)
    return bool(bitmask.any())


class GrammarState:
    """One request choice's grammar: the compile in flight, then its matcher."""

    def __init__(self, compiled: Future, eos_ids: tuple[int, ...]) -> None:
        self._compiled = compiled
        self._eos_ids = list(eos_ids)
        self._matcher: xgr.GrammarMatcher | None = None

    def ready(self) -> bool:
        return self._compiled.done()

    @property
    def matcher(self) -> xgr.GrammarMatcher:
        if self._matcher is None:  # raises the compile error: the request fails, no other
            self._matcher = xgr.GrammarMatcher(self._compiled.result(), override_stop_tokens=self._eos_ids)
        return self._matcher

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise GrammarRejected(f"token {token} is not allowed by the request's grammar")

    @property
    def terminated(self) -> bool:
        return self._matcher is not None and self._matcher.is_terminated()


@cache
def _batch_matcher() -> xgr.BatchGrammarMatcher:
    return xgr.BatchGrammarMatcher(max_threads=max(1, torch.get_num_threads()))


def apply_grammar_masks(logits: torch.Tensor, seqs: list) -> None:
    """Disallowed tokens of constrained rows to -inf, in place, on the logits' device."""
    rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
    if not rows:
        return
    bitmask = xgr.allocate_token_bitmask(len(seqs), logits.shape[1])
    if len(rows) == 1:
        seqs[rows[0]].grammar.matcher.fill_next_token_bitmask(bitmask, rows[0])
    else:  # the rows' masks on the compute threads at once (xgrammar's C++ threads, no GIL)
        _batch_matcher().batch_fill_next_token_bitmask([seqs[i].grammar.matcher for i in rows], bitmask, rows)
    if logits.is_cuda:
        bitmask = bitmask.pin_memory().to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
