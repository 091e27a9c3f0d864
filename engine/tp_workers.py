"""Tensor-parallel workers: ranks 1..N-1 run the model on their heads, driven by rank 0.

Rank 0 is the engine: it schedules, keeps the KV bookkeeping of every rank (each rank's pool
holds its own heads' blocks; a request must fit on every rank) and, once per step, sends the
other ranks one message on the gloo control group: the step's inputs, each rank's block-table
edits and compaction moves. Every rank then runs its part of the forward; the row-parallel
layers' all-reduces keep the ranks in step, and every rank ends with the same hidden states,
of which rank 0 samples. At the end of a prompt that selects (select heads, dynamic plans)
rank 0 asks every rank for its heads' middle-token scores (and outputs) and gathers them.

On one node rank 0 spawns the workers (`spawn`); on several, torchrun starts every rank
and ranks > 0 call `worker_main` from the command line (`clients/cli.py`).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from dataclasses import dataclass, replace
from multiprocessing.process import BaseProcess

import torch

from headwise.engine.config import EngineConfig
from headwise.engine.distributed import ParallelEnv, TPGroup, free_port
from headwise.engine.model import Shard
from headwise.engine.model_runner import ModelRunner
from headwise.engine.step_inputs import StepInputs
from headwise.engine.weights import load_model
from headwise.kernels.kv_quant import cache_dtype
from headwise.kvcache.block_tables import DeviceTables
from headwise.kvcache.kv_scales import rank_scales
from headwise.kvcache.manager import KVCacheManager, apply_moves, make_buffers
from headwise.kvcache.worker_kv import WorkerKV

log = logging.getLogger(__name__)


class WorkerDied(RuntimeError):
    """A tensor-parallel worker exited: the engine cannot go on."""


@dataclass
class RankSetup:
    """What a rank needs besides the engine config to build its part."""

    order: tuple[tuple[int, ...], ...]  # every layer's KV heads in rank order (kvcache.sharding)
    num_blocks: int  # blocks per rank
    max_model_len: int


def rank_device(config: EngineConfig, local_rank: int) -> torch.device:
    device = torch.device(config.device)
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


class TPWorkers:
    """Rank 0's handle on the other ranks."""

    def __init__(self, group: TPGroup, kv_manager: KVCacheManager, processes: list[BaseProcess]):
        self.group = group
        self.kv_manager = kv_manager
        self.processes = processes  # empty under torchrun (the launcher owns them)

    def check_alive(self) -> None:
        dead = [i + 1 for i, p in enumerate(self.processes) if not p.is_alive()]
        if dead:
            raise WorkerDied(
                f"tensor-parallel worker rank {dead[0]} exited (exit code {self.processes[dead[0] - 1].exitcode})"
            )

    def raise_if_dead(self, error: BaseException, wait_s: float = 2.0) -> None:
        """WorkerDied (from `error`) if a worker has exited: a collective that failed because
        its peer died ("connection reset by peer") names the rank. The dead process may
        take a moment to be reaped, hence the wait (the whole `wait_s` when every worker lives)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.check_alive()
            except WorkerDied as died:
                raise died from error
            if not self.processes or time.monotonic() > deadline:
                return
            time.sleep(0.05)

    def step(self, inputs: StepInputs) -> None:
        """Send the step to every rank (after applying rank 0's table edits)."""
        self.check_alive()
        edits = self.kv_manager.commit_tables()
        moves = self.kv_manager.take_remote_moves()
        self.group.broadcast(("step", inputs, edits, moves[1:]))

    def select(
        self, row: int, prompt_len: int, with_outputs: bool, runner: ModelRunner
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every rank's selection inputs for table `row` side by side (rank-major, as the
        tables): scores `[L, Hkv, P]` and attention outputs `[L, W, Hq, D]`."""
        self.check_alive()
        self.group.broadcast(("select", row, prompt_len, with_outputs))
        parts = self.group.gather(runner.selection_inputs(row, prompt_len, with_outputs))
        assert parts is not None  # rank 0 gathers
        scores = torch.cat([s for s, _ in parts], dim=1)
        outputs = torch.cat([o for _, o in parts], dim=2) if with_outputs else None
        return scores, outputs

    def shutdown(self) -> None:
        """Stop the workers: every rank leaves the groups together, then the processes exit."""
        try:
            if all(p.is_alive() for p in self.processes):
                self.group.broadcast(("stop",))
                self.group.barrier()
        except RuntimeError as e:  # a worker that went away mid-shutdown
            log.warning("tensor-parallel shutdown: %s", e)
        self.group.destroy()
        for p in self.processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def start(config: EngineConfig, setup: RankSetup) -> tuple[TPGroup, list[BaseProcess]]:
    """Rank 0's process group: under torchrun from its variables, else with N - 1 spawned
    worker processes on this node."""
    n = config.tensor_parallel_size
    env = ParallelEnv.from_env()
    processes: list[BaseProcess] = []
    if env is None:
        env = ParallelEnv(0, n, 0, "127.0.0.1", free_port())
        ctx = mp.get_context("spawn")
        for rank in range(1, n):
            p = ctx.Process(
                target=worker_main,
                args=(config, setup, replace(env, rank=rank, local_rank=rank)),
                name=f"headwise-tp{rank}",
                daemon=True,
            )
            p.start()
            processes.append(p)
    elif env.world_size != n or env.rank != 0:
        raise ValueError(f"--tensor-parallel-size {n} but torchrun started rank {env.rank} of {env.world_size}")
    group = TPGroup.init(env, rank_device(config, env.local_rank))
    if not processes:  # torchrun: the other ranks learn the setup from rank 0
        group.broadcast(setup)
    return group, processes


def worker_main(config: EngineConfig, setup: RankSetup | None, env: ParallelEnv) -> None:
    """A rank > 0: build its part of the model and cache, then follow rank 0's messages.
    `setup` None (torchrun): rank 0 broadcasts it after the group forms."""
    device = rank_device(config, env.local_rank)
    group = TPGroup.init(env, device)
    if setup is None:
        setup = group.broadcast()
    n = config.tensor_parallel_size
    k = len(setup.order[0]) // n
    shard = Shard(env.rank, n, tuple(row[env.rank * k : (env.rank + 1) * k] for row in setup.order))
    cfg, model, _ = load_model(config.model, config.dtype, str(device), config.load_format, shard, group)
    dtype = cache_dtype(config.kv_cache_dtype, getattr(torch, config.dtype))
    scales = rank_scales(config.kv_scales, cfg.num_layers, len(setup.order[0]), setup.order, env.rank, n)
    rows = config.max_num_seqs + 1
    width = -(-setup.max_model_len // config.block_size) + 1
    cache = WorkerKV(
        DeviceTables(cfg.num_layers, rows, k, width, device),
        make_buffers(setup.num_blocks, config.block_size, cfg.head_dim, dtype, device, cfg.num_layers, k, scales),
        config.block_size,
        env.rank * k,
    )
    runner = ModelRunner(model, cache, str(device))
    if device.type == "cuda" and not config.enforce_eager:
        runner.capture_decode(config.max_num_seqs)  # in step with rank 0's capture (all-reduces inside)
    try:
        while True:
            msg = group.broadcast()
            if msg[0] == "step":
                _, inputs, edits, moves = msg
                table, params = edits[env.rank - 1]
                cache.tables.apply(table, params)
                for src, dst in moves[env.rank - 1]:
                    apply_moves(cache.buffers, src, dst)
                runner.run(inputs)
            elif msg[0] == "select":
                _, row, prompt_len, with_outputs = msg
                group.gather(runner.selection_inputs(row, prompt_len, with_outputs))
            elif msg[0] == "stop":
                group.barrier()
                group.destroy()
                return
    except RuntimeError as e:  # rank 0 went away: nothing left to serve
        log.warning("tensor-parallel rank %d stops: %s", env.rank, e)
