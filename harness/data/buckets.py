"""Aspect-ratio bucketing: a few training resolutions of about the same pixel count, and a batch
sampler whose batches each come from one bucket (so a batch stacks into one tensor without squashing
or over-cropping portrait and landscape photos).

Sizes are (width, height) like PIL. The sampler is deterministic given (seed, epoch) and shards
whole batches across ranks, so DDP ranks see disjoint images.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from harness.errors import HarnessError


def make_buckets(base_resolution: int = 512, *, step: int = 64, min_size: int | None = None,
                 max_size: int | None = None, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of ``step``, each with at most ``base_resolution**2`` pixels
    and aspect ratio within [1/max_aspect, max_aspect]; sorted from tallest to widest."""
    if base_resolution < step or base_resolution % step:
        raise HarnessError(f"base_resolution: expected a multiple of step={step}, got {base_resolution}")
    if max_aspect < 1:
        raise HarnessError(f"max_aspect: expected >= 1, got {max_aspect}")
    area = base_resolution * base_resolution
    min_size = min_size or max(step, (base_resolution // 2) // step * step)
    max_size = max_size or base_resolution * 2
    buckets = set()
    for w in range(min_size, max_size + 1, step):
        h = min(max_size, (area // w) // step * step)
        for a, b in ((w, h), (h, w)):
            if min_size <= b and b <= max_size and max(a / b, b / a) <= max_aspect + 1e-9:
                buckets.add((a, b))
    buckets.add((base_resolution, base_resolution))
    return sorted(buckets, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``size``'s (in log space, so 1:2 and 2:1 are symmetric)."""
    if not buckets:
        raise HarnessError("buckets: expected at least one (width, height) bucket, got none")
    w, h = size
    target = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


class BucketBatchSampler:
    """Batches of dataset indices, each batch from one size group.

    ``dataset_sizes[i]`` is item i's target size (any hashable, e.g. its bucket); items with equal
    sizes share batches. Every epoch (``set_epoch``) reshuffles within buckets and the batch order,
    reproducibly from ``seed``. Rank r of ``num_replicas`` gets every num_replicas-th batch; all ranks
    get the same number of batches (with ``drop_last`` the leftover batches are dropped, otherwise
    the first batches are repeated to even the count, the only case where ranks share images).
    """

    def __init__(self, dataset_sizes: Sequence, batch_size: int, seed: int = 0, drop_last: bool = False,
                 num_replicas: int = 1, rank: int = 0):
        if batch_size < 1:
            raise HarnessError(f"batch_size: expected >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise HarnessError(f"rank: expected 0 <= rank < num_replicas={num_replicas}, got {rank}")
        self.sizes = [tuple(s) if isinstance(s, list) else s for s in dataset_sizes]
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def groups(self) -> dict:
        out: dict = {}
        for i, s in enumerate(self.sizes):
            out.setdefault(s, []).append(i)
        return out

    def _all_batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        batches = []
        for _size, idx in sorted(self.groups().items(), key=lambda kv: str(kv[0])):
            idx = idx[:]
            rng.shuffle(idx)
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        return batches

    def _per_rank(self, n_batches: int) -> int:
        if self.drop_last:
            return n_batches // self.num_replicas
        return math.ceil(n_batches / self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all_batches()
        per_rank = self._per_rank(len(batches))
        total = per_rank * self.num_replicas
        if total > len(batches) and batches:
            batches = (batches * math.ceil(total / len(batches)))[:total]
        yield from batches[:total][self.rank::self.num_replicas]

    def __len__(self) -> int:
        n = 0
        for idx in self.groups().values():
            n += len(idx) // self.batch_size if self.drop_last else math.ceil(len(idx) / self.batch_size)
        return self._per_rank(n)
