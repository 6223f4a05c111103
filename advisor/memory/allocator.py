"""What `torch.cuda.max_memory_reserved()` will say: a replay of a training step's allocations through a model of
PyTorch's CUDA caching allocator.

The live-bytes counter gives the tensor bytes of a run exactly (simulated == real to the byte); a GPU holds more,
because the caching allocator (c10/cuda/CUDACachingAllocator.cpp) rounds requests, carves them from segments of
fixed sizes and keeps freed blocks cached for reuse. How much more depends on the order and sizes of the
allocations, not on their total: 2-37% on the calibration's small probes, 1-4% for LoRA at 7B. So instead of a
fraction, the trace the counter records (`LiveBytes(record_allocations=True)`) is replayed through the allocator's
rules:

* requests are rounded up to 512 B; <= 1 MiB come from the small pool (2 MiB segments), larger ones from the large
  pool: a new segment is 20 MiB for requests below 10 MiB, else the request rounded up to 2 MiB;
* best fit: the smallest cached free block of the pool that is large enough (lowest address on ties);
* a block is split when the remainder is > 1 MiB (large pool) or >= 512 B (small pool);
* freed blocks merge with free neighbours of their segment; segments are released only when a new one would not fit
  the device (then every fully free segment is released, as the allocator does before reporting out of memory);
* the device's library workspaces (cuBLAS and cuBLASLt keep one each, allocated through the allocator on the first
  matmul and held) are placed where the trace is marked "steps".

Checked against an H100 (torch 2.11, `bench/allocator_replay.py --h100`): the calibration's probes whose every
allocation is a tensor (all methods but BitFit and IA³, whose CUDA reductions allocate staging buffers, and GaLore,
whose cuSOLVER workspace the counter cannot see) and the Llama-2-7B LoRA/QLoRA runs of `bench/gpu_realsize.py`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

MIB = 1024 * 1024
MIN_BLOCK = 512
SMALL_SIZE = 1 * MIB  # largest request served from the small pool
SMALL_BUFFER = 2 * MIB  # small-pool segment
LARGE_BUFFER = 20 * MIB  # large-pool segment for requests below MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 * MIB
ROUND_LARGE = 2 * MIB


def round_size(n: int) -> int:
    return MIN_BLOCK if n < MIN_BLOCK else MIN_BLOCK * ((n + MIN_BLOCK - 1) // MIN_BLOCK)


def segment_size(n: int) -> int:
    if n <= SMALL_SIZE:
        return SMALL_BUFFER
    if n < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * ((n + ROUND_LARGE - 1) // ROUND_LARGE)


class CachingAllocator:
    """One stream, default settings (no expandable segments, no max_split_size); sizes in bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.next_addr = 0
        self.free = {"small": [], "large": []}  # per pool: sorted (size, addr) of free blocks
        self.blocks: dict[int, list] = {}  # addr -> [size, segment, allocated, pool]
        self.seg_blocks: dict[int, list[int]] = {}  # segment -> sorted block addresses
        self.segments: dict[int, int] = {}  # segment -> its size
        self.reserved = self.allocated = 0
        self.peak_reserved = self.peak_allocated = 0
        self.releases = 0

    def _new_segment(self, size: int, pool: str) -> int:
        if self.reserved + size > self.capacity:
            self.release_cached()
            if self.reserved + size > self.capacity:
                raise MemoryError(f"out of memory: {self.reserved + size} bytes reserved > {self.capacity}")
        addr = self.next_addr
        self.next_addr += size + ROUND_LARGE  # segments are never adjacent
        self.segments[addr] = size
        self.blocks[addr] = [size, addr, False, pool]
        self.seg_blocks[addr] = [addr]
        self.reserved += size
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return addr

    def release_cached(self) -> None:
        """Release every fully free segment (`torch.cuda.empty_cache()`)."""
        for seg, size in list(self.segments.items()):
            addrs = self.seg_blocks[seg]
            if len(addrs) == 1 and not self.blocks[addrs[0]][2]:
                blk = self.blocks.pop(addrs[0])
                pool = self.free[blk[3]]
                pool.pop(bisect.bisect_left(pool, (blk[0], addrs[0])))
                del self.seg_blocks[seg], self.segments[seg]
                self.reserved -= size
                self.releases += 1

    def malloc(self, nbytes: int) -> int:
        size = round_size(nbytes)
        pool_name = "small" if size <= SMALL_SIZE else "large"
        pool = self.free[pool_name]
        i = bisect.bisect_left(pool, (size, -1))
        if i < len(pool):
            bsize, addr = pool.pop(i)
        else:
            addr = self._new_segment(segment_size(size), pool_name)
            bsize = self.blocks[addr][0]
        blk = self.blocks[addr]
        remaining = bsize - size
        if remaining > SMALL_SIZE if pool_name == "large" else remaining >= MIN_BLOCK:
            blk[0] = size
            rest = addr + size
            self.blocks[rest] = [remaining, blk[1], False, pool_name]
            addrs = self.seg_blocks[blk[1]]
            addrs.insert(bisect.bisect_left(addrs, rest), rest)
            bisect.insort(pool, (remaining, rest))
        blk[2] = True
        self.allocated += blk[0]
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return addr

    def free_block(self, addr: int) -> None:
        blk = self.blocks[addr]
        blk[2] = False
        self.allocated -= blk[0]
        pool, seg = self.free[blk[3]], blk[1]
        addrs = self.seg_blocks[seg]
        j = bisect.bisect_left(addrs, addr)
        if j + 1 < len(addrs):  # merge with the next block
            nxt = addrs[j + 1]
            nb = self.blocks[nxt]
            if not nb[2]:
                pool.pop(bisect.bisect_left(pool, (nb[0], nxt)))
                blk[0] += nb[0]
                del self.blocks[nxt]
                addrs.pop(j + 1)
        if j > 0:  # then with the previous one
            prv = addrs[j - 1]
            pb = self.blocks[prv]
            if not pb[2]:
                pool.pop(bisect.bisect_left(pool, (pb[0], prv)))
                pb[0] += blk[0]
                del self.blocks[addr]
                addrs.pop(j)
                addr, blk = prv, pb
        bisect.insort(pool, (blk[0], addr))


