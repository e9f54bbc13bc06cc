"""The labeling job: Ray Data from object storage to a Parquet table of boxes and masks.

    list inputs (streamed in record batches) -> rerun plan -> local spool of the inputs to label
    -> per 100,000 of them, a Ray Data dataset: read bytes (I/O tasks) -> decode (CPU tasks)
        -> Pro2SAMLabeler actors (one GPU each, GTFormer + SAM loaded once)
        -> the driver commits label files of up to --rows-per-file rows (pro2sam.output)

Before any work: options are checked, the input is found, the output's lease is taken (one
writer per output; the lease write also proves the output writable), the output's key columns
are read and the input is listed through the rerun plan, and the models are loaded once on the
driver, so a bad option, path or checkpoint ends the run with one line before Ray starts. The
driver never holds the listing: it holds the plan's compact view of the output
(:class:`~pro2sam.output.RerunPlanner`) and 20 bytes per input id.

Resumable: images already in the output are skipped, so a run killed part way and started
again labels the rest, and every input image ends up in the output exactly once. One bad image is
one error row; a killed actor is restarted by Ray and its batch retried.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..images import DEFAULT_MAX_PIXELS
from ..labels import error_row, ok_row, rows_to_table
from ..matching import MatchConfig
from ..output import COMMIT_SECONDS, ROWS_PER_FILE, LabelsOutput, LabelWriter, RerunPlanner, WriterLease
from ..candidates import CandidateConfig
from ..tuning import TunedSettings
from ..sam import DEFAULT_SAM_VARIANT, SAM_VARIANTS
from ..inputs import DEFAULT_SHARD_LABEL, INPUT_SCHEMA, is_manifest, iter_inputs
from ..storage import DEFAULT_MAX_BYTES, DEFAULT_READ_TIMEOUT_S, StorageError, location_contains
from .ray_env import ensure_ray
from .stages import decode_images, read_images, text_or_none

__all__ = [
    "Resources",
    "ReadLimits",
    "LabelingSettings",
    "LabelJobConfig",
    "LabelJobSummary",
    "JobInterrupted",
    "RowsNotWritten",
    "load_models",
    "run_label_job",
]

log = logging.getLogger("pro2sam.label")

# Model batches per block handed to Ray Data: a block is one actor task, the unit results stream
# back in and a killed actor redoes; small enough to spread over actors, large enough to batch.
_BATCHES_PER_BLOCK = 4
# Inputs per Ray Data dataset: the todo list is fed to Ray this many at a time, one dataset after
# another, so that the driver and the object store never hold millions of rows (each dataset
# starts its actors again: seconds, against hours of labeling for this many images on a GPU).
_ROWS_PER_DATASET = 100_000
# Rows per read task of a WebDataset shard's samples or a Parquet table's rows: neighbouring
# members come in one range request, and a row group (Hugging Face exports hold 100 images each)
# is read about once.
_MEMBER_READ_ROWS = 256


class RowsNotWritten(StorageError):
    """The run ended without writing all the images it had to label: its lease was taken over or
    could not be renewed, or storage refused a label file. What was committed stays; a rerun
    labels the rest. ``summary`` is what the run did, ``unwritten`` how many images it did not
    write, ``cause`` why; the command exits with :attr:`exit_status`."""

    exit_status = 3

    def __init__(self, summary: LabelJobSummary, unwritten: int, cause: Exception) -> None:
        self.summary, self.unwritten, self.cause_error = summary, unwritten, cause
        super().__init__(
            f"{unwritten} of the {unwritten + summary.ok + summary.error} images to label were not written "
            f"({cause}); the {summary.ok + summary.error} committed rows are in {summary.output}: "
            "run the same command again to label the rest"
        )


class JobInterrupted(BaseException):
    """SIGINT or SIGTERM reached the driver; ``signum`` says which.

    A ``BaseException``, as ``KeyboardInterrupt`` is: raised by the signal handler wherever the
    driver is, it must not be swallowed by a library's ``except Exception`` (Ray Data's metrics
    updates catch and log those) and leave the job running.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(kw_only=True)
