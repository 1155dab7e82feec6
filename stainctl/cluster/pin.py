"""CPU workers pinned to their own cores, so two workers do not fight over one core.

A one-thread CPU worker still runs reader threads (JPEG decode) and writer threads (tile
compression) beside the model's thread; unpinned, they spill onto the other workers' cores.
`core_sets` shares this process's cores out between the workers; each worker process is started
with `STAINCTL_CPUS` set to its cores and this module as a Dask preload, whose `dask_setup` pins
every thread of the worker (threads started later inherit the affinity).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Collection
from typing import Any

ENV = "STAINCTL_CPUS"
PRELOAD = "stainctl.cluster.pin"
log = logging.getLogger(__name__)


def available_cores() -> tuple[int, ...]:
    """The cores this process may run on (all of them where affinity is not supported)."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def io_threads(cap: int = 8) -> int:
    """Threads for a pool that reads or writes tiles: the cores this process may use, at least
    2 (reads and writes wait on the disk too) and at most `cap`."""
    return max(2, min(cap, len(available_cores())))


def core_sets(workers: int, cores: Collection[int]) -> list[tuple[int, ...]] | None:
    """`cores` cut into `workers` disjoint runs as even as they can be (the first ones get the
    spare cores), or None when there are fewer cores than workers (they cannot each have one)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    ordered = sorted(set(cores))
    if len(ordered) < workers:
        return None
    size, spare = divmod(len(ordered), workers)
    out, start = [], 0
    for i in range(workers):
        end = start + size + (i < spare)
        out.append(tuple(ordered[start:end]))
        start = end
    return out


def format_cores(cores: Collection[int]) -> str:
    return ",".join(str(c) for c in sorted(cores))


def parse_cores(text: str) -> frozenset[int]:
    """`STAINCTL_CPUS`'s value: core numbers separated by commas."""
    try:
        cores = frozenset(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"{ENV}={text!r} is not a list of core numbers (e.g. 0,1)") from None
    if not cores or min(cores) < 0:
        raise ValueError(f"{ENV}={text!r} is not a list of core numbers (e.g. 0,1)")
    return cores


def pin_process(cores: Collection[int]) -> bool:
    """Pin every thread of this process to `cores` (Linux's affinity is per thread, so the
    threads already running are pinned one by one). False where affinity is not supported."""
    if not hasattr(os, "sched_setaffinity"):
        return False
    wanted = set(cores)
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        threads = []
    for tid in threads:
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, wanted)
    os.sched_setaffinity(0, wanted)
    return True


def worker_options(cores: Collection[int]) -> dict[str, Any]:
    """The Nanny options that start a CPU worker pinned to `cores`, torch on that many threads."""
    n = str(len(cores))
    return {"env": {ENV: format_cores(cores), "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n},
            "preload": [PRELOAD]}


def dask_setup(worker: Any) -> None:
    """Dask preload hook, run in the worker process as it starts."""
    text = os.environ.get(ENV, "")
    if text and pin_process(parse_cores(text)):
        log.info("worker %s pinned to cores %s", getattr(worker, "name", "?"), text)
