"""How the splits reach the training workers, and in what order.

A cached training split is shuffled once, with the seed, and cut into small blocks
(``cut_for_training``). Ray Train's default hands every split to its workers
through a streaming split: a coordinator actor that deals blocks out again every epoch
and, to give every rank the same rows, runs a task each epoch that cuts a block in two.
On a node whose CPUs the workers hold, that task waits for a fresh worker process, and a
split of one block (small data) holds back every rank's first batch. ``ShardPerWorker``
deals a cached split out once per worker group instead: each rank keeps its shard (rows
that the shuffle made a random sample) and reads its blocks in a new order every epoch,
after the first from the copies its node pulled (Ray keeps them while the object store
has room). The shards are cut in the driver for every number of workers the run, or a
search's trials, may have (``deal``), while no worker holds a CPU. Streamed splits keep
Ray Train's streaming split.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import ray.data
import ray.train
from ray.data import RandomSeedConfig
from ray.data.dataset import MaterializedDataset

#: Blocks a cached training split is cut into, at least: enough for 16 workers to get 4
#: each, so shards split on block boundaries and a rank fetches its next block while it
#: trains on the one before. It depends on the data alone, so runs at any batch size or
#: world size read the same blocks.
MIN_BLOCKS = 64

#: The largest block a cut makes: big splits get more blocks, not bigger ones.
MAX_BLOCK_BYTES = 16 << 20


def rows_per_block(rows: int, bytes_per_row: float) -> int:
    """Rows in each block of a cached training split of ``rows`` rows."""
    return max(1, min(math.ceil(rows / MIN_BLOCKS), int(MAX_BLOCK_BYTES // max(bytes_per_row, 1))))


def cut_for_training(train: MaterializedDataset, seed: int) -> MaterializedDataset:
    """The cached training split with its rows shuffled (a file sorted by class trains
    as well as a shuffled one) and cut into blocks of ``rows_per_block``."""
    rows = train.count()
    size = rows_per_block(rows, train.size_bytes() / max(rows, 1))
    shuffled = train.random_shuffle(seed=seed)
    return shuffled.repartition(target_num_rows_per_block=size).materialize()


def in_epoch_order(shard: ray.data.Dataset, seed: int, rank: int) -> ray.data.Dataset:
    """``shard`` with its blocks in a new order every time it is read (every epoch),
    the same orders for every run of the seed."""
    rank_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    return shard.randomize_block_order(seed=RandomSeedConfig(seed=rank_seed))


def deal(
    datasets: dict[str, MaterializedDataset], world_sizes: Iterable[int]
) -> dict[str, dict[int, list[MaterializedDataset]]]:
    """Each cached split cut into equal shards for every world size a run may have
    (every size of an elastic range, every value a search gives scaling.num_workers),
    now, in the driver, before any worker holds a CPU:
    ``Dataset.split`` cuts a block with a task of one CPU, which a cluster whose CPUs all
    went to the workers would never run. Only the cut blocks are new objects."""
    return {
        name: {size: dataset.split(size, equal=True) for size in world_sizes}
        for name, dataset in datasets.items()
    }


class ShardPerWorker(ray.train.DataConfig):
    """Cached splits dealt out once per worker group from the shards ``deal`` cut, equal
    rows per rank (the last rows that do not divide are left out, as Ray Train's
    streaming split does); the ``reordered`` ones read in a new block order every epoch."""

    def __init__(
        self,
        shards: dict[str, dict[int, list[MaterializedDataset]]],
        seed: int,
        reordered: tuple[str, ...] = ("train",),
    ):
        super().__init__()
        self.shards = shards
        self.seed = seed
        self.reordered = reordered

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        streamed = {n: d for n, d in datasets.items() if n not in self.shards}
        output = super().configure(streamed, world_size, worker_handles, worker_node_ids, **kwargs)
        for name, by_size in self.shards.items():
            for rank, shard in enumerate(by_size[world_size]):
                ordered = (
                    in_epoch_order(shard, self.seed, rank) if name in self.reordered else shard
                )
                output[rank][name] = ordered.iterator()
        return output
