"""Where work runs: in this process, on an existing Dask scheduler (`--scheduler`), on a local
cluster of one worker per device (`--devices`), or on Slurm jobs (`stainctl cluster slurm`).

Steps hand slide or shard tasks to a `distributed.Client` from `connect()` and take the results
back; workers never write the manifest. Dask is imported only when a cluster is used.
"""
