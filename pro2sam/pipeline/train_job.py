"""The GTFormer training job: Ray Train (PyTorch DDP) from a WSOL data set to a GTFormer export.

    open the data set (driver) -> TorchTrainer: N workers x (train one epoch, report metrics,
        checkpoint) -> export OUTPUT/gtformer (model.safetensors + config.json)

The export is what the labeling job and ``Pro2SAM.from_checkpoints(OUTPUT/"gtformer", ...)`` load.

Checkpoints: every epoch, through Ray Train, under ``STORAGE_PATH/RUN_NAME`` (default
``OUTPUT/ray_train/gtformer``; use shared storage such as ``s3://`` on a multi-node cluster). Each
holds the model, optimiser, LR schedule, loss-scaler state, the completed epoch and the metrics
history.

Resume: a worker failure is retried (``FailureConfig(max_failures)``) from the last checkpoint.
A whole run killed part way (driver, cluster) resumes when started again with the same output,
storage path and run name: Ray Train finds the run's earlier checkpoints and
``ray.train.get_checkpoint()`` hands the latest to the workers, which continue with the next epoch.
A run whose settings or data differ from the checkpointed one is refused (``resume=False`` starts
over). A run already complete is only exported again.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..gtformer import GTFORMER_PRESETS, save_gtformer
from ..storage import StorageError, filesystem, is_remote, join_uri, write_bytes_atomic
from ..train.gtformer import (
    LabeledImageDataset,
    TrainConfig,
    TrainingState,
    amp_settings,
    build_model,
    dataset_hash,
    epoch_seed,
    eval_transform,
    evaluate_accuracy,
    load_training_state,
    make_loader,
    make_lr_scheduler_for,
    read_training_meta,
    save_training_state,
    set_loader_epoch,
    train_one_epoch,
    train_transform,
)
from ..train.schedule import make_optimizer
from .ray_env import ensure_ray

__all__ = ["DEFAULT_RUN_NAME", "EXPORT_DIR", "TrainJobConfig", "run_train_job", "latest_checkpoint"]

log = logging.getLogger("pro2sam.train")

DEFAULT_RUN_NAME = "gtformer"
EXPORT_DIR = "gtformer"  # OUTPUT/gtformer: the GTFormer export
CHECKPOINT_ROOT = "ray_train"  # OUTPUT/ray_train: default Ray Train storage path
RUN_MARKER = "pro2sam_train_run.json"  # in the run folder: the fingerprint checkpoints must match


# ---------------------------------------------------------------- on every training worker


def _train_worker(config: dict[str, Any]) -> None:
    """The per-worker loop (runs inside a Ray Train worker, one process per data-parallel rank)."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    cfg = TrainConfig.from_dict(config["train_config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    amp = amp_settings(device, cfg.amp)

    def loader_for(table: pa.Table, transform, shuffle: bool):
        data = LabeledImageDataset(table.column("uri").to_pylist(), table.column("label").to_pylist(), transform)
        loader = make_loader(
            data, batch_size=cfg.batch_size // world, shuffle=shuffle, workers=cfg.loader_workers,
            seed=cfg.seed, rank=rank, world_size=world,
        )  # fmt: skip
        # The sampler is ours (seeded); Ray only moves batches to the worker's device.
        return loader, ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)

    train_sampler_loader, train_loader = loader_for(ray.get(config["train_table"]), train_transform(), True)
    eval_loader = None
    if config.get("eval_table") is not None:
        _, eval_loader = loader_for(ray.get(config["eval_table"]), eval_transform(), False)

    core = build_model(cfg, config["num_classes"])
    model = ray.train.torch.prepare_model(core)
    optimizer = make_optimizer(core, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_lr_scheduler_for(optimizer, cfg, len(train_loader))
    scaler = torch.amp.GradScaler(device.type) if amp.needs_scaler else None

    start_epoch, history = 1, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_training_state(directory)
        if state.fingerprint != config["fingerprint"]:
            raise ValueError("the checkpoint to resume was written by a different training set-up")
        core.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        if scaler is not None and state.scaler is not None:
            scaler.load_state_dict(state.scaler)
        start_epoch, history = state.epoch + 1, state.history
    if rank == 0:
        how = f"resuming after epoch {start_epoch - 1}" if checkpoint is not None else "starting"
        print(f"[pro2sam train] {how}: epochs {start_epoch}..{cfg.epochs}, {world} worker(s) on {device}", flush=True)

    for epoch in range(start_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        torch.manual_seed(epoch_seed(cfg.seed, epoch, rank))
        set_loader_epoch(train_sampler_loader, epoch, cfg.seed)
        stats = train_one_epoch(
            model, train_loader, optimizer, scheduler, tau=cfg.tau, device=device, amp=amp, scaler=scaler,
            area_per=cfg.area_loss,
        )
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "start_epoch": start_epoch,
            "train_loss": stats.loss,
            "train_ce": stats.ce,
            "train_accuracy": stats.accuracy,
            "lr": stats.lr,
            "images": stats.images,
        }
        if eval_loader is not None:
            val = evaluate_accuracy(model, eval_loader, tau=cfg.tau, device=device, amp=amp, area_per=cfg.area_loss)
            metrics.update(val_loss=val.loss, val_ce=val.ce, val_accuracy=val.accuracy)
        metrics["seconds"] = time.perf_counter() - started
        history.append(metrics)
        if rank == 0:
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("epoch", "start_epoch"))
            print(f"[pro2sam train] epoch {epoch}/{cfg.epochs}: {shown}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            epoch_checkpoint = None
            if rank == 0:
                save_training_state(
                    tmp,
                    TrainingState(
                        epoch=epoch,
                        model=core.state_dict(),
                        optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(),
                        scaler=scaler.state_dict() if scaler is not None else None,
                        history=history,
                        fingerprint=config["fingerprint"],
                    ),
                )
                epoch_checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=epoch_checkpoint, checkpoint_dir_name=f"epoch_{epoch:04d}")


