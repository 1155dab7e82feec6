"""Dask workers on Slurm through dask-jobqueue's SLURMCluster (the `cluster` extra).

Each job asks for G GPUs and runs one single-thread worker per GPU, each seeing only its own GPU
(`gpu_worker`), so the engine on every worker runs on `cuda`. The scheduler runs in the process
that started the cluster (`stainctl cluster slurm`), which prints its address for --scheduler.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from stainctl.errors import UsageError

WORKER_COMMAND = "stainctl.cluster.gpu_worker"


@dataclass(frozen=True, kw_only=True)
class SlurmOptions:
    jobs: int = 1
    gpus_per_job: int = 1
    partition: str | None = None
    time: str = "04:00"  # HH:MM wall time per job
    cores: int = 8  # CPU cores per job (tile reading and writing)
    memory: str = "64GB"  # per job
    account: str | None = None
    host: str | None = None  # the scheduler's listening address (default: dask-jobqueue's)
    python: str | None = None  # the Python on the compute nodes (default: this one)

    def __post_init__(self) -> None:
        if self.jobs < 1 or self.gpus_per_job < 0 or self.cores < 1:
            raise UsageError("--jobs and --cores must be at least 1, --gpus-per-job at least 0")
        if not re.fullmatch(r"\d+:\d\d(:\d\d)?", self.time):
            raise UsageError(f"--time must be HH:MM, got {self.time!r}")

    @property
    def walltime(self) -> str:
        return self.time if self.time.count(":") == 2 else f"{self.time}:00"


def slurm_cluster(options: SlurmOptions) -> Any:
    """A SLURMCluster (not yet scaled) for `options`."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise UsageError("`stainctl cluster slurm` needs dask-jobqueue: pip install "
                         "'stainctl[cluster]'") from None
    g = options.gpus_per_job
    extra = [f"--gres=gpu:{g}"] if g else []
    kwargs: dict[str, Any] = {}
    if options.python:
        kwargs["python"] = options.python
    if options.host:
        kwargs["scheduler_options"] = {"host": options.host}
    return SLURMCluster(
        queue=options.partition, account=options.account, walltime=options.walltime,
        cores=options.cores, memory=options.memory, processes=1,
        job_extra_directives=extra, worker_command=WORKER_COMMAND,
        worker_extra_args=["--gpus", str(g)], **kwargs)


def job_script(options: SlurmOptions) -> str:
    """The batch script each job runs (no Slurm needed to see it)."""
    cluster = slurm_cluster(options)
    try:
        return str(cluster.job_script())
    finally:
        cluster.close()
