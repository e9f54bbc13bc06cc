"""The offline end-to-end demo: the shipped models on fresh synthetic scenes, scored and shown.

    write_wsol_dataset (val + test) -> run_evaluate_job (the Ray labeling job, thresholds chosen
        on val, numbers on test) -> demo.html (the test split's overlays, coarse maps beside)

Nothing is downloaded: the data set is generated (:mod:`pro2sam.synthetic`) and the models are
the ones shipped in the package (:mod:`pro2sam.shipped`), trained on other scenes of the same
world (GTFormer on the ``train`` split of the same seed, SAM on the separate ``sam`` stream), so
the numbers are held-out numbers. Layout under ``workdir``::

    data/                       the synthetic data set (wsolevaluation layout)
    evaluation/                 the evaluation job's output: labels/*.parquet, report.json, ...
    demo.html                   the gallery of the test split (at most ``gallery_limit`` images)

The defaults take under 2 minutes on 2 CPU cores (102 s measured, Ray start-up included).
"""

from __future__ import annotations

import os
import posixpath
import time
from pathlib import Path

from .. import shipped
from ..evaluation import METHODS
from .query import build_gallery
from ..pipeline.evaluate_job import run_evaluate_job
from ..pipeline.settings import EvaluateJobConfig, LabelingSettings, Resources
from ..report import BOX_ACCURACY, SUMMARY_METRICS
from ..candidates import CandidateConfig
from ..storage import join_uri
from ..synthetic import write_wsol_dataset

__all__ = [
    "DEFAULT_NUM_TEST",
    "DEFAULT_NUM_VAL",
    "DEFAULT_POINTS_PER_SIDE",
    "DEFAULT_GALLERY_LIMIT",
    "run_demo",
    "format_summary",
]

DEFAULT_NUM_TEST = 100
DEFAULT_NUM_VAL = 50
DEFAULT_POINTS_PER_SIDE = 16
DEFAULT_GALLERY_LIMIT = 48
_METHOD_NAMES = {"GTFormer": "GTFormer only (coarse map)", "Pro2SAM": "Pro2SAM"}