# ---------------------------------------------------------------- driver


def _absolute(uri: str) -> str:
    return uri if is_remote(uri) else os.path.abspath(uri)


def _read_json(uri: str) -> dict | None:
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def _write_json(uri: str, value: dict) -> None:
    write_bytes_atomic(uri, (json.dumps(value, indent=2) + "\n").encode())


def _remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _uptime() -> str:
    """``uptime``'s line (load averages), recorded with a run: how busy the machine was."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def latest_checkpoint(run_dir: str):
    """The latest checkpoint Ray Train recorded for the run in ``run_dir``, or None."""
    from ray.train import Result

    try:
        return Result.from_path(run_dir).checkpoint
    except (RuntimeError, FileNotFoundError, ValueError):
        return None


def _table(dataset) -> pa.Table:
    return pa.table({
        "uri": pa.array([s.uri for s in dataset.samples], pa.string()),
        "label": pa.array([int(s.label) for s in dataset.samples], pa.int64()),
    })  # fmt: skip


def _export(state: TrainingState, cfg: TrainConfig, dataset, output_dir: str, extra: dict[str, Any]) -> str:
    from ..gtformer import create_gtformer

    model = create_gtformer(cfg.preset, num_classes=len(dataset.class_names))
    model.load_state_dict(state.model)
    target = join_uri(output_dir, EXPORT_DIR)
    if not is_remote(target):
        save_gtformer(model, target, class_names=dataset.class_names, extra=extra)
        return os.path.abspath(target)
    with tempfile.TemporaryDirectory() as tmp:
        local = save_gtformer(model, Path(tmp) / EXPORT_DIR, class_names=dataset.class_names, extra=extra)
        fs, path = filesystem(target)
        fs.makedirs(path, exist_ok=True)
        for name in ("model.safetensors", "config.json"):  # weights first: config.json marks completion
            fs.put_file(str(local / name), path.rstrip("/") + "/" + name)
    return target


@dataclass(kw_only=True)
class TrainJobConfig:
    """One training run: the recipe (:class:`~pro2sam.train.gtformer.TrainConfig`), the data, and
    how Ray Train runs it.

    Attributes:
        data: training data (:func:`pro2sam.datasets.open_dataset` spec: ``cub:ROOT:train``, a
            manifest ``.csv``/``.parquet`` with ``uri,label``, ...).
        output: local folder or fsspec URI; receives ``gtformer/`` (and, by default, the
            checkpoints under ``ray_train/``).
        train: the recipe; ``batch_size`` is global and must divide by ``num_workers``.
        eval_data: optional held-out data evaluated (loss, top-1) after every epoch.
        num_workers: data-parallel training workers (one GPU each with ``use_gpu``).
        cpus_per_worker: CPUs reserved by each worker (also its data loading).
        storage_path: where Ray Train keeps checkpoints (default ``output/ray_train``); must be
            shared storage (``s3://...``, NFS) on a multi-node cluster.
        run_name: the run's folder under ``storage_path``; the same name resumes.
        ray_address: Ray cluster to join; default ``$RAY_ADDRESS``, else a new local Ray (an
            already initialised Ray is used as it is).
        resume: continue from the run's latest checkpoint if there is one; False deletes the
            run's checkpoints and starts over.
        max_failures: worker-group failures retried (from the last checkpoint) within this call.
        keep_checkpoints: most recent checkpoints kept.
    """

    data: str
    output: str
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_data: str | None = None
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage_path: str | None = None
    run_name: str = DEFAULT_RUN_NAME
    ray_address: str | None = None
    resume: bool = True
    max_failures: int = 2
    keep_checkpoints: int = 2


def run_train_job(job: TrainJobConfig) -> str:
    """Train GTFormer with Ray Train and export it; return the export folder (``output/gtformer``).

    Raises:
        ValueError: bad settings, an empty data set, or (with ``resume``) checkpoints of a
            different training set-up or data set in the run folder.
        StorageError: storage cannot be reached.
        ray.train.TrainingFailedError: training failed more than ``max_failures`` times.
    """
    from ..datasets import open_dataset

    cfg, num_workers = job.train, job.num_workers
    dataset_spec, eval_dataset_spec, run_name = job.data, job.eval_data, job.run_name
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if cfg.batch_size % num_workers:
        raise ValueError(f"batch_size {cfg.batch_size} is global and must divide by num_workers={num_workers}")
    if GTFORMER_PRESETS[cfg.preset]["backbone"] and not (cfg.pretrained or cfg.backbone_checkpoint):
        log.warning("training %s from random weights; the recipe starts from ImageNet DeiT "
                    "(pretrained=True / --pretrained, or backbone_checkpoint)", cfg.preset)  # fmt: skip
    dataset = open_dataset(dataset_spec)
    if not dataset.samples:
        raise ValueError(f"training data set {dataset_spec!r} has no samples")
    eval_dataset = open_dataset(eval_dataset_spec) if eval_dataset_spec else None
    if eval_dataset is not None and eval_dataset.class_names != dataset.class_names:
        raise ValueError("the evaluation data set's classes differ from the training data set's")
    data_sha = dataset_hash(dataset)
    fingerprint = {**cfg.fingerprint(data_sha), "class_names": list(dataset.class_names)}

    output_dir = _absolute(job.output)
    storage = _absolute(job.storage_path or join_uri(output_dir, CHECKPOINT_ROOT))
    run_dir = join_uri(storage, run_name)
    marker_uri = join_uri(run_dir, RUN_MARKER)
    try:
        if not job.resume:
            _remove(run_dir)
        marker = _read_json(marker_uri)
        if marker is not None and marker.get("fingerprint") != fingerprint:
            changed = sorted(
                k for k in set(fingerprint) | set(marker.get("fingerprint", {}))
                if fingerprint.get(k) != marker.get("fingerprint", {}).get(k)
            )  # fmt: skip
            raise ValueError(
                f"{run_dir} holds checkpoints of a different training set-up (differs in {changed}); "
                "start over with resume=False (--restart), or use another output / run name"
            )
        _write_json(marker_uri, {"fingerprint": fingerprint, "dataset_spec": dataset_spec})
    except OSError as e:
        raise StorageError(f"cannot use checkpoint storage {run_dir}: {type(e).__name__}: {e}") from None

    machine = {"cpus": os.cpu_count(), "uptime_before": _uptime()}
    started = time.perf_counter()
    previous = latest_checkpoint(run_dir) if job.resume else None
    done = 0
    if previous is not None:
        with previous.as_directory() as directory:
            done = int(read_training_meta(directory)["epoch"])
        log.info("found a checkpoint after epoch %d of %d in %s", done, cfg.epochs, run_dir)
    if done >= cfg.epochs:
        checkpoint = previous
    else:
        log.info("training %s for epochs %d..%d on %d worker(s)", cfg.preset, done + 1, cfg.epochs, num_workers)
        ray = ensure_ray(job.ray_address, cpus_needed=num_workers * job.cpus_per_worker)
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={
                "train_config": cfg.to_dict(),
                "num_classes": len(dataset.class_names),
                "fingerprint": fingerprint,
                "train_table": ray.put(_table(dataset)),
                "eval_table": ray.put(_table(eval_dataset)) if eval_dataset is not None else None,
            },
            scaling_config=ScalingConfig(
                num_workers=num_workers,
                use_gpu=job.use_gpu,
                resources_per_worker={"CPU": job.cpus_per_worker, **({"GPU": 1} if job.use_gpu else {})},
            ),
            run_config=RunConfig(
                name=run_name,
                storage_path=storage,
                checkpoint_config=CheckpointConfig(num_to_keep=job.keep_checkpoints),
                failure_config=FailureConfig(max_failures=job.max_failures),
            ),
        )
        result = trainer.fit()
        checkpoint = result.checkpoint
        if checkpoint is None:
            raise RuntimeError(f"training finished without a checkpoint in {run_dir}")

    with checkpoint.as_directory() as directory:
        state = load_training_state(directory)
    if state.epoch != cfg.epochs:
        raise RuntimeError(f"the last checkpoint is after epoch {state.epoch}, expected {cfg.epochs}")
    extra = {
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
        "training_data_sha256": data_sha,
        "train_config": cfg.to_dict(),
        "dataset": {"spec": dataset_spec, "name": dataset.name, "split": dataset.split, "images": len(dataset)},
        "eval_dataset": eval_dataset_spec,
        "epochs_completed": state.epoch,
        "start_epoch": state.history[-1]["start_epoch"] if state.history else 1,
        "history": state.history,
        "ray_train": {"storage_path": storage, "run_name": run_name, "num_workers": num_workers, "use_gpu": job.use_gpu},
        # this call's wall time (Ray start-up included; epochs already done before a resume excluded)
        "machine": {**machine, "job_wall_seconds": time.perf_counter() - started, "uptime_after": _uptime()},
    }
    export = _export(state, cfg, dataset, output_dir, extra)
    log.info("exported GTFormer to %s", export)
    return export
