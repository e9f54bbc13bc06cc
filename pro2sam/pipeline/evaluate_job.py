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

import io
import logging
import sys
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from ..datasets import WSOLDataset, open_dataset
from ..evaluation import DEFAULT_CAM_CURVE_INTERVAL, evaluate_with_heldout, index_rows
from ..gtformer import gtformer_class_names
from ..labels import LABEL_SCHEMA
from ..output import LabelsOutput
from ..report import image_records_jsonl, overlay_name, overlay_png, report_json, report_markdown, select_overlay_cases
from ..storage import join_uri, write_bytes_atomic
from .label_job import LabelingSettings, LabelJobConfig, run_label_job

__all__ = ["EvaluateJobConfig", "run_evaluate_job"]

log = logging.getLogger("pro2sam.evaluate")

ROLES = ("heldout", "test")


@dataclass(kw_only=True)
class EvaluateJobConfig:
    """Settings of one evaluation run.

    Attributes:
        test: data-set spec of the split reported (:func:`pro2sam.datasets.open_dataset`).
        heldout: data-set spec of the split thresholds are chosen on (never the test split).
        output: output folder, local or fsspec URI; a rerun resumes the labeling.
        labeling: how the images are labeled (:class:`~pro2sam.pipeline.label_job.LabelingSettings`).
        overwrite: label again from scratch instead of resuming.
        cam_curve_interval: step of the tau grid.
        overlays: how many overlay PNGs (half best, half worst).
    """

    test: str
    heldout: str
    output: str
    labeling: LabelingSettings
    overwrite: bool = False
    cam_curve_interval: float = DEFAULT_CAM_CURVE_INTERVAL
    overlays: int = 6

    def label_config(self) -> LabelJobConfig:
        return LabelJobConfig(
            input=join_uri(self.output, "manifests/inputs.parquet"),
            output=join_uri(self.output, "labels"),
            labeling=self.labeling,
            overwrite=self.overwrite,
        )


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _label_splits(cfg: EvaluateJobConfig, datasets: dict[str, WSOLDataset]) -> list[dict]:
    """One labeling run over both splits (one actor pool to start); returns every labels row."""
    manifests = [datasets[role].to_manifest() for role in ROLES]
    manifest = pa.concat_tables([m.replace_schema_metadata(None) for m in manifests])
    buffer = io.BytesIO()
    pq.write_table(manifest, buffer)
    write_bytes_atomic(join_uri(cfg.output, "manifests/inputs.parquet"), buffer.getvalue())
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
    model_classes = gtformer_class_names(cfg.labeling.gtformer)
    report["settings"]["class_names_match"] = model_classes == datasets["test"].class_names
    if model_classes is not None and len(model_classes) != len(datasets["test"].class_names):
        log.warning(
            "GTFormer has %d classes, the data set %d: class indices are compared as they are",
            len(model_classes), len(datasets["test"].class_names),
        )  # fmt: skip
    report["settings"]["specs"] = {"heldout": cfg.heldout, "test": cfg.test}
    report["settings"]["label_job"] = _jsonable(asdict(cfg.labeling))
    test_uris = set(datasets["test"].by_uri())
    test_rows = [r for r in rows if r["uri"] in test_uris]
    model_ids = {r.get("gtformer_sha256") for r in test_rows} | {r.get("sam_model") for r in test_rows}
    report["settings"]["model_ids"] = sorted(m for m in model_ids if m)

    write_bytes_atomic(join_uri(cfg.output, "report.json"), report_json(report).encode())
    write_bytes_atomic(join_uri(cfg.output, "report.md"), report_markdown(report).encode())
    write_bytes_atomic(join_uri(cfg.output, "per_image.jsonl"), image_records_jsonl(report).encode())
    samples = datasets["test"].by_uri()
    by_uri = index_rows(test_rows)
    written = []
    counters = {"best": 0, "worst": 0}
    for kind, record in select_overlay_cases(report, cfg.overlays):
        name = overlay_name(kind, counters[kind], record["image_id"])
        counters[kind] += 1
        try:
            png = overlay_png(record, samples[record["uri"]], by_uri[record["uri"]])
            write_bytes_atomic(join_uri(cfg.output, f"overlays/{name}"), png)
            written.append(name)
        except Exception as e:  # an overlay is a courtesy, never a reason to lose the report
            log.warning("overlay of %s failed: %s", record["uri"], e)
    report["overlays"] = written
    return report
