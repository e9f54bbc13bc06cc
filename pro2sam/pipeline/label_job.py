"""The labeling job: Ray Data from object storage to a Parquet table of boxes and masks.

    list inputs -> read bytes (I/O tasks) -> decode (CPU tasks)
        -> Pro2SAMLabeler actors (one GPU each, GTFormer + SAM loaded once) -> write Parquet

Resumable: rows already in the output (any earlier run) are skipped, so a run killed part way and
started again finishes the rest and every input image ends up in the output exactly once.
Fault tolerant: one bad image becomes an error row; a killed actor is restarted by Ray and its
batch retried; unreadable (half-written) output files of a killed run are removed and redone.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from ..labels import (
    LABEL_SCHEMA,
    STATUS_ERROR,
    STATUS_OK,
    error_row,
    ok_row,
    rows_to_table,
)
from ..storage import StorageError, filesystem, is_remote, list_inputs, read_bytes
from .ray_env import ensure_ray

__all__ = ["LabelingSettings", "LabelJobConfig", "add_labeling_arguments", "labeling_settings_from_args", "LabelJobSummary", "run_label_job", "add_label_arguments", "main"]

log = logging.getLogger("pro2sam.label")

# Rows per block handed to Ray Data: small enough to spread over actors, large enough to batch.
_ROWS_PER_BLOCK = 32
_NO_IMAGE = np.zeros((1, 1, 3), dtype=np.uint8)


@dataclass(kw_only=True)
class LabelingSettings:
    """Models, candidate settings and resources of a labeling run (shared with evaluation).

    Attributes:
        gtformer: GTFormer export folder (model.safetensors + config.json), local or URI.
        sam, sam_checkpoint, verify: SAM variant, its weights file, SHA-256 check of official files.
        mode, points_per_side, prune: candidate path, grid size, grid pruning by the coarse map.
        pred_iou_thresh, stability_score_thresh: SAM's filtering (None: the variant's defaults,
            ``SamAutomaticMaskGenerator``'s or, for the shipped "synthetic" SAM,
            :meth:`pro2sam.sam_candidates.CandidateConfig.for_variant`).
        actors: labeling actors (default: one per GPU of the cluster, else 1).
        gpus_per_actor: GPUs pinned by each actor (default 1 when the cluster has GPUs, else 0).
        cpus_per_actor: CPUs (and torch threads) per actor (default 1 with a GPU, else 2).
        batch_size: images per model batch.
        overwrite: delete the output first instead of resuming.
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


@dataclass(kw_only=True)
class LabelJobConfig(LabelingSettings):
    """Everything a labeling run needs. Paths may be local or any fsspec URI.

    Attributes:
        input: image prefix, or a manifest (.csv / .parquet with ``uri`` and optional ``label``).
        output: folder (prefix) the Parquet files go to; also what resumes.
        run_id: written into every row of this run.
        The rest: :class:`LabelingSettings`.
    """

    input: str
    output: str
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8])


@dataclass
class LabelJobSummary:
    """What a run did. ``skipped`` images were already in the output before this run."""

    run_id: str
    inputs: int
    ok: int
    error: int
    skipped: int
    seconds: float
    output: str

    @property
    def images_per_s(self) -> float:
        return (self.ok + self.error) / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"pro2sam label run {self.run_id}: {self.inputs} inputs: {self.ok} ok, {self.error} error, "
            f"{self.skipped} skipped (already labeled); {self.seconds:.1f} s, "
            f"{self.images_per_s:.2f} images/s; output: {self.output}"
        )


# ---------------------------------------------------------------- output folder (no Ray needed)


def _parquet_files(output: str) -> tuple[object, list[str]]:
    fs, path = filesystem(output)
    if not fs.exists(path):
        return fs, []
    return fs, sorted(p for p in fs.find(path) if p.endswith(".parquet"))


def read_output_columns(output: str, columns: list[str], *, remove_unreadable: bool = False) -> pa.Table:
    """Some columns of every Parquet file under ``output`` (an empty table if there are none).

    With ``remove_unreadable``, files without a valid Parquet footer (written by a run that was
    killed mid-write) are deleted so that their images are labeled again.
    """
    fs, files = _parquet_files(output)
    tables = []
    for f in files:
        try:
            with fs.open(f, "rb") as fh:
                tables.append(pq.read_table(fh, columns=columns))
        except (pa.ArrowInvalid, OSError) as e:
            if remove_unreadable and isinstance(e, pa.ArrowInvalid):
                log.warning("removing unreadable output file %s (left by an interrupted run): %s", f, e)
                fs.rm(f)
                continue
            raise
    if not tables:
        return pa.table({c: pa.array([], LABEL_SCHEMA.field(c).type) for c in columns})
    return pa.concat_tables(tables)