@dataclass
class Replay:
    reserved_peak: int  # what torch.cuda.max_memory_reserved() reports
    allocated_peak: int  # torch.cuda.max_memory_allocated(): tensors rounded to 512 B + the workspaces
    segments: int  # segments held at the end
    events: int

    def to_dict(self) -> dict:
        return {"reserved_peak_bytes": self.reserved_peak, "allocated_peak_bytes": self.allocated_peak,
                "slack_bytes": self.reserved_peak - self.allocated_peak, "segments": self.segments,
                "events": self.events}


def replay(events: Iterable[tuple[str, object, int]], workspaces: Iterable[int] = (),
           capacity: int = 1 << 50, at: str = "steps") -> Replay:
    """Replay a `LiveBytes.allocation_events` trace; `workspaces` (bytes each) are allocated at the mark `at` (at
    the start when the trace has no such mark) and held."""
    events = list(events)
    al = CachingAllocator(capacity)
    addrs: dict[object, int] = {}
    pending = list(workspaces)
    if not any(kind == "mark" and label == at for kind, label, _ in events):
        for w in pending:
            al.malloc(int(w))
        pending = []
    for kind, ref, nbytes in events:
        if kind == "alloc":
            if nbytes > 0:  # an empty tensor's storage allocates nothing
                addrs[ref] = al.malloc(int(nbytes))
        elif kind == "free":
            addr = addrs.pop(ref, None)
            if addr is not None:
                al.free_block(addr)
        elif kind == "mark" and ref == at and pending:
            for w in pending:
                al.malloc(int(w))
            pending = []
    return Replay(al.peak_reserved, al.peak_allocated, len(al.segments), len(events))
