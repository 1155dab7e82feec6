"""CPU workers pinned to their own cores (cluster/pin.py): the cores are shared out evenly, every
thread of a worker is pinned (reader and writer threads too), and `--devices cpu,cpu` starts
workers that run on disjoint cores when the machine has one core per worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from stainctl.cluster.pin import core_sets, parse_cores


def test_cores_are_shared_out_evenly_and_disjoint():
    assert core_sets(2, [0, 1]) == [(0,), (1,)]
    assert core_sets(1, [3, 1]) == [(1, 3)]
    assert core_sets(3, range(8)) == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert core_sets(2, [4, 6, 5, 7]) == [(4, 5), (6, 7)]
    assert core_sets(3, [0, 1]) is None  # not one core each: not pinned
    with pytest.raises(ValueError):
        core_sets(0, [0])


def test_core_list_is_checked():
    assert parse_cores("0, 2,3") == frozenset({0, 2, 3})
    for bad in ("", "a", "-1", "1;2"):
        with pytest.raises(ValueError, match="STAINCTL_CPUS"):
            parse_cores(bad)


def test_cpu_workers_get_their_cores_and_torch_threads(monkeypatch):
    from stainctl.cluster import local, pin

    monkeypatch.setattr(pin, "available_cores", lambda: (0, 1, 2, 3))
    opts = local.cpu_worker_options(2)
    assert [o["env"]["STAINCTL_CPUS"] for o in opts] == ["0,1", "2,3"]
    assert [o["env"]["OMP_NUM_THREADS"] for o in opts] == ["2", "2"]
    assert all(o["preload"] == [pin.PRELOAD] for o in opts)
    few = local.cpu_worker_options(6)  # more workers than cores: shared, not pinned
    assert all("STAINCTL_CPUS" not in o["env"] and "preload" not in o for o in few)
    assert [o["env"]["OMP_NUM_THREADS"] for o in few] == ["1"] * 6


def test_every_thread_of_the_process_is_pinned_even_those_already_running():
    core = min(os.sched_getaffinity(0))
    code = f"""
import json, os, threading
from stainctl.cluster.pin import pin_process
stop = threading.Event()
early = threading.Thread(target=stop.wait); early.start()
assert pin_process([{core}])
late = threading.Thread(target=stop.wait); late.start()
seen = {{t: sorted(os.sched_getaffinity(int(t))) for t in os.listdir('/proc/self/task')}}
stop.set(); early.join(); late.join()
print(json.dumps(seen))
"""
    # A child process: pinning this test process would slow the rest of the suite.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    seen = json.loads(out.stdout)
    assert len(seen) >= 3 and all(v == [core] for v in seen.values()), seen


@pytest.mark.slow
def test_devices_cpu_cpu_workers_run_on_their_own_cores():
    from stainctl.cluster.pin import available_cores

    code = """
import json, os
from stainctl.cluster.connect import connect
from stainctl.cluster.local import Devices, local_cluster
with local_cluster(Devices(names=("cpu", "cpu"))) as address, connect(address) as client:
    client.wait_for_workers(2)
    seen = sorted(sorted(v) for v in client.run(lambda: os.sched_getaffinity(0)).values())
    threads = sorted(client.run(lambda: os.environ["OMP_NUM_THREADS"]).values())
print(json.dumps([seen, threads]))
"""
    # A child process: the cluster's Nanny changes process-wide Dask state, which must not
    # reach the other tests of this session.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    seen, threads = json.loads(out.stdout.strip().splitlines()[-1])
    cores = list(available_cores())
    expected = core_sets(2, cores)
    if expected is None:  # a one-core machine: both workers share it
        assert seen == [cores, cores]
    else:
        assert seen == sorted(list(c) for c in expected)
        assert threads == sorted(str(len(c)) for c in expected)
