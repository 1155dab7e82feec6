"""Scale-out (issue 17): translate and the main job on a Dask cluster give the in-process result,
pixel for pixel, and survive a killed worker, an unreachable scheduler and a slide a worker
cannot see. Real slides; the cluster is a LocalCluster of two single-thread worker processes
started here (CPU), or the one `--devices cpu,cpu` starts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import CMU1, OME_HE, free_port

MARKER = "demo-ki67"
SLIDES = [CMU1, OME_HE]  # the CMU-1 sample and the OS-1 crop
STORE = Path("workspace") / "slides" / "CMU-1-Small-Region" / "translated" / f"{MARKER}.zarr"


def _env(tmp: Path) -> dict[str, str]:
    return {"STAINCTL_MODELS": str(tmp / "models"), "HF_HUB_OFFLINE": "1"}


def _level0(out: Path, slide: Path) -> np.ndarray:
    name = slide.name.split(".")[0]
    return tifffile.imread(out / f"{name}.{MARKER}.ome.tiff", level=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The main job on both slides, in this process: what every cluster run must equal."""
    from typer.testing import CliRunner

    from stainctl.cli.app import app

    tmp = tmp_path_factory.mktemp("ref")
    r = CliRunner().invoke(app, ["translate", *map(str, SLIDES), "--marker", MARKER,
                                 "-o", str(tmp / "out"), "-q"], env=_env(tmp),
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return tmp / "out"


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes of one thread each (work moves between processes, as on a real
    cluster)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=40) as c, \
            Client(c, set_as_default=False) as client:
        yield c, client


def _same_outputs(out: Path, reference: Path) -> None:
    for slide in SLIDES:
        a, b = _level0(out, slide), _level0(reference, slide)
        assert a.shape == b.shape
        assert np.array_equal(a, b), f"{slide.name}: cluster output differs from in-process"


def test_main_job_on_a_scheduler_equals_in_process(cli, tmp_path, reference, cluster, monkeypatch):
    from stainctl.steps.translate_work import cached_engine

    c, client = cluster
    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    # Small shards: CMU-1's tissue tiles go out in several tasks over both workers.
    r = cli("translate", *SLIDES, "--marker", MARKER, "-o", tmp_path / "out", "--scheduler",
            c.scheduler_address, "--shard-tiles", "8", "--json")
    assert r.exit_code == 0, r.output
    assert [s["state"] for s in json.loads(r.stdout)["slides"]] == ["done", "done"]
    _same_outputs(tmp_path / "out", reference)
    # Each worker loaded the engine once and kept it for its later tasks.
    info = client.run(lambda: cached_engine.cache_info()._asdict())
    assert all(i["misses"] <= 1 for i in info.values()), info
    assert sum(i["hits"] + i["misses"] for i in info.values()) >= 4  # glass tasks + shards


def test_the_driver_loads_no_model(cli, tmp_path, reference, cluster, monkeypatch):
    """On a cluster only the workers load the engine: the driver checks the weights are there
    and learns the engine's shape from a worker. A driver that loads it fails here."""
    import stainctl.steps.translate as translate
    from stainctl.errors import ModelError

    def no_load(*args, **kwargs):
        raise AssertionError("the driver loaded the model")

    c, _ = cluster
    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(translate, "load_engine", no_load)
    r = cli("translate", CMU1, "--marker", MARKER, "-o", tmp_path / "out", "--scheduler",
            c.scheduler_address, "--json")
    assert r.exit_code == 0, r.output
    assert np.array_equal(_level0(tmp_path / "out", CMU1), _level0(reference, CMU1))

    # Missing weights are still said by the driver, before any slide is planned.
    def missing(cards, directory, **kwargs):
        raise ModelError("demo-ki67: its weights are not installed")

    monkeypatch.setattr("stainctl.models.weights.check_installed", missing)
    from stainctl.workspace import Workspace

    ws = Workspace.open(tmp_path / "out" / "workspace")
    with pytest.raises(ModelError, match="not installed"):
        translate.translate_slides(ws, translate.TranslateOptions(
            marker=MARKER, scheduler=c.scheduler_address, force=True))


