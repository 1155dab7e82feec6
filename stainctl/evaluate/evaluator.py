"""`evaluate`: one real set against one or more generated sets, every metric asked for.

Each set is measured once in one streaming pass (`measure.py`); the metrics are computed from
those measures; generated sets are ranked. A set that cannot be opened is reported as failed
and the others are still compared. With the default metrics, one whose network cannot be loaded
(the FID Inception weights offline) is left out and listed with the reason and the fix; asked
for by name, it is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from stainctl.errors import StainctlError, UsageError
from stainctl.evaluate.distribution import (
    cosine_of_means,
    frechet_distance,
    kernel_distance,
    mean_std,
)
from stainctl.evaluate.measure import MeasureOptions, SetMeasures, measure_set, network_fn
from stainctl.evaluate.sources import (
    ImageSet,
    Item,
    SourceOptions,
    equal_subsets,
    open_set,
    resolution_caveat,
)

log = logging.getLogger(__name__)

METRICS = ("fid", "cropfid", "kid", "encoder", "stain", "paired", "seams", "colour", "mra")
DEFAULT_METRICS = ("fid", "cropfid", "kid", "stain", "paired", "seams")
INCEPTION_METRICS = {"fid", "cropfid", "kid"}
# What ranks the generated sets, best first: the first of these that was measured.
RANK_BY = ("cropfid", "fid", "kid", "encoder_fd", "p90_wasserstein", "lab_distance")


@dataclass(frozen=True)
class EvaluateOptions:
    real: Path
    fakes: tuple[Path, ...]
    metrics: tuple[str, ...] = DEFAULT_METRICS
    # True: every metric in `metrics` must run (they were asked for by name); False (the
    # default set): those that cannot are left out and listed in `Evaluation.unavailable`.
    strict: bool = True
    seeds: int = 5
    crops: int = 4
    crop_size: int = 256
    max_images: int | None = None
    source: SourceOptions = field(default_factory=SourceOptions)
    inception_weights: Path | None = None
    encoder: str | None = None
    models_dir: Path | None = None
    pairs_csv: Path | None = None
    register: bool = True  # landmark registration of pairs where landmark CSVs exist
    dab_threshold: float = 0.15
    batch_size: int = 16
    readers: int = 2
    device: str = "auto"
    # A feature network given in code (tests; other backbones): uint8 NCHW -> (B, D).
    feature_model: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown:
            raise UsageError(f"unknown metric(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(METRICS)}")
        if "encoder" in self.metrics and not self.encoder:
            raise UsageError("the encoder metrics need --encoder NAME (e.g. uni2-h)")
        if "mra" in self.metrics and not self.encoder:
            raise UsageError("mra needs --encoder NAME: gigapath (as HistDiST measures it) or "
                             "another installed encoder such as uni2-h")
        if self.seeds < 1 or self.crops < 1 or self.crop_size < 16:
            raise UsageError("--seeds and --crops must be at least 1, --crop-size at least 16")
        if not self.fakes:
            raise UsageError("give at least one --fake set")


@dataclass
class SetResult:
    label: str
    path: str
    kind: str
    images: int
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    measures: SetMeasures | None = field(default=None, repr=False)
    image_set: ImageSet | None = field(default=None, repr=False)
    items: list[Item] = field(default_factory=list, repr=False)


@dataclass
class Evaluation:
    real: SetResult
    fakes: list[SetResult]
    ranking: list[str]
    rank_by: str | None
    settings: dict[str, Any]
    caveats: list[str]
    # Metrics left out because they cannot run here: [{"metrics": [...], "reason": "..."}].
    unavailable: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def one(r: SetResult) -> dict[str, Any]:
            d: dict[str, Any] = {"label": r.label, "path": r.path, "kind": r.kind,
                                 "images": r.images, **r.metrics}
            if r.error:
                d["error"] = r.error
            if r.measures is not None and r.measures.failed:
                d["unreadable"] = r.measures.failed
            return d

        return _json_safe({"real": one(self.real), "fakes": [one(f) for f in self.fakes],
                           "ranking": self.ranking, "rank_by": self.rank_by,
                           "settings": self.settings, "caveats": self.caveats,
                           "unavailable": self.unavailable})


def _json_safe(value: Any) -> Any:
    """NaN and infinities (undefined correlations, empty sets) become null: strict JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def evaluate(options: EvaluateOptions, progress: Any = None) -> Evaluation:
    """`progress`: an object with start(description, total) and advance(n), as the CLI's."""
    wanted = set(options.metrics)
    unavailable: list[dict[str, Any]] = []

    def load(metrics: set[str], loader: Callable[[EvaluateOptions], Any],
             asked: bool = False) -> Any:
        """The network `metrics` need, or None; when it cannot be loaded and the metrics were
        not asked for (by name, or by `asked`), they are left out with the reason."""
        if not wanted & metrics:
            return None
        try:
            return loader(options)
        except UsageError as err:
            if options.strict or asked:
                raise
            unavailable.append({"metrics": [m for m in METRICS if m in wanted & metrics],
                                "reason": str(err)})
            wanted.difference_update(metrics)
            return None

    # A weights file given by name asks for FID: a wrong one is an error, not a note.
    network = load(INCEPTION_METRICS, _feature_network, options.inception_weights is not None)
    encoder = load({"encoder", "mra"}, _encoder)

    real_set = open_set(options.real, options.source, fake=False)
    fakes: list[SetResult] = []
    opened: list[ImageSet] = []
    for path in options.fakes:
        try:
            s = open_set(path, options.source, fake=True)
        except StainctlError as err:
            fakes.append(SetResult(path.name, str(path), "?", 0, error=str(err)))
            continue
        opened.append(s)
        fakes.append(SetResult(s.label, str(s.path), s.kind, len(s), image_set=s))
    if not opened:
        raise UsageError("no --fake set could be opened: "
                         + "; ".join(f.error or "" for f in fakes))
    chosen = equal_subsets([real_set, *opened], options.max_images)
    real = SetResult(real_set.label, str(real_set.path), real_set.kind, len(chosen[0]),
                     image_set=real_set, items=chosen[0])
    for f, items in zip([f for f in fakes if f.error is None], chosen[1:], strict=True):
        f.items = items
        f.images = len(items)

    caveats: list[str] = []
    mixed = resolution_caveat([real_set, *opened])
    if mixed is not None:
        log.warning("%s", mixed)  # at once, on stderr: the metrics may take long
        caveats.append(mixed)

    seeds = tuple(range(options.seeds)) if wanted & {"cropfid", "kid"} else ()
    mopts = MeasureOptions(full="fid" in wanted, crop_seeds=seeds, crops=options.crops,
                           crop_size=options.crop_size, stain="stain" in wanted,
                           seams="seams" in wanted, colour="colour" in wanted,
                           dab_threshold=options.dab_threshold,
                           batch_size=options.batch_size, readers=options.readers)
    for r in [real, *fakes]:
        if r.error is not None:
            continue
        tick = None
        if progress is not None:
            progress.start(f"measuring {r.label}", len(r.items))
            tick = progress.advance
        # Seams are a property of stitched outputs: the real set has none.
        r.measures = measure_set(r.items, replace(mopts, seams=mopts.seams and r is not real),
                                 network, encoder, tick)
        r.images = len(r.measures.keys)

    target = None
    if "colour" in wanted:
        from stainctl.evaluate.colour import check_target, colour_stats

        assert real.measures is not None
        # The real set is the colour target: one without stained tissue is a usage error.
        check_target(real.measures.colour, real.measures.colour_all, real.path)
        target = colour_stats(real.measures.colour, real.path)
        real.metrics["colour"] = target.as_dict()
    for f in fakes:
        if f.error is None:
            f.metrics = _compare(real, f, options, wanted, caveats)
            if target is not None and f.measures is not None:
                from stainctl.evaluate.colour import colour_distance, colour_stats

                stats = colour_stats(f.measures.colour, f.path)
                f.metrics["colour"] = {**stats.as_dict(),
                                       "distance": colour_distance(stats, target)}
    if "mra" in wanted and encoder is not None:
        _add_mra(real, fakes, options, encoder, caveats)
    rank_by, ranking = _rank(fakes)
    settings = {"metrics": sorted(wanted), "seeds": options.seeds, "crops": options.crops,
                "crop_size": options.crop_size, "max_images": options.max_images,
                "tile_size": options.source.tile_size, "tile_mpp": options.source.tile_mpp,
                "dab_threshold": options.dab_threshold, "encoder": options.encoder,
                "features": "custom" if options.feature_model is not None
                else "inception-v3-compat pool3 (2048)"}
    return Evaluation(real, fakes, ranking, rank_by, settings, sorted(set(caveats)),
                      unavailable)


