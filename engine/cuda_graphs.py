"""Decode steps replayed from CUDA graphs (nano-vllm's capture_cudagraph / run_model).

A decode step's inputs are three small tensors (token ids, table rows, positions); the
metadata is derived from them and from the persistent block tables on the device, so one
graph per batch size covers every plan kind: window rings, per-head lengths and masks are
tensor values, not Python branches. Batch sizes 1, 2, 4, 8, then steps of 16 up to the
largest are captured, largest first, sharing one memory pool; a step of n sequences
replays the smallest captured size >= n with the rest padded onto the tables' padding row
(which writes nothing and reads nothing). The block tables are used at their full width,
so their addresses and the decode kernel's grid never change between replays.

`StaticDecode` is the same padded computation without the capture: it runs on any device
and is what the CPU tests check against the eager path.
"""

from __future__ import annotations

import torch

from headwise.engine.model import LlamaModel
from headwise.engine.step_inputs import build_metadata
from headwise.kvcache.worker_kv import WorkerKV


def capture_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
    return sorted(set(sizes))


class StaticDecode:
    """Decode over fixed buffers: inputs copied into `[:n]`, the rest padding."""

    def __init__(self, model: LlamaModel, kv: WorkerKV, max_batch: int, device: torch.device):
        self.model, self.kv = model, kv
        self.max_batch = max_batch
        self.sizes = capture_sizes(max_batch)
        self.ids = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.info = torch.zeros(3, max_batch, dtype=torch.int32, device=device)  # rows, positions, counts
        self.runs: dict[tuple[int, int], int] = {}  # (sequences, padded size) -> steps
        self._pad()

    def _pad(self) -> None:
        self.ids.zero_()
        self.info[0].fill_(self.kv.tables.pad_row)
        self.info[1].zero_()
        self.info[2].fill_(1)

    def size_for(self, n: int) -> int:
        return next(s for s in self.sizes if s >= n)

    def forward(self, size: int) -> torch.Tensor:
        """The captured computation: hidden states `[size, hidden]` of the static inputs."""
        tables = self.kv.tables
        meta = build_metadata(
            tables,
            self.kv.block_size,
            self.info[:, :size],
            num_prefill=0,
            num_prefill_tokens=0,
            num_tokens=size,
            width=tables.width,
            max_seqlen=0,
            has_cache=False,
            all_full=True,
        )
        return self.model(self.ids[:size], meta, self.kv.buffers)

    def load(self, packed: torch.Tensor, n: int) -> int:
        """Copy a step's `packed` inputs (ids then rows, positions, counts; on the device) into
        the static buffers; returns the padded size to run."""
        size = self.size_for(n)
        self.runs[n, size] = self.runs.get((n, size), 0) + 1
        self._pad()
        self.ids[:n].copy_(packed[:n])
        self.info[:, :n].copy_(packed[n:].view(3, n))
        return size

    def run(self, packed: torch.Tensor, n: int) -> torch.Tensor:
        return self.forward(self.load(packed, n))[:n]


class DecodeGraphs(StaticDecode):
    """StaticDecode captured once per batch size and replayed."""

    def __init__(self, model: LlamaModel, kv: WorkerKV, max_batch: int, device: torch.device):
        super().__init__(model, kv, max_batch, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = None
        for size in reversed(self.sizes):
            self.forward(size)  # warm-up: Triton compiles and autotunes outside the capture
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(device)

    def run(self, packed: torch.Tensor, n: int) -> torch.Tensor:
        size = self.load(packed, n)
        self.graphs[size].replay()
        return self.outputs[size][:n]
