"""The labeling job: Ray Data from object storage to a Parquet table of boxes and masks.

    list inputs -> read bytes (I/O tasks) -> decode (CPU tasks)
        -> Pro2SAMLabeler actors (one GPU each, GTFormer + SAM loaded once)
        -> the driver commits label files of up to --rows-per-file rows (pro2sam.output)

Before any work: options are checked, the input is listed, the output's lease is taken (one
writer per output; the lease write also proves the output writable) and the models are loaded
once on the driver, so a bad option, path or checkpoint ends the run with one line before Ray
starts. Resumable: images already in the output are skipped, so a run killed part way and started
again labels the rest, and every input image ends up in the output exactly once. One bad image is
one error row; a killed actor is restarted by Ray and its batch retried.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import pyarrow as pa

from ..images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from ..labels import error_row, ok_row, rows_to_table
from ..output import LabelsOutput, LabelWriter, WriterLease, plan_rerun
from ..storage import (
    DEFAULT_MAX_BYTES,
    DEFAULT_READ_TIMEOUT_S,
    MANIFEST_SUFFIXES,
    InputError,
    StorageError,
    list_inputs,
    location_contains,
    read_file,
)
from .ray_env import ensure_ray

__all__ = [
    "LabelingSettings",
    "LabelJobConfig",
    "add_labeling_arguments",
    "labeling_settings_from_args",
    "LabelJobSummary",
    "JobInterrupted",
    "run_label_job",
    "add_label_arguments",
    "main",
]

log = logging.getLogger("pro2sam.label")

# Model batches per block handed to Ray Data: a block is one actor task, the unit results stream
# back in and a killed actor redoes; small enough to spread over actors, large enough to batch.
_BATCHES_PER_BLOCK = 4
_NO_IMAGE = np.zeros((1, 1, 3), dtype=np.uint8)


class JobInterrupted(Exception):
    """SIGINT or SIGTERM reached the driver; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(kw_only=True)
class LabelingSettings:
    """Models, candidate settings and resources of a labeling run (shared with evaluation).

    Attributes:
        gtformer: GTFormer export folder (model.safetensors + config.json), local or URI.
        sam, sam_checkpoint, verify: SAM variant, its weights file, SHA-256 check of official files.
        mode, points_per_side, prune: candidate path, grid size, grid pruning by the coarse map.
        pred_iou_thresh, stability_score_thresh: SAM's filtering (None: the variant's defaults,
            ``SamAutomaticMaskGenerator``'s or, for the shipped "synthetic" SAM,
            :meth:`pro2sam.candidates.CandidateConfig.for_variant`).
        actors: labeling actors (default: one per GPU of the cluster, else 1).
        gpus_per_actor: GPUs pinned by each actor (default 1 when the cluster has GPUs, else 0).
        cpus_per_actor: CPUs (and torch threads) per actor (default 1 with a GPU, else 2).
        batch_size: images per model batch.
        overwrite: replace the output's label files (only those) instead of resuming.
        max_pixels: images larger than this become error rows (decompression-bomb guard).
        ray_address: Ray cluster to join; default $RAY_ADDRESS, else a new local Ray.
    """

    gtformer: str
    sam: str = "vit_h"
    sam_checkpoint: str | None = None
    verify: bool = True
    mode: str = "fast"
    points_per_side: int = 32
    prune: bool = False
    pred_iou_thresh: float | None = None
    stability_score_thresh: float | None = None
    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    batch_size: int = 8
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    ray_address: str | None = None

    def labeling_settings(self) -> dict:
        """These settings alone, as keyword arguments for another settings holder."""
        return {f.name: getattr(self, f.name) for f in fields(LabelingSettings)}

    def validate(self) -> None:
        """Raise ValueError, naming the option, for a setting no run could use."""
        from ..sam import SAM_VARIANTS

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.sam in SAM_VARIANTS, f"--sam {self.sam!r}: choose one of {', '.join(sorted(SAM_VARIANTS))}")
        need(self.mode in ("fast", "exact"), f"--mode {self.mode!r}: choose fast or exact")
        need(1 <= self.points_per_side <= 256, f"--points-per-side {self.points_per_side}: must be 1..256")
        for name in ("pred_iou_thresh", "stability_score_thresh"):
            value = getattr(self, name)
            need(value is None or 0.0 <= value <= 1.0, f"--{name.replace('_', '-')} {value}: must be in [0, 1]")
        need(self.actors is None or self.actors >= 1, f"--actors {self.actors}: must be >= 1")
        need(self.gpus_per_actor is None or self.gpus_per_actor >= 0, f"--gpus-per-actor {self.gpus_per_actor}: must be >= 0")
        need(self.cpus_per_actor is None or self.cpus_per_actor > 0, f"--cpus-per-actor {self.cpus_per_actor}: must be > 0")
        need(self.batch_size >= 1, f"--batch-size {self.batch_size}: must be >= 1")
        need(self.max_pixels >= 1, f"--max-pixels {self.max_pixels}: must be >= 1")