class Resources:
    """What the labeling actors take from the cluster.

    Attributes:
        actors: labeling actors (default: one per GPU of the cluster, else 1); on a cluster the
            pool starts with one and grows to this many as nodes arrive.
        gpus_per_actor: GPUs pinned by each actor (default 1 when the cluster has GPUs, else 0).
        cpus_per_actor: CPUs (and torch threads) per actor (default 1 with a GPU, else 2).
        batch_size: images per model batch.
        ray_address: Ray cluster to join; default $RAY_ADDRESS, else a new local Ray.
        wait_for_resources_s: how long a run on a cluster waits for its first actor's CPUs/GPUs
            (an autoscaler adding nodes) before it gives up; a local Ray never grows, so it does
            not wait.
    """

    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    batch_size: int = 8
    ray_address: str | None = None
    wait_for_resources_s: float = 600.0

    def validate(self) -> None:
        _need(self.actors is None or self.actors >= 1, f"--actors {self.actors}: must be >= 1")
        _need(self.gpus_per_actor is None or self.gpus_per_actor >= 0, f"--gpus-per-actor {self.gpus_per_actor}: must be >= 0")
        _need(self.cpus_per_actor is None or self.cpus_per_actor > 0, f"--cpus-per-actor {self.cpus_per_actor}: must be > 0")
        _need(self.batch_size >= 1, f"--batch-size {self.batch_size}: must be >= 1")
        _need(self.wait_for_resources_s >= 0, f"--wait-for-resources {self.wait_for_resources_s}: must be >= 0")


