"""`stainctl cluster slurm`: start Dask workers as Slurm jobs and print the scheduler address
for --scheduler (or STAINCTL_SCHEDULER). The scheduler lives in this process: leave it running
while the batches run; Ctrl-C stops it and cancels the jobs."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(help="Start Dask workers for --scheduler: on Slurm.", no_args_is_help=True)


@app.command("slurm")
def slurm(
    jobs: Annotated[int, typer.Option(help="Slurm jobs to submit (workers scale with them).")]
    = 1,
    gpus_per_job: Annotated[int, typer.Option(
        help="GPUs per job; one single-thread worker per GPU, each seeing only its own.")] = 1,
    partition: Annotated[str | None, typer.Option(help="Slurm partition (-p).")] = None,
    time: Annotated[str, typer.Option(help="Wall time per job, HH:MM.")] = "04:00",
    cores: Annotated[int, typer.Option(help="CPU cores per job.")] = 8,
    memory: Annotated[str, typer.Option(help="Memory per job, e.g. 64GB.")] = "64GB",
    account: Annotated[str | None, typer.Option(help="Slurm account (-A).")] = None,
    host: Annotated[str | None, typer.Option(
        help="Address the scheduler listens on, reachable from the compute nodes.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the job script and exit (no Slurm needed).")] = False,
) -> None:
    """Submit Slurm jobs running Dask workers; print the scheduler address and wait."""
    from stainctl.cluster.slurm import SlurmOptions, job_script, slurm_cluster
    from stainctl.errors import UsageError

    try:
        options = SlurmOptions(jobs=jobs, gpus_per_job=gpus_per_job, partition=partition,
                               time=time, cores=cores, memory=memory, account=account, host=host)
        if dry_run:
            typer.echo(job_script(options), nl=False)
            return
        cluster = slurm_cluster(options)
    except UsageError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    with cluster:
        cluster.scale(jobs=options.jobs)
        typer.echo(f"scheduler: {cluster.scheduler_address}")
        typer.echo(f"use it: export STAINCTL_SCHEDULER={cluster.scheduler_address}  (or "
                   "--scheduler); Ctrl-C stops the scheduler and cancels the jobs", err=True)
        try:
            import time as clock

            while True:
                clock.sleep(3600)
        except KeyboardInterrupt:
            typer.echo("stopping the workers", err=True)
