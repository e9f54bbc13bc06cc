"""The evaluation job: label a held-out and a test split with the labeling job, then score them.

    dataset spec -> manifest (Parquet) -> run_label_job (Ray Data, resumable) -> labels Parquet
        [-> a separate classifier's top-k classes of the test images (Ray Data, one actor)]
        -> join with GT on uri -> pro2sam.evaluation (thresholds from held-out) -> pro2sam.report

With ``classifier`` set (``pro2sam evaluate --classifier``), Top-1 / Top-5 Cls and Loc take their
classes from that classifier, as the paper's Table 1 takes EfficientNet-B7's, while GTFormer + SAM
still give every box; the report names the classifier and keeps GTFormer's own classes beside.
Only the test images are classified: no held-out choice depends on classes.

Output folder (local or any fsspec URI)::

    manifests/inputs.parquet           what was labeled: both splits, one labeling run
    labels/*.parquet                   the labeling job's output (a rerun resumes it)
    report.json                        every number and setting
    report.md                          the Table-1 layout
    per_image.jsonl                    one record per test image
    overlays/*.png                     best and worst test cases
    confidence.json                    the confidence calibration, fitted on the held-out split
    risk_coverage.png                  GT-known Loc of the most confident share of the test images

Once calibrated, the confidence column of ``labels/`` is filled (each label file rewritten whole,
under the output's lease), so the QA report and the review queue can use it; give
``confidence.json`` to ``pro2sam label --confidence-calibration`` for new tables.

Predictions go through the same Ray Data path as labeling, so cluster evaluation is the labeling
job plus a driver-side pass over its Parquet output.
"""

from __future__ import annotations

import io
import logging
import posixpath
import uuid
from dataclasses import asdict, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..classifier import Classifier, ClassifierConfig
from ..confidence import ConfidenceModel
from ..datasets import WSOLDataset, open_dataset
from ..evaluation import EvaluationReport, evaluate_with_heldout, index_rows
from ..gtformer import gtformer_class_names
from ..labels import LABEL_SCHEMA
from ..output import LabelsOutput, WriterLease
from ..plots import risk_coverage_png
from ..report import image_records_jsonl, overlay_name, overlay_png, report_json, report_markdown, select_overlay_cases
from ..storage import fetch_to_local, join_uri, write_bytes_atomic
from .label_job import run_label_job
from .ray_env import join_ray
from .settings import EvaluateJobConfig
from .stages import decoded_images

__all__ = ["run_evaluate_job"]

log = logging.getLogger("pro2sam.evaluate")

ROLES = ("heldout", "test")


def _check_classes(num_classes: int, class_names: list[str], what: str) -> None:
    if num_classes != len(class_names):
        log.warning(
            "%s has %d classes, the data set %d: class indices are compared as they are",
            what, num_classes, len(class_names),
        )  # fmt: skip


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


