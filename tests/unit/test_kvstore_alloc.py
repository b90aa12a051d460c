"""kvstore.alloc.RegionAllocator: slabs per block size, coalescing, and random alloc/free
sequences that keep the region exactly covered with no slot handed out twice."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.alloc import RegionAllocator


def test_slots_of_one_size_fill_slabs_then_the_region() -> None:
    a = RegionAllocator(1000, slab_bytes=300)
    offs = [a.alloc(100) for _ in range(10)]
    assert sorted(offs) == list(range(0, 1000, 100))  # 3 slabs of 3 slots, then one of 1
    assert a.alloc(100) is None and a.bytes_used == 1000 and a.slab_count() == 4
    a.check()


def test_an_empty_slab_goes_back_and_coalesces_for_another_size() -> None:
    a = RegionAllocator(600, slab_bytes=200)
    small = [a.alloc(100) for _ in range(6)]
    assert a.alloc(300) is None
    for off in small[:2]:  # the first slab empties: 200 bytes, not enough for 300
        a.free(off, 100)
    assert a.alloc(300) is None
    for off in small[2:4]:  # the next one too, adjacent: 400 bytes in one range
        a.free(off, 100)
    assert a.alloc(300) == 0
    a.check()


def test_a_block_larger_than_slab_bytes_gets_a_slab_of_one() -> None:
    a = RegionAllocator(1 << 20, slab_bytes=4096)
    assert a.alloc(100_000) == 0 and a.alloc(100_000) == 100_000
    a.check()


def test_freeing_a_slot_that_is_not_allocated_is_refused() -> None:
    a = RegionAllocator(100, slab_bytes=50)
    off = a.alloc(10)
    with pytest.raises(ValueError):
        a.free(off + 5, 10)  # not a slot boundary
    with pytest.raises(ValueError):
        a.free(off, 20)  # wrong size
    with pytest.raises(ValueError):
        a.free(90, 10)  # free range, no slab
    a.free(off, 10)
    a.check()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([7, 16, 50, 128]), st.booleans()), max_size=120),
       st.integers(0, 2**32))
def test_random_alloc_free_keeps_the_region_exact(ops, seed) -> None:
    rng = random.Random(seed)
    a = RegionAllocator(1024, slab_bytes=128)
    live: dict[int, int] = {}
    for size, do_alloc in ops:
        if do_alloc or not live:
            off = a.alloc(size)
            if off is not None:
                assert all(off + size <= o or o + n <= off for o, n in live.items()), "overlap"
                assert 0 <= off and off + size <= 1024
                live[off] = size
            else:
                assert not a.can_fit_fresh(size)
                assert 1024 - a.bytes_used < 1024, "refused in an empty region"
        else:
            off = rng.choice(sorted(live))
            a.free(off, live.pop(off))
        a.check()
        assert a.bytes_used == sum(live.values())
    for off, n in live.items():
        a.free(off, n)
    a.check()
    assert a.slab_count() == 0 and a.bytes_used == 0