def test_devices_cpu_cpu_equals_in_process(cli, tmp_path, reference, monkeypatch):
    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    r = cli("translate", *SLIDES, "--marker", MARKER, "-o", tmp_path / "out", "--devices",
            "cpu,cpu", "--shard-tiles", "8", "-q")
    assert r.exit_code == 0, r.output
    _same_outputs(tmp_path / "out", reference)


def _chunks(store: Path) -> list[str]:
    base = store / "c"
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()) \
        if base.is_dir() else []


def _chunks_now(store: Path) -> list[str]:
    """The chunks while a run writes them: a folder renamed or a store removed (--force) under
    the walk is seen again on the next poll."""
    try:
        return _chunks(store)
    except FileNotFoundError:
        return []


def test_a_worker_killed_mid_slide_loses_nothing(tmp_path, reference, cluster):
    """SIGKILL the worker running a shard once part of it is written: the shard runs again
    elsewhere, keeps the written tiles, and the slide equals the undisturbed one."""
    c, client = cluster
    out = tmp_path / "out"
    shutil.copytree(reference / "workspace", out / "workspace")
    store = out / STORE
    expected = _chunks(reference / STORE)
    env = {**os.environ, **_env(tmp_path)}
    # --force redoes the slide from an empty store; 16-tile shards of two 8-tile batches.
    proc = subprocess.Popen(
        [sys.executable, "-m", "stainctl", "translate", "-w", str(out / "workspace"),
         "--marker", MARKER, "--scheduler", c.scheduler_address, "--shard-tiles", "16",
         "--batch-size", "8", "--force", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        if len(_chunks_now(store)) >= 8:  # the first batch of the big shard is written
            busy = [w for w, keys in client.processing().items()
                    if any("run_shard" in str(k) for k in keys)]
            if busy:
                pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                killed = busy[0]
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=300)
    assert killed is not None, "no shard was caught running"
    assert proc.returncode == 0, stderr
    slide = json.loads(stdout)["slides"][0]
    assert slide["state"] == "done", slide
    # The re-run shard wrote only what was missing: the killed one's first batch was kept.
    assert slide["details"]["translated_now"] <= len(expected) - 8, slide
    # Every tissue tile once, nothing else (no temporary chunk left behind).
    assert _chunks(store) == expected
    r = subprocess.run([sys.executable, "-m", "stainctl", "stitch", "-w",
                        str(out / "workspace"), "-o", str(out), "-q"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(_level0(out, CMU1), _level0(reference, CMU1))
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it, for the next tests


def test_a_slide_the_workers_cannot_see_fails_alone(cli, tmp_path, cluster, monkeypatch):
    c, _ = cluster
    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    slides = tmp_path / "slides"
    slides.mkdir()
    for s in SLIDES:
        shutil.copy(s, slides / s.name)
    ws = tmp_path / "ws"
    assert cli("tile", slides / CMU1.name, slides / OME_HE.name, "-w", ws, "--min-tissue",
               "0.05", "-q").exit_code == 0
    assert cli("filter", "-w", ws, "-q").exit_code == 0
    (slides / CMU1.name).rename(tmp_path / "moved.svs")  # gone from where the workers look
    r = cli("translate", "-w", ws, "--marker", MARKER, "--scheduler", c.scheduler_address,
            "--json")
    assert r.exit_code == 1, r.output
    states = {s["slide"]: s for s in json.loads(r.stdout)["slides"]}
    assert states["OS-1-detail_HE"]["state"] == "done"
    failed = states["CMU-1-Small-Region"]
    assert failed["state"] == "failed"
    assert "cannot see" in failed["message"] and str(slides / CMU1.name) in failed["message"]


@pytest.mark.parametrize("command", [
    ["translate", str(CMU1), "-o", "{tmp}/out"],
    ["filter", "-w", "{tmp}/ws"],
    ["normalize", str(CMU1), "--target", str(OME_HE), "-o", "{tmp}/out"],
])
def test_an_unreachable_scheduler_is_one_message_and_exit_2(cli, tmp_path, command, cli_ws):
    address = f"tcp://127.0.0.1:{free_port()}"
    args = [a.format(tmp=tmp_path) for a in command]
    # The variable a cron job sets, for every distributed command.
    r = cli(*args, env={"STAINCTL_SCHEDULER": address, **_env(tmp_path)})
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert address in lines[0] and "dask scheduler" in lines[0]
    assert not (tmp_path / "out" / "workspace" / "slides").exists()  # nothing tiled first


@pytest.fixture
def cli_ws(cli, tmp_path):
    """A tiled workspace at tmp/ws (for the filter case)."""
    assert cli("tile", CMU1, "-w", tmp_path / "ws", "-q").exit_code == 0


def test_devices_parse():
    from stainctl.cluster.local import Devices
    from stainctl.errors import UsageError

    assert Devices.parse("cpu,cpu").names == ("cpu", "cpu")
    assert Devices.parse("cpu,cpu").worker_device == "cpu"
    d = Devices.parse("cuda:0, cuda:3")
    assert d.gpus == (0, 3) and d.worker_device == "cuda"
    assert Devices.parse("cuda").names == ("cuda:0",)
    assert str(Devices.parse("cuda:0, cuda:3")) == "cuda:0,cuda:3"  # as a run records it
    for bad in ("cuda:0,cpu", "cuda:1,cuda:1", "gpu0", ""):
        with pytest.raises(UsageError, match="--devices"):
            Devices.parse(bad)


def test_devices_and_scheduler_together_are_refused():
    from stainctl.cluster.local import Devices
    from stainctl.errors import UsageError
    from stainctl.steps.translate import TranslateOptions

    with pytest.raises(UsageError, match="--scheduler or --devices"):
        TranslateOptions(marker=MARKER, scheduler="tcp://h:8786", devices=Devices.parse("cpu"))


def test_shards_are_whole_batches_and_cover_every_tile_once():
    from stainctl.steps.translate import TranslateOptions
    from stainctl.steps.translate_cluster import shard_size
    from stainctl.steps.translate_work import shards

    size = shard_size(TranslateOptions(marker=MARKER, batch_size=8, shard_tiles=10), 8)
    assert size == 16
    tiles = np.arange(37 * 4).reshape(37, 4)
    parts = list(shards(tiles, size))
    assert [len(p) for p in parts] == [16, 16, 5]
    assert np.array_equal(np.concatenate(parts), tiles)


def test_slurm_job_script_has_the_gpus_the_partition_and_the_worker_command():
    from stainctl.cluster.slurm import SlurmOptions, job_script

    script = job_script(SlurmOptions(jobs=3, gpus_per_job=4, partition="gpu-a100",
                                     time="02:30", cores=16, memory="128GB"))
    assert "#SBATCH --gres=gpu:4" in script
    assert "#SBATCH -p gpu-a100" in script
    assert "#SBATCH -t 02:30:00" in script
    assert "-m stainctl.cluster.gpu_worker tcp://" in script and "--gpus 4" in script


def test_slurm_dry_run_prints_the_script(cli):
    r = cli("cluster", "slurm", "--jobs", "2", "--gpus-per-job", "2", "--partition", "gpu",
            "--time", "01:00", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "--gres=gpu:2" in r.stdout and "stainctl.cluster.gpu_worker" in r.stdout


def test_slurm_time_is_checked(cli):
    r = cli("cluster", "slurm", "--time", "2h", "--dry-run")
    assert r.exit_code == 2 and "--time" in r.stderr


def test_a_gpu_job_runs_one_single_thread_worker_per_gpu():
    from stainctl.cluster.gpu_worker import commands

    args = ["tcp://10.0.0.1:8786", "--name", "job-7", "--nthreads", "16", "--memory-limit",
            "64GiB", "--gpus", "2"]
    cmds = commands(args, visible="3,5")
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in cmds] == ["3", "5"]
    for i, (cmd, _) in enumerate(cmds):
        assert cmd[cmd.index("--nthreads") + 1] == "1"
        assert cmd[cmd.index("--name") + 1] == f"job-7-gpu{i}"
        assert cmd[cmd.index("--memory-limit") + 1] == "32.00GiB"
        assert "--gpus" not in cmd and "distributed.cli.dask_worker" in cmd
    cpu = commands([*args[:-1], "0"], visible=None)
    assert len(cpu) == 1 and cpu[0][1] == {}