@dataclass(kw_only=True)
class ReadLimits:
    """Per-image limits of the read and decode stages: larger or slower inputs become error rows.

    Attributes:
        max_pixels: decompression-bomb guard (pixels after decoding the header).
        max_bytes: largest file read.
        read_timeout_s: longest read of one file.
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S

    def validate(self) -> None:
        _need(self.max_pixels >= 1, f"--max-pixels {self.max_pixels}: must be >= 1")
        _need(self.max_bytes >= 1, f"--max-bytes {self.max_bytes}: must be >= 1")
        _need(self.read_timeout_s > 0, f"--read-timeout {self.read_timeout_s}: must be > 0")


@dataclass(kw_only=True)
class LabelingSettings:
    """How images are labeled: the models, the library's candidate and matching settings, the
    actors' resources and the read limits (shared by the labeling and evaluation jobs).

    Attributes:
        gtformer: GTFormer export folder (model.safetensors + config.json), local or URI.
        sam, sam_checkpoint, verify: SAM variant, its weights file (local or URI), SHA-256 check
            of official files.
        candidates: stage 2 (:class:`~pro2sam.candidates.CandidateConfig`); None: the
            defaults with the SAM variant's own filter thresholds and grid (``CandidateConfig.resolve``).
        matching: stage 3 (:class:`~pro2sam.matching.MatchConfig`).
        resources: :class:`Resources`; limits: :class:`ReadLimits`.
        confidence_calibration: a calibration file of ``pro2sam evaluate`` (``confidence.json``,
            local or URI): rows get a ``confidence`` (:mod:`pro2sam.confidence`); None: the
            calibration of ``tuned`` if it has one, else null.
        tuned: the settings file of ``pro2sam tune`` these settings were read from
            (:class:`~pro2sam.tuning.TunedSettings`; its values are already in ``candidates`` and
            ``matching``, where the command line did not override them): every row carries its
            SHA-256 (``settings_sha256``). None: no settings file.
    """

    gtformer: str
    sam: str = DEFAULT_SAM_VARIANT
    sam_checkpoint: str | None = None
    verify: bool = True
    candidates: CandidateConfig | None = None
    matching: MatchConfig = field(default_factory=MatchConfig)
    resources: Resources = field(default_factory=Resources)
    limits: ReadLimits = field(default_factory=ReadLimits)
    confidence_calibration: str | None = None
    tuned: TunedSettings | None = None

    @property
    def settings_sha256(self) -> str | None:
        return self.tuned.sha256 if self.tuned is not None else None

    def candidate_config(self) -> CandidateConfig:
        return CandidateConfig.resolve(self.sam, self.candidates)

    def validate(self) -> None:
        """Raise ValueError, naming the option, for a setting no run could use."""
        _need(self.sam in SAM_VARIANTS, f"--sam {self.sam!r}: choose one of {', '.join(sorted(SAM_VARIANTS))}")
        self.resources.validate()
        self.limits.validate()


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(kw_only=True)
class LabelJobConfig:
    """Everything a labeling run needs. Paths may be local or any fsspec URI.

    Attributes:
        input: image prefix (folder), a manifest (a .csv / .parquet file, the suffix in any case,
            with ``uri`` and optional ``label``; its images may not lie in ``output``), a
            WebDataset shard, a folder or brace pattern of shards, a Parquet table of image bytes,
            or one image file (:func:`pro2sam.inputs.iter_inputs` says how it is told).
        output: folder (prefix) the Parquet files go to; also what resumes.
        labeling: :class:`LabelingSettings`.
        run_id: written into every row of this run.
        overwrite: replace the output's label files (only those) instead of resuming.
        force: take the output's lease even if another run holds it.
        retry_errors: relabel every error row (by default only read failures are relabeled).
        relabel_changed: relabel images whose file changed (size, mtime or ETag) since; a
            manifest's files are then looked up as they are listed (a stat each, a HEAD per object).
        shard_label: the member of a WebDataset sample its label is read from (``cls``, ``txt``,
            ``json:FIELD``), None for none.
        rows_per_file, commit_seconds: a label file is committed at this many rows, or this long
            after its first row, whichever comes first; a kill loses at most the rows not yet
            committed.
        lease_ttl_s: how long the output's lease lives without a renewal (:mod:`pro2sam.lease`).
    """

    input: str
    output: str
    labeling: LabelingSettings
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8])
    overwrite: bool = False
    force: bool = False
    retry_errors: bool = False
    relabel_changed: bool = False
    shard_label: str | None = DEFAULT_SHARD_LABEL
    rows_per_file: int = ROWS_PER_FILE
    commit_seconds: float = COMMIT_SECONDS
    lease_ttl_s: float = 60.0

    def validate(self) -> None:
        self.labeling.validate()
        _need(self.rows_per_file >= 1, f"--rows-per-file {self.rows_per_file}: must be >= 1")
        _need(self.commit_seconds > 0, f"--commit-seconds {self.commit_seconds}: must be > 0")
        _need(self.lease_ttl_s > 0, f"--lease-ttl {self.lease_ttl_s}: must be > 0")
        # A manifest may sit in the output folder (it is read, never written); a folder or an image
        # may not. What the input is decides, not its name: a folder named x.csv is a folder.
        _need(
            not location_contains(self.output, self.input) or is_manifest(self.input),
            f"--output {self.output} is or contains --input {self.input}: the labels would mix with the "
            "images; choose an output outside the input",
        )


@dataclass
class LabelJobSummary:
    """What a run did. ``skipped`` images were already in the output before this run;
    ``retried``/``changed`` of the labeled ones replaced an error row / a row of an older file."""

    run_id: str
    inputs: int
    ok: int
    error: int
    skipped: int
    seconds: float
    output: str
    retried: int = 0
    changed: int = 0
    files: int = 0

    @property
    def images_per_s(self) -> float:
        return (self.ok + self.error) / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        relabeled = f" ({self.retried} errors retried, {self.changed} changed files relabeled)" if self.retried or self.changed else ""
        return (
            f"pro2sam label run {self.run_id}: {self.inputs} inputs: {self.ok} ok, {self.error} error, "
            f"{self.skipped} skipped (already labeled){relabeled}; {self.files} files written; {self.seconds:.1f} s, "
            f"{self.images_per_s:.2f} images/s; output: {self.output}"
        )


# ---------------------------------------------------------------- the models, once per actor


def load_models(settings: LabelingSettings, *, device=None):
    """The run's :class:`~pro2sam.model.Pro2SAM`, built from its settings (driver and actors alike).

    Raises:
        CheckpointError: a checkpoint is missing, corrupt or does not fit its config.
        StorageError: a remote checkpoint cannot be fetched.
    """
    from ..model import Pro2SAM
    from ..storage import fetch_to_local

    return Pro2SAM.from_checkpoints(
        fetch_to_local(settings.gtformer),
        sam=settings.sam,
        sam_checkpoint=fetch_to_local(settings.sam_checkpoint) if settings.sam_checkpoint else None,
        verify=settings.verify,
        device=device,
        candidates=settings.candidate_config(),
        matching=settings.matching,
    )


def classify_batch(model, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray] | Exception]:
    """GTFormer on a batch of images at once: (class scores, coarse map) of each, or the exception
    of an image that breaks the batch (the batch is then run one image at a time to find it)."""
    try:
        probs, coarse = model.classify(images)
        return list(zip(probs, coarse))
    except Exception:
        out: list[tuple[np.ndarray, np.ndarray] | Exception] = []
        for image in images:
            try:
                p, c = model.classify([image])
                out.append((p[0], c[0]))
            except Exception as e:
                out.append(e)
        return out


class Pro2SAMLabeler:
    """Ray Data actor: loads GTFormer and SAM once, labels batches of decoded images.

    A batch goes through the models together: GTFormer on the batch, SAM's image encoder on the
    batch (one call), then each image's grid decoding on the device while the previous image is
    matched on the CPU (:meth:`~pro2sam.model.Pro2SAM.localize_batch`). Reading and decoding the
    next batches run meanwhile in Ray Data's CPU tasks.

    Nothing here is Ray-specific beyond the calling convention (``__init__`` once, then
    ``__call__(batch) -> table``).
    """

    def __init__(self, settings: LabelingSettings, run_id: str, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.model = load_models(settings)
        self.run_id = run_id
        self.settings_sha256 = settings.settings_sha256
        self.confidence = _load_confidence(settings)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["image_id"])
        rows: list[dict | None] = [None] * n
        good = []
        for i in range(n):
            if batch["error"][i]:
                rows[i] = self._error_row(batch, i, str(batch["error"][i]), str(batch["error_kind"][i]))
            else:
                good.append(i)
        if good:
            classified = []
            for i, out in zip(good, classify_batch(self.model, [batch["image"][i] for i in good])):
                if isinstance(out, Exception):
                    rows[i] = self._failed(batch, i, out)
                else:
                    classified.append((i, *out))
            finite = []
            for i, p, c in classified:
                if np.all(np.isfinite(np.asarray(p, dtype=np.float64))):
                    finite.append((i, p, c))
                else:
                    rows[i] = self._failed(batch, i, ValueError("GTFormer gave non-finite class scores"))
            for i, result in self._localize(batch, finite):
                if isinstance(result, Exception):
                    rows[i] = self._failed(batch, i, result)
                else:
                    rows[i] = ok_row(
                        str(batch["image_id"][i]), str(batch["uri"][i]), text_or_none(batch["label"][i]), result,
                        model_ids=self.model.model_ids, run_id=self.run_id,
                        source_fingerprint=text_or_none(batch["source_fingerprint"][i]),
                        settings_sha256=self.settings_sha256,
                    )  # fmt: skip
        table = rows_to_table(rows)
        return self.confidence.fill(table) if self.confidence is not None else table

    def _localize(self, batch: dict[str, np.ndarray], classified: list) -> list[tuple[int, object]]:
        """SAM and matching of the classified images: (i, result or the exception it raised).
        The whole batch at once (one image-encoder call); if it fails, image by image, so that
        one bad image is one error row."""
        if not classified:
            return []
        index, probs, coarse = zip(*classified)
        labels = [text_or_none(batch["label"][i]) for i in index]
        try:
            results = self.model.localize_batch([batch["image"][i] for i in index], probs, coarse, labels=labels)
            return list(zip(index, results))
        except Exception:
            pass
        out = []
        for i, p, c, label in zip(index, probs, coarse, labels):
            try:
                out.append((i, self.model.localize(batch["image"][i], p, c, label=label)))
            except Exception as e:
                out.append((i, e))
        return out

    def _error_row(self, batch: dict[str, np.ndarray], i: int, error: str, kind: str, **size) -> dict:
        return error_row(
            str(batch["image_id"][i]), str(batch["uri"][i]), text_or_none(batch["label"][i]), error, kind=kind,
            run_id=self.run_id, model_ids=self.model.model_ids,
            source_fingerprint=text_or_none(batch["source_fingerprint"][i]), settings_sha256=self.settings_sha256,
            **size,
        )  # fmt: skip

    def _failed(self, batch: dict[str, np.ndarray], i: int, e: Exception) -> dict:
        from ..model import ImageShapeError

        h, w = batch["image"][i].shape[:2]
        kind = "image" if isinstance(e, ImageShapeError) else "model"
        return self._error_row(batch, i, f"labeling failed: {type(e).__name__}: {e}", kind, width=w, height=h)


def _load_confidence(settings: LabelingSettings, model_ids: dict[str, str] | None = None):
    """The run's :class:`~pro2sam.confidence.ConfidenceModel` (its calibration file, else its
    settings file's calibration), or None; with ``model_ids``, warn when it was fitted on other
    models' scores."""
    from ..confidence import ConfidenceModel

    if settings.confidence_calibration:
        calibration, source = ConfidenceModel.load(settings.confidence_calibration), settings.confidence_calibration
    elif settings.tuned is not None and settings.tuned.confidence is not None:
        calibration, source = ConfidenceModel.from_dict(settings.tuned.confidence), settings.tuned.source
    else:
        return None
    if model_ids and calibration.model_ids and set(calibration.model_ids) != set(model_ids.values()):
        log.warning(
            "the confidence calibration %s was fitted on the scores of other models (%s): its confidences "
            "may not hold for these", source, ", ".join(calibration.model_ids),
        )  # fmt: skip
    return calibration