def clear_output(output: str) -> None:
    """Delete everything under ``output`` (``--overwrite``)."""
    fs, path = filesystem(output)
    if fs.exists(path):
        fs.rm(path, recursive=True)


# ---------------------------------------------------------------- pipeline stages (Ray Data UDFs)


def read_images(batch: dict[str, np.ndarray], *, threads: int = 8) -> dict[str, np.ndarray]:
    """I/O stage: add the encoded bytes of each image; a failed read fills ``error``."""
    uris = list(batch["uri"])

    def fetch(uri: str) -> tuple[bytes, str]:
        try:
            return read_bytes(uri), ""
        except FileNotFoundError:
            return b"", f"not found: {uri}"
        except StorageError as e:
            return b"", f"read failed: {e}"

    with ThreadPoolExecutor(max_workers=min(threads, max(1, len(uris)))) as pool:
        fetched = list(pool.map(fetch, uris))
    batch["data"] = _object_array([d for d, _ in fetched])
    batch["error"] = _object_array([e for _, e in fetched])
    return batch


def decode_images(batch: dict[str, np.ndarray], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
    """CPU stage: bytes -> (H, W, 3) uint8 RGB with EXIF orientation applied, or an error."""
    images, errors = [], []
    for data, error in zip(batch["data"], batch["error"]):
        if error:
            images.append(_NO_IMAGE)
            errors.append(error)
            continue
        try:
            images.append(decode_image(data, max_pixels=max_pixels))
            errors.append("")
        except ImageDecodeError as e:
            images.append(_NO_IMAGE)
            errors.append(str(e))
    out = {k: v for k, v in batch.items() if k != "data"}
    out["image"] = _object_array(images)
    out["error"] = np.array(errors, dtype=object)
    return out


def _label(value) -> str | None:
    """Ray hands an all-null string column over as float NaN: normalise to str or None."""
    return value if isinstance(value, str) else None


def _object_array(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


class Pro2SAMLabeler:
    """Ray Data actor: loads GTFormer and SAM once, labels batches of decoded images.

    Nothing here is Ray-specific beyond the calling convention (``__init__`` once, then
    ``__call__(batch) -> table``).
    """

    def __init__(self, config: dict, threads: int | None = None):
        import torch

        from ..matching import MatchConfig
        from ..model import Pro2SAM
        from ..sam_candidates import CandidateConfig
        from ..storage import fetch_to_local

        if threads:
            torch.set_num_threads(int(threads))
        cfg = LabelJobConfig(**config)
        candidates = CandidateConfig.for_variant(
            cfg.sam,
            mode=cfg.mode,
            points_per_side=cfg.points_per_side,
            prune_with_coarse_map=cfg.prune,
            pred_iou_thresh=cfg.pred_iou_thresh,
            stability_score_thresh=cfg.stability_score_thresh,
        )
        self.model = Pro2SAM.from_checkpoints(
            fetch_to_local(cfg.gtformer),
            sam=cfg.sam,
            sam_checkpoint=fetch_to_local(cfg.sam_checkpoint) if cfg.sam_checkpoint else None,
            verify=cfg.verify,
            candidates=candidates,
            matching=MatchConfig(),
        )
        self.run_id = cfg.run_id

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["image_id"])
        ids, uris = [str(v) for v in batch["image_id"]], [str(v) for v in batch["uri"]]
        labels = [_label(v) for v in batch["label"]]
        rows: list[dict | None] = [None] * n
        good = []
        for i in range(n):
            if batch["error"][i]:
                rows[i] = error_row(ids[i], uris[i], labels[i], str(batch["error"][i]), run_id=self.run_id, model_ids=self.model.model_ids)
            else:
                good.append(i)
        if good:
            images = [batch["image"][i] for i in good]
            try:
                probs, coarse = self.model.classify(images)
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
                try:
                    result = self.model.localize(batch["image"][i], p, c, label=labels[i])
                    rows[i] = ok_row(ids[i], uris[i], labels[i], result, model_ids=self.model.model_ids, run_id=self.run_id)
                except Exception as e:
                    rows[i] = self._failed(batch, i, e)
        return rows_to_table(rows)

    def _failed(self, batch: dict[str, np.ndarray], i: int, e: Exception) -> dict:
        h, w = batch["image"][i].shape[:2]
        return error_row(
            str(batch["image_id"][i]), str(batch["uri"][i]), _label(batch["label"][i]),
            f"labeling failed: {type(e).__name__}: {e}",
            run_id=self.run_id, model_ids=self.model.model_ids, width=w, height=h,
        )  # fmt: skip


# ---------------------------------------------------------------- the job



def _pyarrow_filesystem(output: str):
    if not is_remote(output):
        return None, output
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(output)
    return PyFileSystem(FSSpecHandler(fs)), path


def run_label_job(cfg: LabelJobConfig) -> LabelJobSummary:
    """Label every input image not yet in ``cfg.output``; return what was done.

    Raises:
        StorageError: input or output storage cannot be reached (the job does no model work).
    """
    start = time.perf_counter()
    if cfg.overwrite:
        clear_output(cfg.output)
    inputs = list_inputs(cfg.input, exclude_prefix=cfg.output)
    try:
        done = read_output_columns(cfg.output, ["image_id"], remove_unreadable=True).column("image_id")
    except Exception as e:
        raise StorageError(f"cannot read the existing output {cfg.output}: {type(e).__name__}: {e}") from None
    todo = inputs.filter(pc.invert(pc.is_in(inputs.column("image_id"), value_set=pc.unique(done))))
    skipped = len(inputs) - len(todo)
    log.info("%d inputs, %d already labeled, %d to label", len(inputs), skipped, len(todo))
    if len(todo) == 0:
        return LabelJobSummary(cfg.run_id, len(inputs), 0, 0, skipped, time.perf_counter() - start, cfg.output)

    ray = ensure_ray(cfg.ray_address)
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1 if cluster_gpus else 0)
    actors = cfg.actors or (max(1, int(cluster_gpus // gpus)) if gpus else 1)
    cpus = cfg.cpus_per_actor if cfg.cpus_per_actor is not None else (1 if gpus else 2)

    blocks = [todo.slice(i, _ROWS_PER_BLOCK) for i in range(0, len(todo), _ROWS_PER_BLOCK)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(read_images, batch_format="numpy", batch_size=cfg.batch_size, num_cpus=0.25)
    ds = ds.map_batches(
        decode_images, batch_format="numpy", batch_size=cfg.batch_size, fn_kwargs={"max_pixels": cfg.max_pixels}
    )
    ds = ds.map_batches(
        Pro2SAMLabeler,
        fn_constructor_kwargs={"config": asdict(cfg), "threads": cpus},
        batch_format="numpy",
        batch_size=cfg.batch_size,
        concurrency=actors,
        num_gpus=gpus,
        num_cpus=cpus,
    )
    filesystem_, path = _pyarrow_filesystem(cfg.output)
    ds.write_parquet(path, filesystem=filesystem_, schema=LABEL_SCHEMA)

    written = read_output_columns(cfg.output, ["status", "run_id"])
    mine = written.filter(pc.equal(written.column("run_id"), cfg.run_id))
    statuses = mine.column("status")
    ok = pc.sum(pc.equal(statuses, STATUS_OK)).as_py() or 0
    error = pc.sum(pc.equal(statuses, STATUS_ERROR)).as_py() or 0
    return LabelJobSummary(cfg.run_id, len(inputs), ok, error, skipped, time.perf_counter() - start, cfg.output)


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
    p.add_argument("--overwrite", action="store_true", help="delete the output first instead of resuming")
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
    p.add_argument("--input", required=True, help="image prefix (local or fsspec URI) or manifest .csv/.parquet")
    p.add_argument("--output", required=True, help="output prefix for the Parquet files (resumes if it exists)")
    add_labeling_arguments(p)


def config_from_args(args: argparse.Namespace) -> LabelJobConfig:
    return LabelJobConfig(input=args.input, output=args.output, **labeling_settings_from_args(args))


def run_from_args(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = run_label_job(config_from_args(args))
    except (StorageError, ValueError) as e:
        print(f"pro2sam label: error: {e}", file=sys.stderr)
        return 2
    print(summary, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="label", description="Pro2SAM labeling job (Ray Data).")
    add_label_arguments(parser)
    return run_from_args(parser.parse_args(argv))
