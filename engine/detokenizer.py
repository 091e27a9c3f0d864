"""Incremental detokenization and stop-string matching."""

from __future__ import annotations

from headwise.engine.sequence import Sequence


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def update(self, seq: Sequence) -> int:
        """Extend `seq.text` with the newest token. Decodes a small window of tokens so a
        multi-byte character split over tokens appears once it is complete. Returns the
        number of characters added."""
        ids = seq.output_token_ids
        prefix = self.tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            seq.text += new
            seq.prefix_offset = seq.read_offset
            seq.read_offset = len(ids)
            return len(new)
        return 0

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
        seq.text = seq.text[:best[0]]
        return best[1]
