"""Incremental detokenization and stop-string matching."""

from __future__ import annotations

from headwise.engine.sequence import Sequence

# tokens a decode window may span before it slides forward: a longer window costs a little
# more per decode, a shorter one an extra decode more often
WINDOW = 8


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def update(self, seq: Sequence) -> int:
        """Extend `seq.text` with the newest token; returns the number of characters added.

        vLLM's scheme: decode a small window of tokens that starts before the new ones, so
        a multi-byte character split over tokens appears once it is complete and a token's
        leading space is kept; the text is what the window adds to its prefix
        (`ids[prefix_offset:read_offset]`, whose text `seq.prefix_text` is kept from the
        decode that produced it). One decode per token; every WINDOW tokens one more, when
        the window restarts at the last emitted token, a character boundary.
        """
        ids = seq.output_token_ids
        full = self.tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=True)
        if len(full) <= len(seq.prefix_text) or full.endswith("\ufffd"):
            return 0
        new = full[len(seq.prefix_text) :]
        seq.text += new
        if len(ids) - seq.prefix_offset > WINDOW:
            seq.prefix_offset = seq.read_offset
            seq.prefix_text = self.tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=True)
        else:
            seq.prefix_text = full
        seq.read_offset = len(ids)
        return len(new)

    def find_stop(self, seq: Sequence, new_chars: int) -> str | None:
        """If a stop string ends in the newest `new_chars`, cut the text before it and
        return it."""
        stops = seq.params.stop
        if not stops or not new_chars:
            return None
        tail_from = max(0, len(seq.text) - new_chars - max(map(len, stops)) + 1)
        best: tuple[int, str] | None = None
        for s in stops:
            i = seq.text.find(s, tail_from)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        seq.text = seq.text[: best[0]]
        return best[1]
