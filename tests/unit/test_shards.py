"""How a cached training split is cut into blocks (forgeml.data.shards)."""

from __future__ import annotations

from forgeml.data.shards import MAX_BLOCK_BYTES, MIN_BLOCKS, rows_per_block


def test_a_small_split_is_cut_into_enough_blocks_for_many_workers():
    assert rows_per_block(4410, 4096) == 69  # 64 blocks, the last one short
    assert rows_per_block(900, 80) == 15
    assert rows_per_block(10, 80) == 1  # a block per row rather than fewer blocks


def test_a_large_split_is_cut_into_blocks_no_larger_than_the_cap():
    rows = 10_000_000
    size = rows_per_block(rows, 4096)
    assert size * 4096 <= MAX_BLOCK_BYTES and rows / size > MIN_BLOCKS
