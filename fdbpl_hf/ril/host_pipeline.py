"""The host side of table and feature-cache builds, kept ahead of the accelerator.

A build's device work (the teacher's or the student's forward, rendering on the device) is fast;
its host work (JPEG decoding, drawing boxes, cropping on the CPU, copying) is per image and per
region. Run in the order the device needs it, the host work adds to the device's time: table
builds on an H200 ran at 0.21x the teacher's bare throughput (issue 20). Here that work runs in a
pool of threads (PIL's decoder and torch's CPU kernels release the GIL), a bounded number of items
ahead of the device and handed over in order; small host arrays reach the device through pinned
memory without a stream sync; and the device's results come back through non-blocking copies
that are read one chunk later, so the host never waits for the chunk it has just queued.

Nothing here changes what is computed: the same images, regions, batches and kernels, in the
same order, as the serial builder (tests compare the tables and caches column by column).
"""

from __future__ import annotations

import collections
import os
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

# threads beyond this decode faster than any one device consumes (and each holds a decoded image)
MAX_HOST_THREADS = 32


def usable_cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_host_threads(device: torch.device) -> int:
    """Host threads of a build whose model runs on `device`: 1 on the CPU (the model's own threads
    use the cores; one more thread overlaps decoding with it), else every usable CPU (at most
    `MAX_HOST_THREADS`): the host must decode and crop as fast as the accelerator consumes."""
    if torch.device(device).type == "cpu":
        return 1
    return max(1, min(MAX_HOST_THREADS, usable_cpu_count()))


def check_host_threads(value: Any, name: str = "host_threads") -> Optional[int]:
    """`value` as a positive int (None stays None: the default); anything else raises naming `name`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer (or None for the default), got {value!r}")
    return int(value)


class HostPool:
    """A pool of host threads for one build (a context manager).

    With `single_thread_ops` (the model runs on the CPU) each worker runs torch ops on one
    intra-op thread: the crops are small ops whose OpenMP barriers stall badly beside the model's
    own pool. `torch.set_num_threads` in a thread changes the default of threads started later,
    so the caller's count is restored on exit."""

    def __init__(self, threads: int, single_thread_ops: bool):
        self.threads, self.single_thread_ops = threads, single_thread_ops
        self.executor: Optional[ThreadPoolExecutor] = None

    def __enter__(self) -> "HostPool":
        self.caller_threads = torch.get_num_threads()
        self.restore = self.single_thread_ops and self.caller_threads > 1
        init = (lambda: torch.set_num_threads(1)) if self.restore else None
        self.executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="fdbpl-host", initializer=init)
        return self

    def submit(self, fn: Callable, *args) -> Future:
        return self.executor.submit(fn, *args)

    def __exit__(self, *exc) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self.restore:
            torch.set_num_threads(self.caller_threads)


def ordered(pool: HostPool, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """`fn(item)` for every item, computed by `pool` up to `ahead` items ahead of the consumer and
    yielded in the items' order; an exception is raised when its item is reached. Items are
    pulled from `items` in the consumer's thread."""
    it = iter(items)
    futures = collections.deque(pool.submit(fn, item) for item in islice(it, max(1, ahead)))
    try:
        while futures:
            result = futures.popleft().result()
            for item in islice(it, 1):
                futures.append(pool.submit(fn, item))
            yield result
    finally:  # a consumer that stops early (an error downstream) leaves no work queued
        for future in futures:
            future.cancel()


def source_cells(source, column: str, rows: Sequence[int], block: int = 64) -> Iterator[tuple[int, Any]]:
    """`(row, cell)` of the undecoded `column` of `source` (a `datasets.Dataset`), read `block` rows
    at a time; `rows` are positions in `source`."""
    for start in range(0, len(rows), block):
        part = list(rows[start: start + block])
        yield from zip(part, source[part][column])


def to_device(values, device: torch.device) -> torch.Tensor:
    """A host array or tensor on `device` without a stream sync: on CUDA through pinned memory and a
    non-blocking copy (a plain host-to-device copy waits for all queued device work); elsewhere a
    plain copy. The caching host allocator keeps the pinned block until the copy is done."""
    tensor = torch.as_tensor(values)
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    if tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def pinned_empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host tensor to fill and then copy to `device`: pinned when `device` is CUDA."""
    return torch.empty(shape, dtype=dtype, pin_memory=torch.device(device).type == "cuda")


class DeviceResults:
    """Device tensors on their way to the host: copied without blocking now, read with `numpy()`
    later (after the next chunk has been queued), so the host never idles the device while it waits."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        first = next(iter(tensors.values()))
        self.event = None
        if first.device.type == "cuda":
            self.host = {k: v.to("cpu", non_blocking=True) for k, v in tensors.items()}  # pinned destinations
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = {k: v.cpu() for k, v in tensors.items()}

    def numpy(self) -> dict[str, np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return {k: v.numpy() for k, v in self.host.items()}


def lagged(items: Iterable, collect: Callable, lag: int = 1) -> Iterator:
    """`collect(item)` for every item, each called once `lag` later items have been produced (and at
    the end for the last ones): the host reads chunk k's results after queueing chunk k + 1."""
    waiting = collections.deque()
    for item in items:
        waiting.append(item)
        if len(waiting) > lag:
            yield collect(waiting.popleft())
    while waiting:
        yield collect(waiting.popleft())