def _add_mra(real: SetResult, fakes: list[SetResult], options: EvaluateOptions,
             encoder: Callable[[np.ndarray], np.ndarray], caveats: list[str]) -> None:
    """MRA of each generated set over its pairs with the real set (same names, or --pairs)."""
    from stainctl.evaluate.pairs import find_pairs
    from stainctl.evaluate.retrieval import mra_of_pairs

    assert real.image_set is not None
    real_embeddings: dict[str, np.ndarray] = {}  # embedded once for every generated set
    for f in fakes:
        if f.error is not None or f.image_set is None:
            continue
        pairs = find_pairs(real.image_set.items, f.image_set.items, options.pairs_csv)
        if options.max_images is not None:
            pairs = pairs[:options.max_images]
        if len(pairs) < 2:
            caveats.append("mra needs at least 2 pairs of real and generated images (same "
                           "names, or --pairs CSV)")
            continue
        f.metrics["mra"] = mra_of_pairs(pairs, encoder, real_embeddings)


def _feature_network(options: EvaluateOptions) -> Callable[[np.ndarray], np.ndarray]:
    from stainctl.models.encoders import resolve_device

    device = resolve_device(options.device)
    if options.feature_model is not None:
        return network_fn(options.feature_model.to(device), device)
    from stainctl.evaluate.features import inception_weights, load_inception

    model = load_inception(inception_weights(options.inception_weights))
    return network_fn(model.to(device), device)


