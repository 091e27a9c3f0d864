"""Which KV heads each tensor-parallel rank holds: contiguous, or balanced by head budgets.

Tensor parallelism splits every layer's KV heads (with their GQA query heads) evenly over
the ranks; each rank's KV pool holds its heads' blocks, so admission is limited by the most
loaded rank. Contiguous sharding (rank r takes heads [r*k, (r+1)*k) of every layer) can put
a plan's full heads on one rank; `balanced` permutes each layer's heads so every rank holds
the same number of full heads (within one) and about the same blocks at the model's context
length. Plans stay in the model's own head numbering; the permutation is the loader's.
"""

from __future__ import annotations

from dataclasses import dataclass

from headwise.kvcache.plan_build import head_capacities, static_heads
from headwise.kvcache.plans import ModelShape, Plan


class ShardingError(ValueError):
    """A model whose heads do not split over the ranks."""


@dataclass(frozen=True)
class Sharding:
    ranks: int
    # order[l] lists layer l's KV heads (model numbering) in rank order: rank r holds
    # order[l][r * k:(r + 1) * k], k = kv_heads / ranks
    order: tuple[tuple[int, ...], ...]

    @property
    def heads_per_rank(self) -> int:
        return len(self.order[0]) // self.ranks

    def heads_of(self, rank: int) -> list[list[int]]:
        """Rank `rank`'s KV heads per layer, in the order its shard of the weights holds them."""
        k = self.heads_per_rank
        return [list(row[rank * k : (rank + 1) * k]) for row in self.order]

    @property
    def is_contiguous(self) -> bool:
        return all(list(row) == sorted(row) for row in self.order)


def check_divisible(shape: ModelShape, ranks: int) -> None:
    if ranks < 1:
        raise ShardingError(f"--tensor-parallel-size must be >= 1, got {ranks}")
    if shape.kv_heads % ranks or shape.heads % ranks:
        raise ShardingError(
            f"--tensor-parallel-size {ranks}: the model's {shape.kv_heads} KV heads and {shape.heads} query heads "
            f"per layer must both divide by it (no KV-head replication); use a divisor of {shape.kv_heads}"
        )


def contiguous(shape: ModelShape, ranks: int) -> Sharding:
    check_divisible(shape, ranks)
    return Sharding(ranks, tuple(tuple(range(shape.kv_heads)) for _ in range(shape.layers)))


def head_blocks(plan: Plan, context_len: int, block_size: int = 16) -> list[list[int]]:
    """Blocks each (layer, KV head) holds for a request of `context_len` tokens once its
    prompt is processed: what a rank's pool must hold for it."""
    return [[-(-cap // block_size) for cap in row] for row in head_capacities(plan, context_len)]


def for_default_plan(plan: Plan, ranks: int, context_len: int, block_size: int = 16) -> Sharding:
    """The engine's sharding: balanced for its default plan, contiguous when that plan is full."""
    check_divisible(plan.model, ranks)
    if plan.name == "full" and plan.dynamic is None and all(s.kind == "full" for row in plan.heads for s in row):
        return contiguous(plan.model, ranks)
    return balanced(plan, ranks, context_len, block_size)


def balanced(plan: Plan, ranks: int, context_len: int, block_size: int = 16) -> Sharding:
    """Per layer, heads go to ranks with room in that layer: full heads first, each to the rank
    with the fewest full heads so far, then the rest, largest first, each to the rank with the
    fewest blocks so far (ties: the lower rank). A dynamic plan picks its full heads per
    request, so it keeps the contiguous sharding."""
    shape = plan.model
    check_divisible(shape, ranks)
    if plan.dynamic is not None:
        return contiguous(shape, ranks)
    k = shape.kv_heads // ranks
    blocks = head_blocks(plan, context_len, block_size)
    full_count = [0] * ranks
    held = [0] * ranks
    order = []
    for layer, row in enumerate(plan.heads):
        slots: list[list[int]] = [[] for _ in range(ranks)]
        heads = sorted(range(shape.kv_heads), key=lambda h: (row[h].kind != "full", -blocks[layer][h], h))
        for h in heads:
            full = row[h].kind == "full"
            room = [r for r in range(ranks) if len(slots[r]) < k]
            r = min(room, key=lambda r: (full_count[r], held[r], r) if full else (held[r], r))
            slots[r].append(h)
            held[r] += blocks[layer][h]
            full_count[r] += full
        order.append(tuple(h for r in range(ranks) for h in sorted(slots[r])))
    return Sharding(ranks, tuple(order))


def rank_blocks(plan: Plan, sharding: Sharding, context_len: int, block_size: int = 16) -> list[int]:
    """Blocks each rank holds for one request of `context_len` tokens under `plan`."""
    blocks = head_blocks(plan, context_len, block_size)
    return [sum(blocks[l][h] for l, row in enumerate(sharding.heads_of(r)) for h in row) for r in range(sharding.ranks)]


def imbalance(per_rank: list[int]) -> float:
    """Largest rank over the mean (1.0 = perfectly balanced)."""
    mean = sum(per_rank) / len(per_rank)
    return max(per_rank) / mean if mean else 1.0


def rank_plans(plan: Plan, sharding: Sharding) -> list[Plan]:
    """Each rank's part of `plan`: its heads per layer (a dynamic plan's stand-in heads of
    `static_heads`, which put a layer's full heads first: on the lowest ranks)."""
    shape = plan.model
    k = shape.kv_heads // sharding.ranks
    part_shape = ModelShape(shape.layers, k, shape.heads // sharding.ranks, shape.head_dim, shape.id)
    heads = static_heads(plan)
    return [
        Plan(plan.name, part_shape, [[heads[l][h] for h in row] for l, row in enumerate(sharding.heads_of(r))])
        for r in range(sharding.ranks)
    ]