class ClassScorer:
    """Ray Data actor: loads the classifier once, gives each decoded image its top-k classes.

    Maps a batch of :func:`~pro2sam.pipeline.stages.decode_images` to a table of ``uri``,
    ``topk_classes``, ``topk_scores`` (null for an image that could not be read, decoded or
    classified) and ``error``.
    """

    def __init__(self, config: ClassifierConfig, threads: float | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.classifier = _load_classifier(config)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = [str(e) if e else None for e in batch["error"]]
        good = [i for i, e in enumerate(errors) if not e]
        results: dict[int, tuple[list[int], list[float]]] = {}
        try:
            top, prob = self.classifier.topk([batch["image"][i] for i in good])
            results = {i: (top[j].tolist(), prob[j].tolist()) for j, i in enumerate(good)}
        except Exception:  # isolate the image that breaks the batch
            for i in good:
                try:
                    top, prob = self.classifier.topk([batch["image"][i]])
                    results[i] = (top[0].tolist(), prob[0].tolist())
                except Exception as e:
                    errors[i] = f"classifier failed: {type(e).__name__}: {e}"
        none = (None, None)
        return pa.table({
            "uri": [str(u) for u in batch["uri"]],
            "topk_classes": pa.array([results.get(i, none)[0] for i in range(len(errors))], pa.list_(pa.int32())),
            "topk_scores": pa.array([results.get(i, none)[1] for i in range(len(errors))], pa.list_(pa.float32())),
            "error": pa.array(errors, pa.string()),
        })  # fmt: skip


def _load_classifier(config: ClassifierConfig, *, device=None) -> Classifier:
    """The classifier of ``config``, its weights fetched first when they are remote."""
    return Classifier.load(replace(config, checkpoint=str(fetch_to_local(config.checkpoint))), device=device)


def _classify(cfg: EvaluateJobConfig, dataset: WSOLDataset) -> dict[str, list[int]]:
    """The classifier's top-k classes of every image of ``dataset`` (uri -> classes, best first),
    through the labeling job's read and decode stages and one :class:`ClassScorer` actor (its
    resources those of a labeling actor: :meth:`~pro2sam.pipeline.settings.Resources.resolve`).
    Images it could not classify are left out (no class right) and logged."""
    resources = replace(cfg.labeling.resources, actors=1)
    batch_size = cfg.classifier.batch_size
    cluster = join_ray(resources.ray_address, cpus_needed=resources.local_cpus)
    actor = resources.resolve(cluster, what="classifier")
    uris = list(dict.fromkeys(s.uri for s in dataset.samples))
    todo = pa.table({"uri": uris, "input_error": pa.nulls(len(uris), pa.string()),
                     "source_fingerprint": pa.nulls(len(uris), pa.string())})  # fmt: skip
    ds = decoded_images(cluster.ray, todo, cfg.labeling.limits, batch_size=batch_size)
    ds = ds.map_batches(
        ClassScorer, fn_constructor_kwargs={"config": cfg.classifier, "threads": actor.cpus_per_actor},
        batch_format="numpy", batch_size=batch_size, concurrency=actor.concurrency,
        num_gpus=actor.gpus_per_actor, num_cpus=actor.cpus_per_actor,
    )  # fmt: skip
    classes, failed = {}, []
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in table.to_pylist():
            if row["topk_classes"] is None:
                failed.append(f"{row['uri']}: {row['error']}")
            else:
                classes[row["uri"]] = row["topk_classes"]
    if failed:
        log.warning("the classifier gave no classes for %d images (counted wrong), e.g. %s", len(failed), failed[0])
    return classes


def _write_confidence(cfg: EvaluateJobConfig, confidence: dict) -> None:
    """The calibration file, the risk-coverage plot, and the confidence column of the labels."""
    model = ConfidenceModel.from_dict(confidence["calibration"])
    model.save(join_uri(cfg.output, "confidence.json"))
    test = confidence["test"]
    auroc = "-" if test["auroc"] is None else f"{test['auroc']:.3f}"
    title = f"confidence fitted on {model.fitted_on}; test: {test['num_images']} images, AUROC {auroc}"
    png = risk_coverage_png(test["curve"]["coverage"], test["curve"]["gt_known_loc"], marks=test["risk_coverage"], title=title)
    write_bytes_atomic(join_uri(cfg.output, "risk_coverage.png"), png)
    output = LabelsOutput(cfg.label_config().output)
    with WriterLease(output, f"evaluate-confidence-{uuid.uuid4().hex[:8]}"):
        for path in output.label_files():
            with output.fs.open(path, "rb") as f:
                table = model.fill(pq.read_table(f))
            if table.column_names == LABEL_SCHEMA.names:
                table = table.cast(LABEL_SCHEMA)
            output.commit(table, posixpath.basename(path))


def run_evaluate_job(cfg: EvaluateJobConfig) -> EvaluationReport:
    """Label both splits (resuming), evaluate, write the report files; return the report.

    Raises:
        DatasetError: malformed data-set metadata.
        StorageError: storage cannot be reached.
        ValueError: the held-out and test specs are the same, or held-out has no boxes or masks.
    """
    if cfg.heldout == cfg.test:
        raise ValueError("the held-out split must differ from the test split (thresholds are never tuned on test)")
    classifier = None
    if cfg.classifier is not None:  # a bad name or checkpoint ends the run here, before any labeling
        classifier = _load_classifier(cfg.classifier, device="cpu")
    datasets = {"heldout": open_dataset(cfg.heldout), "test": open_dataset(cfg.test)}
    rows = _label_splits(cfg, datasets)
    classes = None
    if classifier is not None:
        classes = _classify(cfg, datasets["test"])
        _check_classes(classifier.description["num_classes"], datasets["test"].class_names, "the classifier")
    report = evaluate_with_heldout(
        datasets["heldout"], rows, datasets["test"], rows, cam_curve_interval=cfg.cam_curve_interval,
        test_classes=classes, classes_from=None if classifier is None else str(classifier),
    )  # fmt: skip
    model_classes = gtformer_class_names(cfg.labeling.gtformer)
    report.settings["class_names_match"] = model_classes == datasets["test"].class_names
    if model_classes is not None:
        _check_classes(len(model_classes), datasets["test"].class_names, "GTFormer")
    report.settings["classifier"] = None if classifier is None else classifier.description
    report.settings["specs"] = {"heldout": cfg.heldout, "test": cfg.test}
    report.settings["label_job"] = _jsonable(asdict(cfg.labeling))
    if cfg.labeling.tuned is not None:  # the file's name and hash, not its whole table
        report.settings["label_job"]["tuned"] = {"source": cfg.labeling.tuned.source, "sha256": cfg.labeling.tuned.sha256}
    test_uris = set(datasets["test"].by_uri())
    test_rows = [r for r in rows if r["uri"] in test_uris]
    model_ids = {r.get("gtformer_sha256") for r in test_rows} | {r.get("sam_model") for r in test_rows}
    report.settings["model_ids"] = sorted(m for m in model_ids if m)

    write_bytes_atomic(join_uri(cfg.output, "report.json"), report_json(report).encode())
    write_bytes_atomic(join_uri(cfg.output, "report.md"), report_markdown(report).encode())
    write_bytes_atomic(join_uri(cfg.output, "per_image.jsonl"), image_records_jsonl(report).encode())
    if report.confidence:
        _write_confidence(cfg, report.confidence)
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
    report.overlays = written
    return report