def _encoder(options: EvaluateOptions) -> Callable[[np.ndarray], np.ndarray]:
    from stainctl.evaluate.features import EncoderFeatures
    from stainctl.models.encoders import load_encoder
    from stainctl.models.registry import get_card, models_dir

    assert options.encoder is not None
    card = get_card(options.encoder, models_dir(options.models_dir))
    return EncoderFeatures(load_encoder(card, models_dir(options.models_dir),
                                        device=options.device))


def _compare(real: SetResult, fake: SetResult, options: EvaluateOptions, wanted: set[str],
             caveats: list[str]) -> dict[str, Any]:
    from stainctl.evaluate.badness import badness
    from stainctl.evaluate.stain import unpaired_stain_metrics

    r, f = real.measures, fake.measures
    assert r is not None and f is not None
    out: dict[str, Any] = {}
    if min(len(r.keys), len(f.keys)) < 2:
        caveats.append("fewer than 2 images in a set: distribution metrics need at least 2")
    elif wanted & INCEPTION_METRICS:
        if "fid" in wanted:
            out["fid"] = frechet_distance(r.features("full"), f.features("full"))
        seeds = sorted(r.crops)
        if "cropfid" in wanted:
            out["cropfid"] = mean_std([frechet_distance(r.features("crops", s),
                                                        f.features("crops", s)) for s in seeds])
        if "kid" in wanted:
            kids = [kernel_distance(r.features("crops", s), f.features("crops", s), s)[0]
                    for s in seeds]
            out["kid"] = mean_std(kids)
        dim = r.features("full" if "fid" in wanted else "crops", 0 if seeds else None).shape[1]
        if len(r.keys) < dim:
            caveats.append(f"FID on fewer images ({len(r.keys)}) than feature dimensions "
                           f"({dim}): the covariance is singular and FID is biased upwards; "
                           "compare sets of the same size only")
    if "encoder" in wanted and len(r.encoded) and len(f.encoded):
        er, ef = r.features("encoded"), f.features("encoded")
        out["encoder"] = {"frechet": frechet_distance(er, ef) if min(len(er), len(ef)) > 1
                          else float("nan"), "cosine_of_means": cosine_of_means(er, ef)}
    if "stain" in wanted and r.dab and f.dab:
        out["stain"] = unpaired_stain_metrics(r.dab, f.dab)
    if "paired" in wanted:
        from stainctl.evaluate.pairs import paired_metrics

        paired = paired_metrics(real, fake, options)
        if paired is not None:
            out["paired"] = paired
            from stainctl.evaluate.paired import CAVEAT

            caveats.append(CAVEAT)
    if "seams" in wanted and f.seam_ratio is not None:
        out["seams"] = {"ratio": f.seam_ratio, "border_step": f.seam[0] / f.seam[1],
                        "interior_step": f.seam[2] / f.seam[3]}
    elif "seams" in wanted and options.strict:  # asked for by name: not left out silently
        caveats.append(f"seams: {fake.label} has no tile borders to measure (only slides "
                       "stitched by stainctl have them): give the stitched slides, a .ome.tiff "
                       "or the folder holding them (the main job's OUTPUT, WS/outputs)")
    if f.signs:
        score = badness(f.signs)
        order = np.argsort(score)
        out["best"] = [f.keys[i] for i in order[:6]]
        out["worst"] = [f.keys[i] for i in order[::-1][:6]]
    return out


def _rank(fakes: list[SetResult]) -> tuple[str | None, list[str]]:
    ok = [f for f in fakes if f.error is None]
    for name in RANK_BY:
        values = [_rank_value(f.metrics, name) for f in ok]
        if ok and all(v is not None for v in values):
            scores = [float(v or 0.0) for v in values]
            order = sorted(range(len(ok)), key=scores.__getitem__)
            return name, [ok[i].label for i in order]
    return None, [f.label for f in ok]


def _rank_value(metrics: dict[str, Any], name: str) -> float | None:
    value: Any
    if name == "encoder_fd":
        value = metrics.get("encoder", {}).get("frechet")
    elif name == "lab_distance":
        value = metrics.get("colour", {}).get("distance", {}).get("lab_distance")
    elif name == "p90_wasserstein":
        value = metrics.get("stain", {}).get("p90_wasserstein")
    else:
        value = metrics.get(name)
    if isinstance(value, dict):
        value = value.get("mean")
    return None if value is None or not np.isfinite(value) else float(value)
