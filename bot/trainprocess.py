"""The processes of a `dialogbot train` run: which rank this is, how many there are, a barrier,
and stopping on request (Ctrl-C, SIGTERM or a test) at the same step in every process.

torch is imported inside the functions; with one process nothing here touches torch.distributed
beyond asking whether it is initialised.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Say = Callable[[str], None]


class StopRequest:
    """Set by Ctrl-C / SIGTERM (or a test): save a checkpoint and stop after this step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def agreed(self) -> bool:
        """Whether any process asked to stop (every data-parallel rank stops at one step)."""
        import torch.distributed as dist

        if not in_process_group():
            return self.is_set()
        flag = _flag_tensor([1 if self.is_set() else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def stop_on_signals(stop: StopRequest, say: Say) -> Iterator[None]:
    """SIGINT and SIGTERM set `stop`; a second SIGINT interrupts at once. (A SIGTERM never
    does: torchrun sends one to every worker after the terminal's Ctrl-C reached them.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set():
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        stop.set()
        say("stopping: saving a checkpoint after this step (Ctrl-C again to quit at once)")

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _flag_tensor(values: list[int]):
    import torch
    import torch.distributed as dist

    device = "cpu"
    if dist.get_backend() == "nccl":
        device = f"cuda:{torch.cuda.current_device()}"
    return torch.tensor(values, device=device)


def in_process_group() -> bool:
    """Whether this process is one rank of an initialised data-parallel group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    import torch.distributed as dist

    if in_process_group():
        dist.barrier()


def leave_process_group(*, wait: bool) -> None:
    """Leave the data-parallel group before the interpreter exits. A process that exits in it
    leaves gloo's worker threads (and the tensors they hold) to be torn down with Python, which
    now and then aborts the process: SIGABRT, "terminate called without an active exception"
    (seen once in CI on a 2-process run that had written its model). With `wait`, every rank
    first waits for the others (rank 0 writes the model while the others are done); after an
    error nobody waits, since a failed rank may never get there. No-op with one process."""
    import torch.distributed as dist

    if not in_process_group():
        return
    if wait:
        barrier()
    dist.destroy_process_group()
