"""A local Dask cluster of one worker per device (`--devices cuda:0,cuda:1`, `all`, `cpu,cpu`).

Each worker has one thread and sees one GPU: dask-cuda's LocalCUDACluster pins them when it is
installed (the `cuda` extra); otherwise a `distributed` cluster of one Nanny per device, each
started with CUDA_VISIBLE_DEVICES set to its GPU, so in every worker the device is `cuda`.
CPU workers share the machine's cores: each is pinned to its own (cluster/pin.py) when there are
enough, so one worker's reader and writer threads do not run on another worker's core.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from stainctl.errors import UsageError


@dataclass(frozen=True, kw_only=True)
class Devices:
    """The devices to start one worker each on: all `cpu`, or distinct `cuda:N`."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.names:
            raise UsageError("--devices needs at least one device (cuda:0,cuda:1, all, cpu,cpu)")
        kinds = {n.split(":")[0] for n in self.names}
        if not kinds <= {"cpu", "cuda"} or len(kinds) > 1:
            raise UsageError(f"--devices takes all cpu or all cuda:N devices, got "
                             f"{','.join(self.names)}")
        gpus = [n for n in self.names if n != "cpu"]
        if len(set(gpus)) != len(gpus):
            raise UsageError(f"--devices names a GPU twice: {','.join(self.names)}")

    def __str__(self) -> str:
        """As --devices takes them (how a run's parameters record them)."""
        return ",".join(self.names)

    @property
    def gpus(self) -> tuple[int, ...]:
        return tuple(int(n.split(":")[1]) for n in self.names if n != "cpu")

    @property
    def worker_device(self) -> str:
        """The device as each worker sees it (one GPU visible, or the CPU)."""
        return "cuda" if self.gpus else "cpu"

    @classmethod
    def parse(cls, text: str) -> Devices:
        text = text.strip()
        if text == "all":
            count = _gpu_count()
            if not count:
                raise UsageError("--devices all: no GPU is visible on this machine; use "
                                 "--devices cpu,cpu for CPU workers")
            return cls(names=tuple(f"cuda:{i}" for i in range(count)))
        names = []
        for part in (p.strip() for p in text.split(",")):
            if part == "cuda":
                part = "cuda:0"
            head, _, index = part.partition(":")
            if part != "cpu" and not (head == "cuda" and index.isdigit()):
                raise UsageError(f"--devices: {part!r} is not cpu or cuda:N (e.g. "
                                 "--devices cuda:0,cuda:1, --devices all, --devices cpu,cpu)")
            names.append(part if part == "cpu" else f"cuda:{int(index)}")
        return cls(names=tuple(names))


def _gpu_count() -> int:
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


@contextmanager
def local_cluster(devices: Devices) -> Iterator[str]:
    """Start the workers, yield the scheduler address, stop them on leaving."""
    import dask

    # distributed's Nanny puts MALLOC_TRIM_THRESHOLD_ (3x slower here) and one-thread BLAS
    # settings into every worker, and leaks them into this process (docs/NOTES.md): each
    # worker gets its own environment below instead.
    with dask.config.set({"distributed.nanny.pre-spawn-environ": {}}):
        cluster = _cuda_cluster(devices) if devices.gpus else None
        if cluster is None:
            cluster = _nanny_cluster(devices)
        with cluster:
            yield str(cluster.scheduler_address)


def cpu_worker_options(count: int) -> list[dict[str, Any]]:
    """Nanny options for `count` CPU workers sharing this machine's cores: each pinned to its
    own cores (its reader and writer threads too) when there is at least one core per worker,
    torch on that many threads; otherwise unpinned, the cores shared out as threads."""
    from stainctl.cluster.pin import available_cores, core_sets, worker_options

    if count < 1:
        return []
    cores = available_cores()
    sets = core_sets(count, cores)
    if sets is not None:
        return [worker_options(s) for s in sets]
    threads = str(max(1, len(cores) // count))
    return [{"env": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}}
            for _ in range(count)]


def _cuda_cluster(devices: Devices) -> Any:
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        return None
    return LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(str(g) for g in devices.gpus),
                            threads_per_worker=1, dashboard_address=None)


def _nanny_cluster(devices: Devices) -> Any:
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {}
    cores = iter(cpu_worker_options(sum(n == "cpu" for n in devices.names)))
    for i, name in enumerate(devices.names):
        options: dict[str, Any] = next(cores) if name == "cpu" else {"env": {}}
        options["env"]["CUDA_VISIBLE_DEVICES"] = name.split(":")[1] if name != "cpu" else ""
        workers[f"{name}-{i}"] = {"cls": Nanny, "options": {
            "nthreads": 1, "silence_logs": logging.ERROR, **options}}
    scheduler = {"cls": Scheduler, "options": {"dashboard": False, "dashboard_address": ":0"}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.ERROR)
