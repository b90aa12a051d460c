"""Slab allocation of the RAM region: which byte ranges hold which size of block.

The region [0, size) is a set of free ranges and slabs. A slab is one contiguous
range holding `nslots` slots of exactly one `slot_bytes` (a layout's block_bytes),
so a block is always one contiguous [offset, offset + slot_bytes) range and blocks
of one size never fragment each other. A slab is carved when its size class has
no free slot, and given back to the free ranges (coalesced with its neighbours)
the moment its last slot is freed, so memory moves between block sizes as the
mix of layouts changes.

Invariants (checked by `check()`):
- slabs and free ranges are disjoint and together cover [0, size) exactly;
- within a slab, every slot is either free or allocated, never both;
- bytes_used == sum over allocated slots of slot_bytes.
Not thread-safe; O(log slabs) per call plus O(free ranges) when a slab is carved.
"""

from __future__ import annotations

import bisect


class _Slab:
    __slots__ = ("start", "slot_bytes", "nslots", "fresh", "freed", "used")

    def __init__(self, start: int, slot_bytes: int, nslots: int) -> None:
        self.start = start
        self.slot_bytes = slot_bytes
        self.nslots = nslots
        self.fresh = 0  # slots [fresh, nslots) were never handed out
        self.freed: list[int] = []  # slot indices handed back
        self.used = 0

    @property
    def end(self) -> int:
        return self.start + self.slot_bytes * self.nslots

    def take(self) -> int:
        if self.freed:
            i = self.freed.pop()
        else:
            i = self.fresh
            self.fresh += 1
        self.used += 1
        return self.start + i * self.slot_bytes

    def full(self) -> bool:
        return self.used == self.nslots