@dataclass(kw_only=True)
class LabelJobConfig(LabelingSettings):
    """Everything a labeling run needs. Paths may be local or any fsspec URI.

    Attributes:
        input: image prefix, or a manifest (.csv / .parquet with ``uri`` and optional ``label``).
        output: folder (prefix) the Parquet files go to; also what resumes.
        run_id: written into every row of this run.
        force: take the output's lease even if another run holds it.
        retry_errors: relabel every error row (by default only read failures are relabeled).
        relabel_changed: relabel images whose file changed (size, mtime or ETag) since.
        rows_per_file, commit_seconds: a label file is committed at this many rows, or this long
            after its first row, whichever comes first; a kill loses at most the rows not yet
            committed.
        max_bytes, read_timeout_s: per-image read limits (larger or slower: an error row).
        wait_for_resources_s: how long a run on a cluster waits for the actors' CPUs/GPUs (an
            autoscaler adding nodes) before it gives up; a local Ray never grows, so it does not wait.
        lease_ttl_s: how long the output's lease lives without a heartbeat.
        The rest: :class:`LabelingSettings`.
    """

    input: str
    output: str
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8])
    force: bool = False
    retry_errors: bool = False
    relabel_changed: bool = False
    rows_per_file: int = 10_000
    commit_seconds: float = 300.0
    max_bytes: int = DEFAULT_MAX_BYTES
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    wait_for_resources_s: float = 600.0
    lease_ttl_s: float = 60.0

    def validate(self) -> None:
        super().validate()
        for name in ("rows_per_file", "max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        for name in ("commit_seconds", "read_timeout_s", "lease_ttl_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_s', '').replace('_', '-')} {getattr(self, name)}: must be > 0")
        if self.wait_for_resources_s < 0:
            raise ValueError(f"--wait-for-resources {self.wait_for_resources_s}: must be >= 0")
        # A manifest may sit in the output folder (it is read, never written); a folder may not.
        if not self.input.endswith(MANIFEST_SUFFIXES) and location_contains(self.output, self.input):
            raise ValueError(
                f"--output {self.output} is or contains --input {self.input}: the labels would mix with the "
                "images; choose an output outside the input"
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


# ---------------------------------------------------------------- pipeline stages (Ray Data UDFs)


def read_images(
    batch: dict[str, np.ndarray],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    threads: int = 8,
) -> dict[str, np.ndarray]:
    """I/O stage: add the encoded bytes of each image; a failed read fills ``error`` and ``error_kind``."""
    uris = list(batch["uri"])

    def fetch(i: int) -> tuple[bytes, str, str | None, str | None]:
        listed_error, fingerprint = batch["input_error"][i], batch["source_fingerprint"][i]
        fingerprint = fingerprint if isinstance(fingerprint, str) else None
        if isinstance(listed_error, str) and listed_error:
            return b"", listed_error, "input", fingerprint
        try:
            data, read_fingerprint = read_file(uris[i], max_bytes=max_bytes, timeout_s=timeout_s)
            return data, "", None, fingerprint or read_fingerprint
        except FileNotFoundError:
            return b"", f"not found: {uris[i]}", "read", fingerprint
        except InputError as e:
            return b"", str(e), "input", fingerprint
        except StorageError as e:
            return b"", f"read failed: {e}", "read", fingerprint

    with ThreadPoolExecutor(max_workers=min(threads, max(1, len(uris)))) as pool:
        fetched = list(pool.map(fetch, range(len(uris))))
    batch["data"] = _object_array([d for d, _, _, _ in fetched])
    batch["error"] = _object_array([e for _, e, _, _ in fetched])
    batch["error_kind"] = _object_array([k for _, _, k, _ in fetched])
    batch["source_fingerprint"] = _object_array([f for _, _, _, f in fetched])
    return batch


def decode_images(batch: dict[str, np.ndarray], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
    """CPU stage: bytes -> (H, W, 3) uint8 RGB with EXIF orientation applied, or an error."""
    images, errors, kinds = [], [], []
    for data, error, kind in zip(batch["data"], batch["error"], batch["error_kind"]):
        if error:
            images.append(_NO_IMAGE)
            errors.append(error)
            kinds.append(kind)
            continue
        try:
            images.append(decode_image(data, max_pixels=max_pixels))
            errors.append("")
            kinds.append(None)
        except ImageDecodeError as e:
            images.append(_NO_IMAGE)
            errors.append(str(e))
            kinds.append("image")
    out = {k: v for k, v in batch.items() if k != "data"}
    out["image"] = _object_array(images)
    out["error"] = _object_array(errors)
    out["error_kind"] = _object_array(kinds)
    return out


def _text(value) -> str | None:
    """Ray hands an all-null string column over as float NaN: normalise to str or None."""
    return value if isinstance(value, str) else None


def _object_array(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def load_models(cfg: LabelingSettings, *, device=None):
    """The run's :class:`~pro2sam.model.Pro2SAM`, built from its settings (driver and actors alike).

    Raises:
        CheckpointError: a checkpoint is missing, corrupt or does not fit its config.
        StorageError: a remote checkpoint cannot be fetched.
    """
    from ..matching import MatchConfig
    from ..model import Pro2SAM
    from ..candidates import CandidateConfig
    from ..storage import fetch_to_local

    candidates = CandidateConfig.for_variant(
        cfg.sam,
        mode=cfg.mode,
        points_per_side=cfg.points_per_side,
        prune_with_coarse_map=cfg.prune,
        pred_iou_thresh=cfg.pred_iou_thresh,
        stability_score_thresh=cfg.stability_score_thresh,
    )
    return Pro2SAM.from_checkpoints(
        fetch_to_local(cfg.gtformer),
        sam=cfg.sam,
        sam_checkpoint=fetch_to_local(cfg.sam_checkpoint) if cfg.sam_checkpoint else None,
        verify=cfg.verify,
        device=device,
        candidates=candidates,
        matching=MatchConfig(),
    )


class Pro2SAMLabeler:
    """Ray Data actor: loads GTFormer and SAM once, labels batches of decoded images.

    Nothing here is Ray-specific beyond the calling convention (``__init__`` once, then
    ``__call__(batch) -> table``).
    """

    def __init__(self, config: dict, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(max(1, int(threads)))
        cfg = LabelJobConfig(**config)
        self.model = load_models(cfg)
        self.run_id = cfg.run_id

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
            try:
                probs, coarse = self.model.classify([batch["image"][i] for i in good])
                classified = list(zip(good, probs, coarse))
            except Exception:  # isolate the image that breaks the batch
                classified = []
                for i in good:
                    try:
                        p, c = self.model.classify([batch["image"][i]])
                        classified.append((i, p[0], c[0]))
                    except Exception as e:
                        rows[i] = self._failed(batch, i, e)
            for i, p, c in classified:
                if not np.all(np.isfinite(np.asarray(p, dtype=np.float64))):
                    rows[i] = self._failed(batch, i, ValueError("GTFormer gave non-finite class scores"))
                    continue
                try:
                    result = self.model.localize(batch["image"][i], p, c, label=_text(batch["label"][i]))
                    rows[i] = ok_row(
                        str(batch["image_id"][i]), str(batch["uri"][i]), _text(batch["label"][i]), result,
                        model_ids=self.model.model_ids, run_id=self.run_id,
                        source_fingerprint=_text(batch["source_fingerprint"][i]),
                    )  # fmt: skip
                except Exception as e:
                    rows[i] = self._failed(batch, i, e)
        return rows_to_table(rows)

    def _error_row(self, batch: dict[str, np.ndarray], i: int, error: str, kind: str, **size) -> dict:
        return error_row(
            str(batch["image_id"][i]), str(batch["uri"][i]), _text(batch["label"][i]), error, kind=kind,
            run_id=self.run_id, model_ids=self.model.model_ids,
            source_fingerprint=_text(batch["source_fingerprint"][i]), **size,
        )  # fmt: skip

    def _failed(self, batch: dict[str, np.ndarray], i: int, e: Exception) -> dict:
        from ..model import ImageShapeError

        h, w = batch["image"][i].shape[:2]
        kind = "image" if isinstance(e, ImageShapeError) else "model"
        return self._error_row(batch, i, f"labeling failed: {type(e).__name__}: {e}", kind, width=w, height=h)


# ---------------------------------------------------------------- the job


def _resources(cfg: LabelJobConfig, ray, *, local: bool) -> tuple[int, float, float]:
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
        ValueError: an option no run could use, output inside the input, a malformed manifest,
            resources the cluster cannot give.
        CheckpointError: a checkpoint that cannot be loaded (found on the driver, before Ray).
        StorageError: input or output storage cannot be reached or written; another run holds
            the output (:class:`~pro2sam.output.OutputBusy`).
        JobInterrupted: SIGINT/SIGTERM (as raised by the caller's handler); committed rows stay.
    """
    start = time.perf_counter()
    cfg.validate()
    output = LabelsOutput(cfg.output)
    inputs = list_inputs(cfg.input, exclude_prefix=cfg.output)
    log.info("%d inputs listed", len(inputs))
    with WriterLease(output, cfg.run_id, ttl_s=cfg.lease_ttl_s, force=cfg.force) as lease:
        output.remove_temporaries()
        if cfg.overwrite:
            plan = plan_rerun(None, inputs)
        else:
            plan = plan_rerun(
                output.scan(), inputs, retry_errors=cfg.retry_errors, relabel_changed=cfg.relabel_changed
            )
        log.info(
            "%d inputs: %d already labeled, %d to label (%d errors retried, %d changed)",
            len(inputs), plan.skipped, len(plan.todo), plan.retried, plan.changed,
        )  # fmt: skip
        summary = LabelJobSummary(
            cfg.run_id, len(inputs), 0, 0, plan.skipped, 0.0, cfg.output, retried=plan.retried, changed=plan.changed
        )
        if len(plan.todo) == 0 and not plan.drops:
            summary.seconds = time.perf_counter() - start
            return summary
        if len(plan.todo):
            load_models(cfg, device="cpu")  # a bad checkpoint ends the run here, before Ray
        local = not (cfg.ray_address or os.environ.get("RAY_ADDRESS"))
        ray = None
        if len(plan.todo):
            already = _ray_initialized()
            ray = ensure_ray(cfg.ray_address, cpus_needed=(cfg.actors or 1) * (cfg.cpus_per_actor or 2) + 1)
            actors, gpus, cpus = _resources(cfg, ray, local=local and not already)
        # Only now, with inputs listed, models loaded and resources there, change the output.
        if cfg.overwrite:
            removed = output.delete_label_files()
            log.info("--overwrite: removed %d label files of earlier runs", removed)
        elif plan.drops:
            dropped = output.drop_rows(plan.drops)
            log.info("removed %d rows to relabel or duplicated from the output", dropped)
        writer = LabelWriter(
            output, cfg.run_id, lease=lease, rows_per_file=cfg.rows_per_file, commit_seconds=cfg.commit_seconds
        )
        try:
            if len(plan.todo):
                for table in _label_stream(ray, cfg, plan.todo, actors, gpus, cpus):
                    writer.add(table)
        finally:
            try:
                writer.commit()  # what was labeled stays, also when the run is interrupted
            except Exception as e:
                log.warning("could not commit the last %d rows: %s", writer.pending_rows, e)
            summary.ok, summary.error, summary.files = writer.ok, writer.error, len(writer.files)
    summary.seconds = time.perf_counter() - start
    return summary


def _ray_initialized() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _label_stream(ray, cfg: LabelJobConfig, todo: pa.Table, actors: int, gpus: float, cpus: float):
    """The Ray Data pipeline over ``todo``; yields label tables as the actors finish them."""
    rows = _BATCHES_PER_BLOCK * cfg.batch_size
    blocks = [todo.slice(i, rows) for i in range(0, len(todo), rows)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        read_images,
        batch_format="numpy",
        batch_size=cfg.batch_size,
        num_cpus=0.25,
        fn_kwargs={"max_bytes": cfg.max_bytes, "timeout_s": cfg.read_timeout_s},
    )
    ds = ds.map_batches(
        decode_images, batch_format="numpy", batch_size=cfg.batch_size, fn_kwargs={"max_pixels": cfg.max_pixels}
    )
    ds = ds.map_batches(
        Pro2SAMLabeler,
        fn_constructor_kwargs={"config": asdict(cfg), "threads": cpus},
        batch_format="numpy",
        batch_size=cfg.batch_size,
        concurrency=actors if actors == 1 else (1, actors),  # the pool grows as an autoscaler adds nodes
        num_gpus=gpus,
        num_cpus=cpus,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield batch


# ---------------------------------------------------------------- command line


def add_labeling_arguments(p: argparse.ArgumentParser) -> None:
    """Options of :class:`LabelingSettings` (shared by ``pro2sam label`` and ``pro2sam evaluate``)."""
    p.add_argument("--gtformer", required=True, help="GTFormer export folder (local or URI); 'shipped': the model in the package")
    p.add_argument("--sam", default="vit_h", help="SAM variant: vit_h, vit_l, vit_b, synthetic, tiny (default vit_h)")
    p.add_argument("--sam-checkpoint", help="SAM weights file (local or URI); default for --sam synthetic: the shipped one")
    p.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of official SAM files")
    p.add_argument("--mode", choices=("fast", "exact"), default="fast")
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument("--prune", action="store_true", help="prune grid points outside the coarse foreground")
    p.add_argument("--pred-iou-thresh", type=float, help="SAM predicted-IoU filter (default 0.88)")
    p.add_argument("--stability-score-thresh", type=float, help="SAM stability filter (default 0.95)")
    p.add_argument("--actors", type=int, help="labeling actors (default: one per GPU, else 1)")
    p.add_argument("--gpus-per-actor", type=float, help="default 1 on a GPU cluster, else 0")
    p.add_argument("--cpus-per-actor", type=float, help="default 1 with a GPU, else 2")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace the output's label files (only those; nothing else under --output is touched) instead of resuming",
    )  # fmt: skip
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images become error rows")
    p.add_argument("--ray-address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")


def labeling_settings_from_args(args: argparse.Namespace) -> dict:
    """Keyword arguments of :class:`LabelingSettings` from :func:`add_labeling_arguments` options."""
    from ..shipped import resolve_model_options

    names = {f.name for f in fields(LabelingSettings)} - {"verify"}
    settings = {"verify": not args.no_verify, **{n: getattr(args, n) for n in names}}
    settings["gtformer"], settings["sam"], settings["sam_checkpoint"] = resolve_model_options(
        settings["gtformer"], settings["sam"], settings["sam_checkpoint"]
    )
    return settings


def add_label_arguments(p: argparse.ArgumentParser) -> None:
    """The ``pro2sam label`` / ``jobs/label.py`` options."""
    defaults = {f.name: f.default for f in fields(LabelJobConfig)}
    p.add_argument("--input", required=True, help="image prefix (local or fsspec URI) or manifest .csv/.parquet")
    p.add_argument("--output", required=True, help="output prefix for the Parquet files (resumes if it exists)")
    add_labeling_arguments(p)
    p.add_argument("--retry-errors", action="store_true", help="relabel every error row (by default only read failures)")
    p.add_argument(
        "--relabel-changed", action="store_true", help="relabel images whose file changed (size, mtime or ETag) since"
    )
    p.add_argument("--force", action="store_true", help="take the output over from a run that holds it (use if that run is dead)")
    p.add_argument(
        "--rows-per-file", type=int, default=defaults["rows_per_file"],
        help="rows per Parquet file; a kill loses at most the rows not yet in a file (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--commit-seconds", type=float, default=defaults["commit_seconds"],
        help="commit a file at least this often, full or not (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--max-bytes", type=int, default=defaults["max_bytes"], help="larger files become error rows (default %(default)s)"
    )
    p.add_argument(
        "--read-timeout", type=float, default=defaults["read_timeout_s"], dest="read_timeout_s",
        help="seconds one image's read may take (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--wait-for-resources", type=float, default=defaults["wait_for_resources_s"], dest="wait_for_resources_s",
        help="on a cluster, seconds to wait for the autoscaler to add the actors' CPUs/GPUs (default %(default)s)",
    )  # fmt: skip


def config_from_args(args: argparse.Namespace) -> LabelJobConfig:
    extra = ("retry_errors", "relabel_changed", "force", "rows_per_file", "commit_seconds", "max_bytes",
             "read_timeout_s", "wait_for_resources_s")  # fmt: skip
    return LabelJobConfig(
        input=args.input, output=args.output, **labeling_settings_from_args(args), **{n: getattr(args, n) for n in extra}
    )


def raise_on_signals() -> None:
    """Make SIGINT and SIGTERM raise :class:`JobInterrupted` in the main thread (a clean stop)."""

    def handler(signum, frame):
        raise JobInterrupted(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def one_line(e: BaseException) -> str:
    """The useful line of an error, also when Ray wrapped it in a long remote traceback."""
    cause = e
    while getattr(cause, "cause", None) is not None or cause.__cause__ is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__
    text = str(cause).strip().splitlines()
    lines = [line.strip() for line in text if line.strip()]
    last = lines[-1] if lines else type(cause).__name__
    return last if type(cause).__name__ in last else f"{type(cause).__name__}: {last}"


def run_from_args(args: argparse.Namespace, *, prog: str = "pro2sam label") -> int:
    from ..checkpoints import CheckpointError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = config_from_args(args)
        raise_on_signals()
        summary = run_label_job(cfg)
    except JobInterrupted as e:
        print(
            f"{prog}: stopped by {e}: the rows committed so far are in {args.output}; "
            "run the same command again to label the rest",
            file=sys.stderr, flush=True,
        )  # fmt: skip
        return 128 + e.signum
    except (StorageError, ValueError, CheckpointError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:  # a failure inside Ray: its last line, not 200 lines of remote traceback
        log.debug("labeling failed", exc_info=True)
        print(f"{prog}: error: labeling failed: {one_line(e)}", file=sys.stderr, flush=True)
        return 1
    print(summary, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="label", description="Pro2SAM labeling job (Ray Data).")
    add_label_arguments(parser)
    return run_from_args(parser.parse_args(argv))
