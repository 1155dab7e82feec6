"""`python -m stainctl.cluster.gpu_worker SCHEDULER --gpus G [dask worker options]`: what a Slurm
job runs. One Dask worker (with a nanny, one thread) per GPU of the job, each started with
CUDA_VISIBLE_DEVICES set to that GPU alone; with --gpus 0, one CPU worker. Stops when they do."""

from __future__ import annotations

import os
import subprocess
import sys


def split(argv: list[str]) -> tuple[int, list[str]]:
    """(--gpus, the other arguments)."""
    gpus, rest = 0, []
    it = iter(argv)
    for arg in it:
        if arg == "--gpus":
            gpus = int(next(it))
        elif arg.startswith("--gpus="):
            gpus = int(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return gpus, rest


def commands(argv: list[str], visible: str | None) -> list[tuple[list[str], dict[str, str]]]:
    """The worker command lines and the environment change of each."""
    gpus, rest = split(argv)
    base = [sys.executable, "-m", "distributed.cli.dask_worker", *rest, "--nanny"]
    if gpus < 1:
        return [(base, {})]
    ids = [v for v in (visible or "").split(",") if v.strip()] or [str(i) for i in range(gpus)]
    ids = ids[:gpus]
    out = []
    for i, gpu in enumerate(ids):
        cmd = _set(base, "--nthreads", "1")  # one engine per GPU, fed by its own threads
        if "--memory-limit" in cmd:  # the job's memory shared out
            from dask.utils import format_bytes, parse_bytes

            limit = cmd[cmd.index("--memory-limit") + 1]
            cmd = _set(cmd, "--memory-limit",
                       format_bytes(parse_bytes(limit) // len(ids)).replace(" ", ""))
        if "--name" in cmd:  # worker names must differ
            k = cmd.index("--name") + 1
            cmd[k] = f"{cmd[k]}-gpu{i}"
        out.append((cmd, {"CUDA_VISIBLE_DEVICES": gpu}))
    return out


def _set(cmd: list[str], option: str, value: str) -> list[str]:
    cmd = list(cmd)
    if option in cmd:
        cmd[cmd.index(option) + 1] = value
    else:
        cmd[-1:-1] = [option, value]
    return cmd


def main() -> int:
    procs = [subprocess.Popen(cmd, env={**os.environ, **env})
             for cmd, env in commands(sys.argv[1:], os.environ.get("CUDA_VISIBLE_DEVICES"))]
    return max(p.wait() for p in procs)


if __name__ == "__main__":
    sys.exit(main())
