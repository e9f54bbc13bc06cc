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
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..labels import error_row, ok_row, rows_to_table
from ..output import LabelsOutput, LabelWriter, RerunPlanner, WriterLease
from ..inputs import INPUT_SCHEMA, iter_inputs
from ..storage import StorageError
from .ray_env import RayCluster, join_ray
from .settings import ActorResources, LabelingSettings, LabelJobConfig
from .stages import decoded_images, text_or_none

__all__ = [
    "LabelJobSummary",
    "JobInterrupted",
    "RowsNotWritten",
    "load_models",
    "run_label_job",
]

log = logging.getLogger("pro2sam.label")

# Inputs per Ray Data dataset: the todo list is fed to Ray this many at a time, one dataset after
# another, so that the driver and the object store never hold millions of rows (each dataset
# starts its actors again: seconds, against hours of labeling for this many images on a GPU).
_ROWS_PER_DATASET = 100_000


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
        cluster = actors = None
        if todo.rows:
            cluster = join_ray(resources.ray_address, cpus_needed=resources.local_cpus)
            actors = resources.resolve(cluster)
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
                for table in _label_stream(cluster, cfg, chunk, actors):
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


def _label_stream(cluster: RayCluster, cfg: LabelJobConfig, todo: pa.Table, actors: ActorResources):
    """The Ray Data pipeline over ``todo`` (one chunk of the inputs); yields label tables as the
    actors finish them."""
    batch_size = cfg.labeling.resources.batch_size
    ds = decoded_images(cluster.ray, todo, cfg.labeling.limits, batch_size=batch_size)
    ds = ds.map_batches(
        Pro2SAMLabeler,
        fn_constructor_kwargs={"settings": cfg.labeling, "run_id": cfg.run_id, "threads": actors.cpus_per_actor},
        batch_format="numpy",
        batch_size=batch_size,
        concurrency=actors.concurrency,  # the pool grows as an autoscaler adds nodes
        num_gpus=actors.gpus_per_actor,
        num_cpus=actors.cpus_per_actor,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield batch
