"""RequestOutput's cumulative fields: snapshots of the growing lists while a request runs
(no per-step copy), plain lists once it has finished."""

from __future__ import annotations

import pytest

from headwise.engine.outputs import Snapshot
from headwise.engine.sampling_params import SamplingParams


def test_snapshot_keeps_what_the_list_held_when_taken():
    items = [10, 11, 12]
    snap = Snapshot(items)
    items.extend([13, 14])
    assert len(snap) == 3 and list(snap) == [10, 11, 12]
    assert snap[0] == 10 and snap[-1] == 12 and snap[1:] == [11, 12] and snap[::-1] == [12, 11, 10]
    assert snap[-5:10] == [10, 11, 12] and snap[3:] == []
    assert snap == [10, 11, 12] and snap != [10, 11, 12, 13] and snap == Snapshot([10, 11, 12])
    assert snap.index(12) == 2 and 11 in snap and 13 not in snap
    with pytest.raises(IndexError, match="index 3 out of range for 3 items"):
        snap[3]
    with pytest.raises(IndexError):
        snap[-4]


def test_streamed_outputs_are_snapshots_and_the_finished_one_is_lists(engine, tok):
    prompt = tok("Count to ten: one, two,")["input_ids"]
    engine.add_request("snap", prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1))
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(o for o in engine.step() if o.request_id == "snap")
    assert [len(o.token_ids) for o in outs] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(o.token_ids, Snapshot) and isinstance(o.logprobs, Snapshot) for o in outs[:-1])
    final = outs[-1]
    assert type(final.token_ids) is list and type(final.logprobs) is list and final.finished
    for o in outs[:-1]:  # each step's output still reads as it was reported
        assert list(o.token_ids) == final.token_ids[: len(o.token_ids)]
        assert [lp.token_id for lp in o.logprobs] == final.token_ids[: len(o.token_ids)]