def run_demo(
    workdir: str | Path,
    *,
    num_test: int = DEFAULT_NUM_TEST,
    num_val: int = DEFAULT_NUM_VAL,
    points_per_side: int = DEFAULT_POINTS_PER_SIDE,
    seed: int = shipped.SYNTHETIC_SEED,
    gtformer: str | Path | None = None,
    sam: str | None = None,
    sam_checkpoint: str | Path | None = None,
    ray_address: str | None = None,
    gallery_limit: int = DEFAULT_GALLERY_LIMIT,
    settings=None,
    regime: str = "part",
) -> dict:
    """Generate a data set, label and score it with the Ray evaluation job, write the gallery,
    print the summary (:func:`format_summary`) to stdout and return it.

    A rerun in the same ``workdir`` starts over (the labels are written again).

    Args:
        workdir: local folder for everything (see the module docstring).
        num_test: images of the reported ``test`` split.
        num_val: images of the held-out ``val`` split, on which GTFormer's thresholds are chosen.
        points_per_side: SAM's prompt grid is N x N per image.
        seed: the synthetic world's seed; the default is the one the shipped GTFormer was trained
            on, whose ``val`` and ``test`` scenes it never saw.
        gtformer: GTFormer export folder (default: the one shipped for ``regime``).
        sam, sam_checkpoint: SAM variant and weights file (default: the ``"synthetic"`` SAM shipped
            for ``regime``; ``sam_checkpoint`` defaults to the shipped file only when ``sam`` does too).
        ray_address: Ray cluster to join (default: $RAY_ADDRESS, else a local Ray).
        gallery_limit: at most this many test images in ``demo.html`` (best match score first).
        settings: a settings file of ``pro2sam tune`` (:class:`~pro2sam.tuning.TunedSettings`): its
            SAM filters, pruning and matching are used (the grid stays ``points_per_side``), and
            the label rows carry its SHA-256. None: the package defaults (the command line's
            default is the settings shipped for ``regime``, :func:`pro2sam.shipped.settings_file`).
        regime: the synthetic world's regime (:data:`pro2sam.synthetic.REGIMES`): ``"part"``
            (class evidence on the part alone) or ``"object"`` (over the object, on a support).

    Returns:
        ``models``, ``num_test``, ``num_val``, ``points_per_side``, ``seed``, ``seconds`` (per
        step and ``total``), ``results`` (method -> :data:`pro2sam.report.SUMMARY_METRICS` key
        and the method's :data:`pro2sam.report.BOX_ACCURACY` key -> percent or None), ``error_rows``, ``thresholds``,
        ``gallery_images`` and the paths ``data``,
        ``labels``, ``report_json``, ``report_md``, ``gallery``.

    Raises:
        FileNotFoundError: a default shipped model is missing (a broken install).
    """
    workdir = Path(workdir).resolve()
    if sam is None:
        sam, sam_checkpoint = shipped.SAM_VARIANT, sam_checkpoint or shipped.sam_checkpoint(regime)
    gtformer = gtformer or shipped.gtformer_dir(regime)
    seconds = {}
    start = time.perf_counter()

    data = write_wsol_dataset(
        workdir / "data", num_train=0, num_val=num_val, num_test=num_test, seed=seed, command="pro2sam demo",
        regime=regime,
    )  # fmt: skip
    seconds["data"] = time.perf_counter() - start

    evaluation = workdir / "evaluation"
    cfg = EvaluateJobConfig(
        test=data.spec("test"),
        heldout=data.spec("val"),
        output=str(evaluation),
        labeling=LabelingSettings(
            gtformer=str(gtformer),
            sam=sam,
            sam_checkpoint=None if sam_checkpoint is None else str(sam_checkpoint),
            candidates=(
                settings.candidate_config(sam, points_per_side=points_per_side) if settings is not None
                else CandidateConfig.for_variant(sam, points_per_side=points_per_side)
            ),
            **({"matching": settings.match_config(), "tuned": settings} if settings is not None else {}),
            resources=Resources(ray_address=ray_address),
        ),
        overwrite=True,
    )
    step = time.perf_counter()
    report = run_evaluate_job(cfg)
    seconds["evaluation"] = time.perf_counter() - step

    step = time.perf_counter()
    gallery = workdir / "demo.html"
    labels = cfg.label_config().output
    gallery_images = build_gallery(
        labels, str(gallery), where=_uri_in(r["uri"] for r in report.images), limit=gallery_limit, coarse_map=True
    )
    seconds["gallery"] = time.perf_counter() - step
    seconds["total"] = time.perf_counter() - start

    results = report.results
    summary = {
        "models": {"gtformer": str(gtformer), "sam": sam, "sam_checkpoint": cfg.labeling.sam_checkpoint},
        "num_test": num_test,
        "num_val": num_val,
        "points_per_side": points_per_side,
        "seed": seed,
        "regime": regime,
        "seconds": seconds,
        "results": {m: {k: results[m].get(k) for k in (*SUMMARY_METRICS, BOX_ACCURACY[m])} for m in METHODS},
        "error_rows": {"test": report.test.num_error_rows, "val": report.heldout.num_error_rows},
        "thresholds": report.thresholds.to_dict(),
        "confidence": _confidence_summary(report.confidence),
        "gallery_images": gallery_images,
        "data": str(data.root),
        "labels": labels,
        "report_json": join_uri(str(evaluation), "report.json"),
        "report_md": join_uri(str(evaluation), "report.md"),
        "calibration": join_uri(str(evaluation), "confidence.json"),
        "gallery": str(gallery),
    }
    print(format_summary(summary), flush=True)
    return summary


def _confidence_summary(confidence: dict | None) -> dict | None:
    """The test split's AUROC and risk-coverage of the confidence calibrated on val (no curve)."""
    if not confidence:
        return None
    test = confidence["test"]
    return {"fitted_on": confidence["calibration"]["fitted_on"], "auroc": test["auroc"], "risk_coverage": test["risk_coverage"]}