# ---------------------------------------------------------------- the job


def _resources(cfg: Resources, ray, *, local: bool) -> tuple[int, float, float]:
    """(actors, GPUs per actor, CPUs per actor) for this cluster, waiting for an autoscaler to
    add what is missing (not on a local Ray, which never grows).

    Raises:
        ValueError: the cluster cannot give what the settings ask for.
    """
    cluster = ray.cluster_resources()
    cluster_gpus = cluster.get("GPU", 0)
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1 if cluster_gpus else 0)
    actors = cfg.actors or (max(1, int(cluster_gpus // gpus)) if gpus and cluster_gpus else 1)
    cpus = cfg.cpus_per_actor if cfg.cpus_per_actor is not None else (1 if gpus else 2)
    # The actors' CPUs plus one for reading and decoding, or the pipeline starves. A local Ray
    # must fit every actor; a cluster must fit one to start, and the actor pool grows with it.
    starting = actors if local else 1
    if cfg.cpus_per_actor is None and not gpus and starting * cpus + 1 > cluster.get("CPU", 0) >= starting + 1:
        # A CPU actor's default (2) fitted to a small machine or cluster rather than waited for:
        # what --cpus-per-actor 1 would do at once.
        cpus = float(int((cluster["CPU"] - 1) // starting))
        log.info("the cluster has %g CPUs: %g CPU(s) per labeling actor (--cpus-per-actor to choose)", cluster["CPU"], cpus)
    need = {"CPU": starting * cpus + 1, "GPU": starting * gpus}
    if not gpus and not cluster_gpus and cfg.gpus_per_actor is None and not local:
        log.warning(
            "the cluster has no GPU now: labeling with %d CPU actor(s). On an autoscaling GPU cluster pass "
            "--gpus-per-actor 1 --actors N, so that the job asks for the GPU nodes", actors,
        )  # fmt: skip

    def missing() -> dict[str, float]:
        have = ray.cluster_resources()
        return {k: v for k, v in need.items() if v > have.get(k, 0)}

    def explain(lack: dict[str, float]) -> str:
        have = ray.cluster_resources()
        parts = [f"{need[k]:g} {k} (the cluster has {have.get(k, 0):g})" for k in lack]
        return (
            f"{'--actors ' + str(actors) if local else 'one actor'} x (--cpus-per-actor {cpus:g}, --gpus-per-actor "
            f"{gpus:g}) plus 1 CPU for decoding needs {' and '.join(parts)}"
        )

    lack = missing()
    if lack and (local or cfg.wait_for_resources_s == 0):
        where = "this machine's Ray" if local else "the cluster"
        raise ValueError(f"{explain(lack)}: {where} cannot run it; ask for fewer actors or resources")
    if lack:
        from ray.autoscaler.sdk import request_resources

        bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        request_resources(bundles=[bundle] * actors)
        log.warning("%s; asked the autoscaler, waiting up to %.0f s", explain(lack), cfg.wait_for_resources_s)
        deadline = time.monotonic() + cfg.wait_for_resources_s
        next_note = time.monotonic() + 30
        while (lack := missing()) and time.monotonic() < deadline:
            time.sleep(1.0)
            if time.monotonic() > next_note:
                log.warning("still waiting for resources: %s", explain(lack))
                next_note += 30
        if lack:
            raise ValueError(
                f"{explain(lack)}, and it did not grow in {cfg.wait_for_resources_s:.0f} s "
                "(--wait-for-resources): ask for fewer actors or resources, or check the autoscaler's node types"
            )
    return actors, gpus, cpus


def run_label_job(cfg: LabelJobConfig) -> LabelJobSummary:
    """Label every input image not yet in ``cfg.output``; return what was done.

    Raises:
        ValueError: an option no run could use, output inside the input, a malformed manifest
            or one naming images in the output, resources the cluster cannot give.
        CheckpointError: a checkpoint that cannot be loaded (found on the driver, before Ray).
        StorageError: input or output storage cannot be reached or written; another run holds
            the output (:class:`~pro2sam.output.OutputBusy`).
        RowsNotWritten: labeling went on but not every image could be committed (the lease was
            taken over or lost, storage refused a file); its ``summary`` says what was written.
        JobInterrupted: SIGINT/SIGTERM (as raised by the caller's handler); committed rows stay.
    """
    start = time.perf_counter()
    cfg.validate()
    output = LabelsOutput(cfg.output)
    # The input is checked here, listed below; fingerprints of a manifest's files only to compare them.
    listing = iter_inputs(
        cfg.input, exclude_prefix=cfg.output, fingerprints=cfg.relabel_changed, shard_label=cfg.shard_label
    )
    with WriterLease(output, cfg.run_id, ttl_s=cfg.lease_ttl_s, force=cfg.force) as lease, _TodoSpool() as todo:
        if lease.displaced:  # let a commit the displaced run had in flight land before the output is read
            log.warning("waiting %.0f s for run %s to stop writing", lease.ttl_s / 4, lease.displaced)
            time.sleep(lease.ttl_s / 4)
        output.remove_temporaries()
        done = None if cfg.overwrite else output.scan(RerunPlanner.columns(relabel_changed=cfg.relabel_changed))
        planner = RerunPlanner(done, retry_errors=cfg.retry_errors, relabel_changed=cfg.relabel_changed)
        listed = 0
        for batch in listing:  # the listing streams through the plan into the spool
            listed += batch.num_rows
            todo.add(planner.decide(batch))
        drops = planner.drops()
        log.info(
            "%d inputs: %d already labeled, %d to label (%d errors retried, %d changed)",
            listed, planner.skipped, todo.rows, planner.retried, planner.changed,
        )  # fmt: skip
        summary = LabelJobSummary(
            cfg.run_id, listed, 0, 0, planner.skipped, 0.0, cfg.output, retried=planner.retried, changed=planner.changed
        )
        if todo.rows == 0 and not drops:
            summary.seconds = time.perf_counter() - start
            return summary
        resources = cfg.labeling.resources
        if todo.rows:  # a bad checkpoint or calibration ends the run here, before Ray
            _load_confidence(cfg.labeling, load_models(cfg.labeling, device="cpu").model_ids)
        local = not (resources.ray_address or os.environ.get("RAY_ADDRESS"))
        ray = None
        if todo.rows:
            already = _ray_initialized()
            cpus_needed = (resources.actors or 1) * (resources.cpus_per_actor or 2) + 1
            ray = ensure_ray(resources.ray_address, cpus_needed=cpus_needed)
            actors, gpus, cpus = _resources(resources, ray, local=local and not already)
        # Only now, with inputs listed, models loaded and resources there, change the output.
        if cfg.overwrite:
            removed = output.delete_label_files()
            log.info("--overwrite: removed %d label files of earlier runs", removed)
        elif drops:
            dropped = output.drop_rows(drops)
            log.info("removed %d rows to relabel or duplicated from the output", dropped)
        writer = LabelWriter(
            output, cfg.run_id, lease=lease, rows_per_file=cfg.rows_per_file, commit_seconds=cfg.commit_seconds
        )
        failure: Exception | None = None
        try:
            for chunk in todo.chunks(_ROWS_PER_DATASET):
                for table in _label_stream(ray, cfg, chunk, actors, gpus, cpus):
                    writer.add(table)
        except StorageError as e:  # a commit refused: the lease was taken or storage failed
            failure = e
        finally:
            try:
                writer.commit()  # what was labeled stays, also when the run is interrupted
            except Exception as e:
                log.warning("could not commit the last %d rows: %s", writer.pending_rows, e)
                failure = failure or e
            summary.ok, summary.error, summary.files = writer.ok, writer.error, len(writer.files)
            summary.seconds = time.perf_counter() - start
        if failure is not None:
            raise RowsNotWritten(summary, todo.rows - writer.ok - writer.error, failure)
        if lease.displaced:
            _remove_rows_written_twice(output, lease)
    summary.seconds = time.perf_counter() - start
    return summary


def _remove_rows_written_twice(output: LabelsOutput, lease: WriterLease) -> None:
    """After a run that took the lease from a live run (``--force``): drop the rows of images
    written twice (a commit the displaced run had in flight), so that readers that count rows
    (DuckDB over ``*.parquet``) never count one twice."""
    planner = RerunPlanner(output.scan(RerunPlanner.columns()))
    if planner.duplicates:
        lease.check()
        dropped = output.drop_rows(planner.drops())
        log.warning("removed %d rows that the run %s wrote as well", dropped, lease.displaced)


class _TodoSpool:
    """The inputs still to label, spooled to an unnamed local temporary Parquet file (removed
    when closed, or by the kernel when the driver is killed): the driver holds none of them."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="pro2sam-todo-")
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    def add(self, batch: pa.RecordBatch) -> None:
        if not batch.num_rows:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._file, INPUT_SCHEMA, compression="zstd")
        self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def chunks(self, rows: int) -> Iterator[pa.Table]:
        """The spooled inputs in order, ``rows`` at a time."""
        if self._writer is None:
            return
        self._writer.close()
        self._file.seek(0)
        for batch in pq.ParquetFile(self._file).iter_batches(batch_size=rows):
            yield pa.Table.from_batches([batch])

    def __enter__(self) -> _TodoSpool:
        return self

    def __exit__(self, *exc) -> None:
        if self._writer is not None:
            self._writer.close()
        self._file.close()


def _ray_initialized() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _label_stream(ray, cfg: LabelJobConfig, todo: pa.Table, actors: int, gpus: float, cpus: float):
    """The Ray Data pipeline over ``todo`` (one chunk of the inputs); yields label tables as the
    actors finish them."""
    batch_size, limits = cfg.labeling.resources.batch_size, cfg.labeling.limits
    rows = _BATCHES_PER_BLOCK * batch_size
    blocks = [todo.slice(i, rows) for i in range(0, len(todo), rows)]
    ds = ray.data.from_arrow(blocks)
    # The rows of one shard or table of images are read together: more of them per read task.
    held = todo.column("container_kind").null_count < len(todo)
    ds = ds.map_batches(
        read_images,
        batch_format="numpy",
        batch_size=_MEMBER_READ_ROWS if held else batch_size,
        num_cpus=0.25,
        fn_kwargs={"max_bytes": limits.max_bytes, "timeout_s": limits.read_timeout_s},
    )
    ds = ds.map_batches(
        decode_images, batch_format="numpy", batch_size=batch_size, fn_kwargs={"max_pixels": limits.max_pixels}
    )
    ds = ds.map_batches(
        Pro2SAMLabeler,
        fn_constructor_kwargs={"settings": cfg.labeling, "run_id": cfg.run_id, "threads": cpus},
        batch_format="numpy",
        batch_size=batch_size,
        concurrency=actors if actors == 1 else (1, actors),  # the pool grows as an autoscaler adds nodes
        num_gpus=gpus,
        num_cpus=cpus,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield batch