class RegionAllocator:
    """Slots of any size up to the region's, carved into per-size slabs of about `slab_bytes`."""

    def __init__(self, size: int, slab_bytes: int) -> None:
        if size < 1 or slab_bytes < 1:
            raise ValueError("size and slab_bytes must be positive")
        self.size = size
        self.slab_bytes = slab_bytes
        self.bytes_used = 0
        self._free: dict[int, int] = {0: size}  # start -> length of free ranges
        self._free_starts: list[int] = [0]
        self._slabs: dict[int, _Slab] = {}
        self._slab_starts: list[int] = []
        self._partial: dict[int, dict[int, _Slab]] = {}  # slot_bytes -> slabs with a free slot, by start

    # -- slots ---------------------------------------------------------------------------------
    def alloc(self, slot_bytes: int) -> int | None:
        """The offset of a free slot of `slot_bytes`, carving a slab if needed; None if neither fits."""
        partial = self._partial.get(slot_bytes)
        if not partial:
            slab = self._carve(slot_bytes)
            if slab is None:
                return None
            partial = self._partial.setdefault(slot_bytes, {})
            partial[slab.start] = slab
        start = next(iter(partial))
        slab = partial[start]
        off = slab.take()
        if slab.full():
            del partial[start]
            if not partial:
                del self._partial[slot_bytes]
        self.bytes_used += slot_bytes
        return off

    def free(self, offset: int, slot_bytes: int) -> None:
        """Give back the slot at `offset` (allocated with `slot_bytes`)."""
        slab = self._slab_at(offset)
        if slab is None or slab.slot_bytes != slot_bytes or (offset - slab.start) % slot_bytes:
            raise ValueError(f"no slot of {slot_bytes} bytes at {offset}")
        i = (offset - slab.start) // slot_bytes
        was_full = slab.full()
        slab.freed.append(i)
        slab.used -= 1
        self.bytes_used -= slot_bytes
        if slab.used == 0:
            self._drop_slab(slab, listed=not was_full)
        elif was_full:
            self._partial.setdefault(slot_bytes, {})[slab.start] = slab

    def can_fit_fresh(self, slot_bytes: int) -> bool:
        """Whether a slot of this size is available without evicting anything."""
        return bool(self._partial.get(slot_bytes)) or any(n >= slot_bytes for n in self._free.values())

    def slab_count(self) -> int:
        return len(self._slabs)

    # -- slabs ---------------------------------------------------------------------------------
    def _slab_at(self, offset: int) -> _Slab | None:
        i = bisect.bisect_right(self._slab_starts, offset) - 1
        if i < 0:
            return None
        slab = self._slabs[self._slab_starts[i]]
        return slab if offset < slab.end else None

    def _carve(self, slot_bytes: int) -> _Slab | None:
        want_slots = max(1, self.slab_bytes // slot_bytes)
        want = want_slots * slot_bytes
        best_start, best_len = -1, 0
        for start in self._free_starts:  # first fit of a whole slab, else the largest range
            n = self._free[start]
            if n >= want:
                best_start, best_len = start, n
                break
            if n > best_len:
                best_start, best_len = start, n
        if best_len < slot_bytes:
            return None
        nslots = min(want_slots, best_len // slot_bytes)
        length = nslots * slot_bytes
        self._take_range(best_start, length)
        slab = _Slab(best_start, slot_bytes, nslots)
        self._slabs[best_start] = slab
        bisect.insort(self._slab_starts, best_start)
        return slab

    def _drop_slab(self, slab: _Slab, listed: bool) -> None:
        if listed:
            del self._partial[slab.slot_bytes][slab.start]
            if not self._partial[slab.slot_bytes]:
                del self._partial[slab.slot_bytes]
        del self._slabs[slab.start]
        del self._slab_starts[bisect.bisect_left(self._slab_starts, slab.start)]
        self._give_range(slab.start, slab.end - slab.start)

    def _take_range(self, start: int, length: int) -> None:
        n = self._free.pop(start)
        if n > length:
            self._free[start + length] = n - length
            self._free_starts[bisect.bisect_left(self._free_starts, start)] = start + length
        else:
            del self._free_starts[bisect.bisect_left(self._free_starts, start)]

    def _give_range(self, start: int, length: int) -> None:
        i = bisect.bisect_left(self._free_starts, start)
        # merge with the following range
        if i < len(self._free_starts) and self._free_starts[i] == start + length:
            length += self._free.pop(self._free_starts[i])
            del self._free_starts[i]
        # merge with the preceding range
        if i > 0:
            prev = self._free_starts[i - 1]
            if prev + self._free[prev] == start:
                self._free[prev] += length
                return
        self._free[start] = length
        self._free_starts.insert(i, start)

    # -- invariants ----------------------------------------------------------------------------
    def check(self) -> None:
        """Raise AssertionError if an invariant of the module docstring is broken (tests)."""
        spans = [(s, s + n, "free") for s, n in self._free.items()]
        spans += [(s.start, s.end, "slab") for s in self._slabs.values()]
        spans.sort()
        pos = 0
        for a, b, _ in spans:
            assert a == pos and b > a, f"gap or overlap at {pos}: {spans}"
            pos = b
        assert pos == self.size, "ranges do not cover the region"
        assert self._free_starts == sorted(self._free), "free index out of order"
        assert self._slab_starts == sorted(self._slabs), "slab index out of order"
        assert all(self._partial.values()), "empty partial list kept"
        starts = self._free_starts
        for a, b in zip(starts, starts[1:]):
            assert a + self._free[a] < b, "adjacent free ranges not coalesced"
        used = 0
        for s in self._slabs.values():
            free = set(s.freed) | set(range(s.fresh, s.nslots))
            assert len(free) == len(s.freed) + s.nslots - s.fresh, "slot freed twice"
            assert s.used == s.nslots - len(free) and s.used > 0, "slab count wrong or empty slab kept"
            listed = s.start in self._partial.get(s.slot_bytes, {})
            assert listed == (not s.full()), "partial list out of date"
            used += s.used * s.slot_bytes
        assert used == self.bytes_used, "bytes_used out of date"
