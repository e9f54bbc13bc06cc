"""The evaluation job: label a held-out and a test split with the labeling job, then score them.

    dataset spec -> manifest (Parquet) -> run_label_job (Ray Data, resumable) -> labels Parquet
        -> join with GT on uri -> pro2sam.evaluation (thresholds from held-out) -> pro2sam.report

Output folder (local or any fsspec URI)::

    manifests/inputs.parquet           what was labeled: both splits, one labeling run
    labels/*.parquet                   the labeling job's output (a rerun resumes it)
    report.json                        every number and setting
    report.md                          the Table-1 layout
    per_image.jsonl                    one record per test image
    overlays/*.png                     best and worst test cases

Predictions go through the same Ray Data path as labeling, so cluster evaluation is the labeling
job plus a driver-side pass over its Parquet output.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from ..datasets import DatasetError, WSOLDataset, open_dataset
from ..evaluation import DEFAULT_CAM_CURVE_INTERVAL, evaluate_with_heldout, index_rows
from ..labels import LABEL_SCHEMA
from ..output import LabelsOutput
from ..report import image_records_jsonl, overlay_name, overlay_png, report_json, report_markdown, select_overlay_cases
from ..storage import StorageError, filesystem, join_uri
from .label_job import (
    LabelingSettings,
    LabelJobConfig,
    add_labeling_arguments,
    labeling_settings_from_args,
    run_label_job,
)

__all__ = ["EvaluateJobConfig", "run_evaluate_job", "add_evaluate_arguments", "run_from_args", "main"]

log = logging.getLogger("pro2sam.evaluate")

ROLES = ("heldout", "test")


@dataclass(kw_only=True)
class EvaluateJobConfig(LabelingSettings):
    """Settings of one evaluation run.

    Attributes:
        test: data-set spec of the split reported (:func:`pro2sam.datasets.open_dataset`).
        heldout: data-set spec of the split thresholds are chosen on (never the test split).
        output: output folder, local or fsspec URI; a rerun resumes the labeling.
        cam_curve_interval: step of the tau grid.
        overlays: how many overlay PNGs (half best, half worst).
        The rest: the labeling job's :class:`~pro2sam.pipeline.label_job.LabelingSettings`.
    """

    test: str
    heldout: str
    output: str
    cam_curve_interval: float = DEFAULT_CAM_CURVE_INTERVAL
    overlays: int = 6

    def label_config(self) -> LabelJobConfig:
        return LabelJobConfig(
            input=join_uri(self.output, "manifests/inputs.parquet"),
            output=join_uri(self.output, "labels"),
            **self.labeling_settings(),
        )


def _write(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def _gtformer_class_names(gtformer: str) -> list[str] | None:
    from ..storage import fetch_to_local

    path = fetch_to_local(gtformer)
    config = path / "config.json" if path.is_dir() else path.parent / "config.json"
    try:
        return json.loads(config.read_text()).get("class_names")
    except (OSError, ValueError):
        return None


def _label_splits(cfg: EvaluateJobConfig, datasets: dict[str, WSOLDataset]) -> list[dict]:
    """One labeling run over both splits (one actor pool to start); returns every labels row."""
    manifests = [datasets[role].to_manifest() for role in ROLES]
    manifest = pa.concat_tables([m.replace_schema_metadata(None) for m in manifests])
    buffer = io.BytesIO()
    pq.write_table(manifest, buffer)
    _write(join_uri(cfg.output, "manifests/inputs.parquet"), buffer.getvalue())
    label_cfg = cfg.label_config()
    summary = run_label_job(label_cfg)
    log.info("%s", summary)
    return LabelsOutput(label_cfg.output).read_table(LABEL_SCHEMA.names).to_pylist()


def run_evaluate_job(cfg: EvaluateJobConfig) -> dict:
    """Label both splits (resuming), evaluate, write the report files; return the report.

    Raises:
        DatasetError: malformed data-set metadata.
        StorageError: storage cannot be reached.
        ValueError: the held-out and test specs are the same, or held-out has no boxes or masks.
    """
    if cfg.heldout == cfg.test:
        raise ValueError("the held-out split must differ from the test split (thresholds are never tuned on test)")
    datasets = {"heldout": open_dataset(cfg.heldout), "test": open_dataset(cfg.test)}
    rows = _label_splits(cfg, datasets)
    report = evaluate_with_heldout(
        datasets["heldout"], rows, datasets["test"], rows, cam_curve_interval=cfg.cam_curve_interval
    )
    model_classes = _gtformer_class_names(cfg.gtformer)
    report["settings"]["class_names_match"] = model_classes == datasets["test"].class_names
    if model_classes is not None and len(model_classes) != len(datasets["test"].class_names):
        log.warning(
            "GTFormer has %d classes, the data set %d: class indices are compared as they are",
            len(model_classes), len(datasets["test"].class_names),
        )  # fmt: skip
    report["settings"]["specs"] = {"heldout": cfg.heldout, "test": cfg.test}
    report["settings"]["label_job"] = {k: v for k, v in asdict(cfg).items() if k not in ("test", "heldout", "output")}
    test_uris = set(datasets["test"].by_uri())
    test_rows = [r for r in rows if r["uri"] in test_uris]
    model_ids = {r.get("gtformer_sha256") for r in test_rows} | {r.get("sam_model") for r in test_rows}
    report["settings"]["model_ids"] = sorted(m for m in model_ids if m)

    _write(join_uri(cfg.output, "report.json"), report_json(report).encode())
    _write(join_uri(cfg.output, "report.md"), report_markdown(report).encode())
    _write(join_uri(cfg.output, "per_image.jsonl"), image_records_jsonl(report).encode())
    samples = datasets["test"].by_uri()
    by_uri = index_rows(test_rows)
    written = []
    counters = {"best": 0, "worst": 0}
    for kind, record in select_overlay_cases(report, cfg.overlays):
        name = overlay_name(kind, counters[kind], record["image_id"])
        counters[kind] += 1
        try:
            png = overlay_png(record, samples[record["uri"]], by_uri[record["uri"]])
            _write(join_uri(cfg.output, f"overlays/{name}"), png)
            written.append(name)
        except Exception as e:  # an overlay is a courtesy, never a reason to lose the report
            log.warning("overlay of %s failed: %s", record["uri"], e)
    report["overlays"] = written
    return report


# ---------------------------------------------------------------- command line


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    """The ``pro2sam evaluate`` / ``jobs/evaluate.py`` options."""
    p.add_argument(
        "--test", required=True, help="split to report: cub:ROOT:test, ilsvrc:ROOT:val, wsol:META:DATA:test, or a manifest"
    )
    p.add_argument(
        "--heldout", required=True, help="split the thresholds are chosen on, e.g. wsol:META:DATA:val (never test)"
    )
    p.add_argument("--output", required=True, help="output folder (local or URI); a rerun resumes the labeling")
    add_labeling_arguments(p)
    p.add_argument(
        "--cam-curve-interval", type=float, default=DEFAULT_CAM_CURVE_INTERVAL, help="tau grid step (default 0.01)"
    )
    p.add_argument("--overlays", type=int, default=6, help="overlay PNGs of best and worst cases (default 6)")


def config_from_args(args: argparse.Namespace) -> EvaluateJobConfig:
    return EvaluateJobConfig(
        test=args.test,
        heldout=args.heldout,
        output=args.output,
        cam_curve_interval=args.cam_curve_interval,
        overlays=args.overlays,
        **labeling_settings_from_args(args),
    )


def run_from_args(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = run_evaluate_job(config_from_args(args))
    except (DatasetError, StorageError, ValueError) as e:
        print(f"pro2sam evaluate: error: {e}", file=sys.stderr)
        return 2
    print(report_markdown(report), flush=True)
    print(f"report: {join_uri(args.output, 'report.json')}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="evaluate", description="Pro2SAM evaluation job: label with Ray Data, then score against the GT."
    )
    add_evaluate_arguments(parser)
    return run_from_args(parser.parse_args(argv))
