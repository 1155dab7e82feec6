"""The per-slide lifecycle shared by every step, and options that check themselves before any
workspace is touched."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from conftest import CMU1

from stainctl.errors import SlideError, UsageError
from stainctl.steps.lifecycle import SlidePlan, SlideStep
from stainctl.steps.report import SilentProgress, SlideOutcome
from stainctl.workspace import SlideRecord, StepRecord, Workspace


@dataclass(frozen=True)
class Work:
    value: int


class ToyStep(SlideStep[SlideRecord, Work]):
    """Doubles a number per slide; 'bad' fails with a reason, 'crash' with a bug."""

    label = "toy"

    def __init__(self, ws: Workspace, value: int, *, force: bool = False) -> None:
        super().__init__(ws, SilentProgress(), force=force)
        self.value = value
        self.ran: list[str] = []
        self.seen_running: list[str] = []

    def slide(self, item: SlideRecord) -> SlideRecord:
        return item

    def step_name(self, item: SlideRecord) -> str:
        return "toy"

    def plan(self, item: SlideRecord, slide: SlideRecord,
             previous: StepRecord | None) -> SlidePlan[SlideRecord, Work]:
        if slide.key == "unplannable":
            raise SlideError(slide.path, "cannot be planned")
        return SlidePlan(item=item, slide=slide, step="toy", params={"value": self.value},
                         work=Work(self.value), previous=previous)

    def skipped(self, plan: SlidePlan[SlideRecord, Work]) -> SlideOutcome:
        return SlideOutcome(plan.slide.key, plan.slide.path, "skipped", "already doubled")

    def run_one(self, plan: SlidePlan[SlideRecord, Work]) -> SlideOutcome:
        step = self.manifest.step(plan.slide.id, "toy")
        if step is not None and step.state == "running":
            self.seen_running.append(plan.slide.key)
        self.ran.append(plan.slide.key)
        if plan.slide.key == "bad":
            raise SlideError(plan.slide.path, "is bad; fix it")
        if plan.slide.key == "crash":
            raise ZeroDivisionError("a bug")
        return SlideOutcome(plan.slide.key, plan.slide.path, "done", str(2 * plan.work.value))


def test_lifecycle_records_done_failed_and_skips_on_rerun(tmp_path):
    ws = Workspace.open(tmp_path, create=True)
    slides = [ws.manifest.add_slide(f"/s/{k}", k, "") for k in
              ("a", "bad", "crash", "unplannable", "b")]
    result = ToyStep(ws, 21).run(slides)
    states = {o.slide: (o.state, o.message) for o in result.slides}
    assert states["a"] == states["b"] == ("done", "42")
    assert states["bad"] == ("failed", "is bad; fix it")
    assert states["crash"][0] == "failed" and "ZeroDivisionError: a bug" in states["crash"][1]
    assert states["unplannable"] == ("failed", "cannot be planned")
    assert [o.slide for o in result.slides] == ["a", "bad", "crash", "unplannable", "b"]
    assert result.exit_code == 1

    m = ws.manifest
    recorded = {s.key: m.step(s.id, "toy") for s in slides}
    assert all(r is not None for r in recorded.values())
    assert recorded["a"].state == "done" and recorded["a"].params == {"value": 21}
    assert recorded["bad"].state == "failed" and recorded["bad"].error == "is bad; fix it"
    # A slide that failed while running keeps the parameters it ran with (a rerun resumes);
    # one that could not be planned has none.
    assert recorded["bad"].params == {"value": 21}
    assert recorded["unplannable"].params is None

    again = ToyStep(ws, 21)
    rerun = again.run(slides)
    assert {o.slide: o.state for o in rerun.slides} == {
        "a": "skipped", "b": "skipped", "bad": "failed", "crash": "failed",
        "unplannable": "failed"}
    assert again.ran == ["bad", "crash"]
    assert again.seen_running == ["bad", "crash"]  # marked running before the work

    other = ToyStep(ws, 5)  # other parameters: everything is redone
    assert {o.message for o in other.run([slides[0], slides[4]]).slides} == {"10"}
    forced = ToyStep(ws, 5, force=True)
    forced.run([slides[0]])
    assert forced.ran == ["a"]


def test_options_check_themselves():
    from stainctl.quality.metrics import FilterThresholds
    from stainctl.slide.grid import GridParams
    from stainctl.slide.tissue import TissueParams
    from stainctl.steps.embed import EmbedOptions
    from stainctl.steps.filter import FilterOptions
    from stainctl.steps.stitch import StitchOptions
    from stainctl.steps.translate import TranslateOptions
    from stainctl.stitch.pyramid import PyramidOptions

    bad = [
        (lambda: GridParams(tile_size=8), "--tile-size"),
        (lambda: GridParams(tile_size=256, overlap=256), "--overlap"),
        (lambda: FilterOptions(batch_size=0), "--batch-size"),
        (lambda: FilterOptions(workers=0), "--workers"),
        (lambda: EmbedOptions(dtype="fp16"), "--dtype"),
        (lambda: EmbedOptions(readers=0), "--readers"),
        (lambda: TranslateOptions(marker="ki67", batch_size=0), "--batch-size"),
        (lambda: TranslateOptions(marker="ki67", steps=0), "--steps"),
        (lambda: TranslateOptions(marker="ki67", dtype="fp64"), "--dtype"),
        (lambda: PyramidOptions(format="png"), "--format"),
        (lambda: PyramidOptions(quality=0), "--quality"),
        (lambda: StitchOptions(background=(300, 0, 0)), "--background"),
        (lambda: TissueParams(saturation=300), "--tissue-threshold"),
        (lambda: FilterThresholds(max_white=60), "--max-white"),
        (lambda: FilterThresholds(min_saturated=-0.1), "--min-saturated"),
        (lambda: FilterThresholds(min_laplacian=-1), "--min-laplacian"),
    ]
    for make, flag in bad:
        with pytest.raises(UsageError, match=flag):
            make()
    TranslateOptions(marker="ki67")  # the defaults are valid
    StitchOptions(background=(0, 128, 255))


@pytest.mark.parametrize("args", [
    ["tile", "no-such-folder/*.svs"],  # a typo in a glob: no slides
    ["tile", CMU1, "--tile-size", "8"],
    ["tile", CMU1, "--min-tissue", "2"],
    ["tile", "EMPTY_CSV"],  # a slide list with no rows
    ["tile", CMU1, "--tissue-threshold", "300"],
])
def test_a_usage_error_leaves_no_workspace(cli, tmp_path, args):
    csv = tmp_path / "slides.csv"
    csv.write_text("path,mpp\n")
    ws = tmp_path / "ws"
    r = cli(*[csv if a == "EMPTY_CSV" else a for a in args], "-w", ws)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ")
    assert not ws.exists()


@pytest.mark.parametrize(("args", "flag"), [
    (["stitch", "--background", "300,0,0"], "--background"),
    (["stitch", "--background", "red"], "--background"),
    (["stitch", "--format", "png"], "--format"),
    (["filter", "--max-white", "60"], "--max-white"),
    (["embed", "--dtype", "fp16"], "--dtype"),
    (["translate", "--batch-size", "0"], "--batch-size"),
])
def test_commands_check_their_options_before_the_workspace(cli, tmp_path, args, flag):
    nowhere = tmp_path / "nowhere"
    r = cli(*args, "-w", nowhere)
    assert r.exit_code == 2 and flag in r.stderr  # not "not a stainctl workspace"
    assert not nowhere.exists()
    r = cli(args[0], "-w", nowhere)  # valid options: now the workspace is opened
    assert r.exit_code == 2 and "not a stainctl workspace" in r.stderr


def test_tile_through_run_batch_records_its_run(cli, tmp_path, cmu1_path):
    import json

    ws = tmp_path / "ws"
    r = cli("tile", cmu1_path, "-w", ws, "--tile-size", "256", "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["slides"][0]["state"] == "done"
    w = Workspace.open(ws)
    (run,) = w.manifest.runs()
    assert run.command == "tile" and run.outcome == "ok"
    assert run.params["slides"] == [str(cmu1_path)]
    r = cli("tile", cmu1_path, "-w", ws, "--tile-size", "256")
    assert r.exit_code == 0 and "Thumbnails and tissue masks" in r.stdout
    assert "nothing to do, 1 slide(s) already done" in r.stdout