def _uri_in(uris) -> str:
    """A DuckDB condition true for the labels rows of ``uris`` (the test split's; both splits
    share one labels table). The folder they all share when they share one (a short condition
    for the page's header), else the list."""
    uris = list(uris)
    folder = os.path.commonprefix(uris).rpartition("/")[0] + "/"
    if uris and all(posixpath.dirname(u) + "/" == folder for u in uris):
        return f"starts_with(uri, {_sql_string(folder)})"
    return f"uri IN ({', '.join(map(_sql_string, uris))})" if uris else "FALSE"


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _pct(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _confidence_lines(confidence: dict | None) -> list[str]:
    if not confidence:
        return []
    shares = " / ".join(confidence["risk_coverage"])
    values = " / ".join(_pct(v) for v in confidence["risk_coverage"].values())
    auroc = "-" if confidence["auroc"] is None else f"{confidence['auroc']:.3f}"
    return [
        "",
        f"Confidence (P(box right), calibrated on {confidence['fitted_on']}): AUROC {auroc} on test; GT-known Loc of the",
        f"  most confident {shares} % of the test images: {values}",
    ]


def format_summary(summary: dict) -> str:
    """The text ``run_demo`` prints: what ran, the test split's numbers, where the files are."""
    models, s, results = summary["models"], summary["seconds"], summary["results"]
    sam = models["sam"] + (f" ({models['sam_checkpoint']})" if models["sam_checkpoint"] else " (random weights)")
    thresholds = summary["thresholds"]
    width = max(len(n) for n in _METHOD_NAMES.values())
    header = f"  {'':{width}s}" + "".join(f"  {t:>{max(len(t), 5)}s}" for t in SUMMARY_METRICS.values())
    table = [
        f"  {_METHOD_NAMES[m]:{width}s}"
        + "".join(f"  {_pct(results[m][k]):>{max(len(t), 5)}s}" for k, t in SUMMARY_METRICS.items())
        for m in ("GTFormer", "Pro2SAM")
    ]
    return "\n".join(
        [
            "",
            "pro2sam demo: GTFormer + SAM on generated synthetic scenes they never saw (no downloads).",
            f"  GTFormer:  {models['gtformer']}",
            f"  SAM:       {sam}",
            f"  data:      {summary['num_test']} test + {summary['num_val']} held-out (val) images, seed "
            f"{summary['seed']}, {summary.get('regime', 'part')} regime ({summary['data']})",
            f"  grid:      {summary['points_per_side']} x {summary['points_per_side']} SAM prompts per image",
            f"  wall time: {s['total']:.1f} s (data {s['data']:.1f} s, labeling + scoring {s['evaluation']:.1f} s, "
            f"gallery {s['gallery']:.1f} s)",
            f"  error rows: {summary['error_rows']['test']} test, {summary['error_rows']['val']} val",
            "",
            f"Localization on the test split, percent (GTFormer's cam threshold {thresholds['cam_threshold']:.2f}, "
            f"chosen on {thresholds['chosen_on']}):",
            header,
            *table,
            "  MaxBoxAccV2: the coarse map's box accuracy at the best threshold of the test split itself, mean over",
            "    IoU 30/50/70 (wsolevaluation's; threshold-free by design). Pro2SAM gives one box per image: its",
            f"    BoxAccV2 (single box) is {_pct(results['Pro2SAM'][BOX_ACCURACY['Pro2SAM']])}; GTFormer's at the "
            f"thresholds chosen on val, {_pct(results['GTFormer'][BOX_ACCURACY['GTFormer']])}.",
            "  fallback: share of images whose box came from the coarse map (no SAM candidate survived).",
            *_confidence_lines(summary.get("confidence")),
            "",
            f"labels:    {summary['labels']}",
            f"report:    {summary['report_md']}  ({summary['report_json']})",
            f"confidence calibration: {summary['calibration']}",
            f"gallery:   {summary['gallery']}  ({summary['gallery_images']} test images, coarse maps beside)",
        ]
    )
