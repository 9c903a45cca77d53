"""The machine's memory, as the generator's worker needs it (Linux; elsewhere these do little).

- `default_cache_bytes()`: the KV cache budget when DIALOGBOT_KV_CACHE_MB is not set, sized
  from the memory there is once the model is loaded (cgroup limits count).
- `drop_file_pages(tensor)`: a weight loaded by `from_pretrained` is a view of the memory-
  mapped checkpoint; once it has been converted (packed, quantized, cast), its file pages
  still count as the process's resident memory until the whole file is unmapped. This tells
  the kernel to drop them (`madvise(MADV_DONTNEED)`: for a file mapping that only discards
  the process's copy of the pages, the file is untouched), so loading, converting and
  releasing one layer at a time keeps a single copy of the weights in memory.
- `release_freed_memory()`: returns freed heap memory to the operating system (glibc
  `malloc_trim`) after loading.
- `no_huge_pages(tensor)`: a key/value row buffer is allocated for the model's whole window
  and only the pages its tokens are written to become resident. Where transparent huge pages
  are "always" on, touching one byte of a 2 MiB region makes all of it resident, so every
  cached conversation would cost its full window; `madvise(MADV_NOHUGEPAGE)` keeps such
  buffers at 4 KiB pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
from bisect import bisect_right
from pathlib import Path

log = logging.getLogger(__name__)

MADV_DONTNEED = 4
MADV_NOHUGEPAGE = 15
HUGE_PAGE = 2 * 2**20
MIN_CACHE_BYTES = 64 * 2**20
UNKNOWN_CACHE_BYTES = 512 * 2**20


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            parts = value.split()
            if parts:
                out[name] = int(parts[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _cgroup_room() -> int | None:
    """Bytes this process's cgroup may still use (None: no limit or unknown)."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            top = Path(limit).read_text().strip()
            used = int(Path(usage).read_text().strip())
        except (OSError, ValueError):
            continue
        if top == "max" or int(top) >= 2**60:
            return None
        return max(0, int(top) - used)
    return None


def memory_figures() -> tuple[int | None, int | None]:
    """(total, available) bytes, the cgroup limit counted; None where unknown."""
    info = _meminfo()
    total, available = info.get("MemTotal"), info.get("MemAvailable")
    room = _cgroup_room()
    if room is not None:
        available = room if available is None else min(available, room)
    return total, available


def default_cache_bytes() -> int:
    """A quarter of the machine's memory or half of what is available now, whichever is
    less, at least 64 MiB (512 MiB when the figures cannot be read)."""
    total, available = memory_figures()
    if total is None or available is None:
        return UNKNOWN_CACHE_BYTES
    return max(MIN_CACHE_BYTES, min(total // 4, available // 2))


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


_LIBC = _libc()


def release_freed_memory() -> None:
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


class FileMappings:
    """The process's file-backed, non-executable memory mappings (from /proc/self/maps)."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        try:
            lines = Path("/proc/self/maps").read_text().splitlines()
        except OSError:
            return
        for line in lines:
            parts = line.split()
            if len(parts) < 6 or not parts[5].startswith("/") or "x" in parts[1]:
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            self.ranges.append((start, end))
        self.ranges.sort()
        self._starts = [start for start, _ in self.ranges]

    def contains(self, start: int, end: int) -> bool:
        i = bisect_right(self._starts, start) - 1
        return i >= 0 and self.ranges[i][1] >= end


def _advise(start: int, end: int, advice: int) -> int:
    """madvise the whole pages inside [start, end); returns the bytes advised (0 on failure)."""
    madvise = getattr(_LIBC, "madvise", None)
    if madvise is None:
        return 0
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last <= first:
        return 0
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if madvise(first, last - first, advice) != 0:
        log.debug("madvise failed: %s", os.strerror(ctypes.get_errno()))
        return 0
    return last - first


def no_huge_pages(tensor) -> int:
    """Keep `tensor`'s memory (a CPU buffer of at least a huge page) at small pages; returns
    the bytes advised."""
    if tensor.device.type != "cpu":
        return 0
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes < HUGE_PAGE:
        return 0
    start = tensor.data_ptr()
    return _advise(start, start + nbytes, MADV_NOHUGEPAGE)


def drop_file_pages(tensor, mappings: FileMappings | None) -> int:
    """Drop the resident pages of `tensor`'s memory when it lies in a file mapping (the
    checkpoint); returns the bytes advised. Anonymous memory is never touched."""
    if mappings is None or tensor is None or tensor.device.type != "cpu":
        return 0
    start = tensor.data_ptr()  # a contiguous tensor or a transpose of one: [start, end)
    end = start + tensor.numel() * tensor.element_size()
    if not mappings.contains(start, end):
        return 0
    return _advise(start, end, MADV_DONTNEED)
