"""Training GTFormer on image-level labels (stage 1 of Pro2SAM), independent of any scheduler.

The reference recipe (METHOD.md §1): AdamW with weight decay 0.05 except on biases and other 1-D
parameters, global batch 256, Resize(256, 256) -> RandomCrop 224 -> horizontal flip -> ImageNet
mean/std, the 11-term GTFormer loss with tau 0.25 (CUB-like data) or 0.35 (ImageNet-like), lr 1e-4
on CUB for 30 epochs. **[ours]** a per-step linear warm-up followed by a cosine decay is the
default learning-rate schedule; ``constant`` reproduces the authors' code.

This module holds the pieces (config, transforms, data set, optimiser, schedule, one epoch of
training, evaluation, the resumable training state); :mod:`pro2sam.pipeline.train_job` runs them
on Ray Train. Distributed runs work through ``torch.distributed`` only: the epoch statistics are
summed over processes when a process group is initialised.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T

from ..gtformer import DEFAULT_SETTINGS, GTFORMER_PRESETS, GTFormer, create_gtformer
from ..images import decode_image
from ..storage import fetch_to_local, read_bytes
from .losses import AREA_LOSSES, gtformer_loss
from .schedule import SCHEDULES, make_lr_scheduler

if TYPE_CHECKING:
    from ..datasets import WSOLDataset

__all__ = [
    "TrainConfig",
    "EpochStats",
    "train_transform",
    "eval_transform",
    "LabeledImageDataset",
    "make_loader",
    "set_loader_epoch",
    "build_model",
    "make_lr_scheduler_for",
    "AmpSettings",
    "amp_settings",
    "epoch_seed",
    "train_one_epoch",
    "evaluate_accuracy",
    "dataset_hash",
    "TrainingState",
    "save_training_state",
    "read_training_meta",
    "load_training_state",
]

# Training resolution of every preset (the frame of the coarse map) and the resize before the crop.
TRAIN_RESIZE = 256
INPUT_SIZE = DEFAULT_SETTINGS.img_size

_STATE_FILE = "training_state.pt"
_META_FILE = "training_meta.json"


@dataclass
class TrainConfig:
    """One GTFormer training run. The defaults are the CUB recipe.

    Attributes:
        preset: GTFormer preset (a key of ``GTFORMER_PRESETS``).
        epochs: epochs to train.
        batch_size: global batch size, split evenly over the data-parallel workers.
        lr: peak learning rate (1e-4 for CUB, 1.5e-5 for ILSVRC in the reference recipe).
        min_lr: learning rate at the end of the cosine decay.
        weight_decay: AdamW weight decay of the parameters that are decayed (not biases, not 1-D
            parameters, not ``model.no_weight_decay()``).
        warmup_epochs: length of the linear warm-up, in epochs (fractions allowed; 0 for none).
        schedule: "cosine" (warm-up then cosine decay to ``min_lr``) or "constant" (warm-up then
            ``lr``), stepped every optimiser step.
        tau: target foreground fraction of the area loss (0.25 CUB-like, 0.35 ImageNet-like).
        area_loss: "batch" (the authors': the mean over the batch) or "image" (**[ours]**: every
            image's map), see :func:`pro2sam.gtformer.area_loss`.
        seed: seeds model initialisation, shuffling and augmentation.
        loader_workers: DataLoader worker processes per training worker (0: load in-process).
        amp: mixed precision (bfloat16, or float16 with loss scaling) when training on a GPU;
            ignored on CPU.
        pretrained: initialise the backbone with ImageNet DeiT weights through timm (needs
            network access or timm's cache on every training worker).
        backbone_checkpoint: a DeiT checkpoint file (local or fsspec URI) for the backbone;
            exclusive with ``pretrained``.
    """

    preset: str = "gtformer_deit_small_patch16_224"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    schedule: str = "cosine"
    tau: float = 0.25
    area_loss: str = "batch"
    seed: int = 0
    loader_workers: int = 4
    amp: bool = True
    pretrained: bool = False
    backbone_checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.preset not in GTFORMER_PRESETS:
            raise ValueError(f"unknown GTFormer preset {self.preset!r}; choose from {sorted(GTFORMER_PRESETS)}")
        if self.area_loss not in AREA_LOSSES:
            raise ValueError(f"area_loss must be one of {AREA_LOSSES}, got {self.area_loss!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1 (got {self.epochs}, {self.batch_size})")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr (got lr={self.lr}, min_lr={self.min_lr})")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or self.loader_workers < 0:
            raise ValueError("warmup_epochs, weight_decay and loader_workers must be >= 0")
        if self.pretrained and self.backbone_checkpoint is not None:
            raise ValueError("give either pretrained=True or backbone_checkpoint, not both")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        return cls(**values)

    def fingerprint(self, training_data_sha256: str) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed: everything that changes the run's
        trajectory (not ``loader_workers``, ``amp`` or where the backbone weights were read)."""
        keep = {k: v for k, v in self.to_dict().items() if k not in ("loader_workers", "amp", "backbone_checkpoint")}
        return {**keep, "initialised_from_checkpoint": self.backbone_checkpoint is not None,
                "training_data_sha256": training_data_sha256}  # fmt: skip


@dataclass
class EpochStats:
    """Statistics of one pass over a data set, summed over all processes.

    Attributes:
        loss: mean GTFormer loss per image.
        accuracy: top-1 accuracy of the logits, in [0, 1].
        images: images seen (with a DistributedSampler, padding repeats a few).
        lr: learning rate of the last optimiser step (None for evaluation).
        ce: mean cross-entropy term per image.
    """

    loss: float
    accuracy: float
    images: int
    lr: float | None = None
    ce: float | None = None


# ---------------------------------------------------------------- data


def train_transform(mean: Sequence[float] = DEFAULT_SETTINGS.mean, std: Sequence[float] = DEFAULT_SETTINGS.std):
    """PIL RGB image -> (3, 224, 224) float32: Resize(256, 256), RandomCrop 224, HFlip, normalise."""
    return T.Compose([
        T.Resize((TRAIN_RESIZE, TRAIN_RESIZE), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.RandomCrop(INPUT_SIZE),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])  # fmt: skip


def eval_transform(mean: Sequence[float] = DEFAULT_SETTINGS.mean, std: Sequence[float] = DEFAULT_SETTINGS.std):
    """PIL RGB image -> (3, 224, 224) float32: plain Resize(224, 224) (the evaluation frame), normalise."""
    return T.Compose([
        T.Resize((INPUT_SIZE, INPUT_SIZE), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])  # fmt: skip


class LabeledImageDataset(Dataset):
    """(image, class index) pairs read through fsspec (local paths or any object-store URI).

    Args:
        uris: one image URI per sample.
        labels: one class index per sample.
        transform: PIL RGB image -> tensor (:func:`train_transform` or :func:`eval_transform`).

    Items are ``(image, label)``: the transformed image and an int64 scalar tensor. An unreadable
    image raises (naming its URI) rather than being skipped: a training set should be clean.
    """

    def __init__(self, uris: Sequence[str], labels: Sequence[int], transform) -> None:
        if len(uris) != len(labels):
            raise ValueError(f"{len(uris)} uris but {len(labels)} labels")
        self.uris = [str(u) for u in uris]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    @classmethod
    def from_wsol(cls, dataset: WSOLDataset, transform) -> LabeledImageDataset:
        """All samples of a :class:`~pro2sam.datasets.WSOLDataset`."""
        return cls([s.uri for s in dataset.samples], [int(s.label) for s in dataset.samples], transform)

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        uri = self.uris[index]
        try:
            rgb = decode_image(read_bytes(uri))
        except Exception as e:
            raise RuntimeError(f"cannot read training image {uri}: {type(e).__name__}: {e}") from e
        return self.transform(Image.fromarray(rgb)), torch.tensor(self.labels[index])


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over this process's share of ``dataset``.

    With ``world_size > 1`` a :class:`DistributedSampler` (seeded with ``seed``) splits the data;
    call ``loader.sampler.set_epoch(epoch)`` before each epoch so shuffling differs per epoch.
    ``batch_size`` is per process.
    """
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
    generator = torch.Generator().manual_seed(seed + rank)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def set_loader_epoch(loader: DataLoader, epoch: int, seed: int = 0) -> None:
    """Make ``loader``'s shuffle order a function of (seed, epoch) alone, so that a resumed run
    sees the same order as an uninterrupted one (DistributedSampler: ``set_epoch``; otherwise
    the loader's generator is reseeded)."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    elif loader.generator is not None:
        loader.generator.manual_seed(seed * 1_000_003 + epoch)


def dataset_hash(dataset: WSOLDataset) -> str:
    """SHA-256 (hex) of the data set's sorted ``uri<TAB>label`` lines: identifies the training data."""
    lines = sorted(f"{s.uri}\t{int(s.label)}" for s in dataset.samples)
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


# ---------------------------------------------------------------- model and optimiser


def build_model(config: TrainConfig, num_classes: int) -> GTFormer:
    """The GTFormer to train, initialised as the config says (seeded with ``config.seed``)."""
    torch.manual_seed(config.seed)
    backbone = fetch_to_local(config.backbone_checkpoint) if config.backbone_checkpoint else None
    return create_gtformer(
        config.preset, num_classes=num_classes, pretrained=config.pretrained, backbone_checkpoint=backbone
    )


def make_lr_scheduler_for(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The config's per-step schedule (:func:`pro2sam.train.schedule.lr_at_step`) over its epochs."""
    return make_lr_scheduler(
        optimizer,
        lr=config.lr,
        total_steps=config.epochs * steps_per_epoch,
        warmup_steps=round(config.warmup_epochs * steps_per_epoch),
        schedule=config.schedule,
        min_lr=config.min_lr,
    )


@dataclass(frozen=True)
class AmpSettings:
    """Mixed precision for one device: ``dtype`` None means full float32."""

    dtype: torch.dtype | None
    device_type: str

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def amp_settings(device: torch.device, enabled: bool) -> AmpSettings:
    """bfloat16 autocast on GPUs that support it, float16 (with loss scaling) on older ones,
    float32 on CPU or when disabled."""
    if not enabled or device.type != "cuda":
        return AmpSettings(None, device.type)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return AmpSettings(dtype, device.type)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed of one epoch on one process, so that a resumed run draws the same
    augmentations as an uninterrupted one."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2**63)


# ---------------------------------------------------------------- one epoch


def _sum_over_processes(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _stats(loss_sum: float, ce_sum: float, correct: float, count: float, device, lr=None) -> EpochStats:
    loss_sum, ce_sum, correct, count = _sum_over_processes([loss_sum, ce_sum, correct, count], device)
    n = max(count, 1.0)
    return EpochStats(loss=loss_sum / n, accuracy=correct / n, images=int(count), lr=lr, ce=ce_sum / n)


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    tau: float,
    device: torch.device,
    amp: AmpSettings | None = None,
    scaler: torch.amp.GradScaler | None = None,
    area_per: str = "batch",
) -> EpochStats:
    """One pass over ``loader`` ((B, 3, 224, 224) images, (B,) int64 labels), stepping the
    schedule every optimiser step.

    Returns:
        The epoch's mean loss, top-1 accuracy on the (augmented) training batches and the last
        learning rate, summed over processes when ``torch.distributed`` is initialised.
    """
    amp = amp or AmpSettings(None, device.type)
    model.train()
    loss_sum = ce_sum = correct = count = 0.0
    lr = optimizer.param_groups[0]["lr"]
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        lr = optimizer.param_groups[0]["lr"]
        with amp.autocast():
            output = model(images)
            loss, terms = gtformer_loss(output, labels, tau=tau, area_per=area_per)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        b = labels.shape[0]
        loss_sum += loss.item() * b
        ce_sum += terms["ce"].item() * b
        correct += (output.logits.argmax(dim=1) == labels).sum().item()
        count += b
    return _stats(loss_sum, ce_sum, correct, count, device, lr=lr)


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    loader,
    *,
    tau: float,
    device: torch.device,
    amp: AmpSettings | None = None,
    area_per: str = "batch",
) -> EpochStats:
    """Mean loss and top-1 accuracy over ``loader`` in eval mode (no augmentation expected)."""
    amp = amp or AmpSettings(None, device.type)
    model.eval()
    loss_sum = ce_sum = correct = count = 0.0
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with amp.autocast():
            output = model(images)
            loss, terms = gtformer_loss(output, labels, tau=tau, area_per=area_per)
        b = labels.shape[0]
        loss_sum += loss.item() * b
        ce_sum += terms["ce"].item() * b
        correct += (output.logits.argmax(dim=1) == labels).sum().item()
        count += b
    return _stats(loss_sum, ce_sum, correct, count, device)


# ---------------------------------------------------------------- resumable state


@dataclass
class TrainingState:
    """What a training checkpoint holds.

    Attributes:
        epoch: epochs completed (1-based count; the next epoch to train is ``epoch + 1``).
        model, optimizer, scheduler, scaler: state dicts (``scaler`` None without loss scaling).
        history: one metrics dict per completed epoch.
        fingerprint: :meth:`TrainConfig.fingerprint` of the run that wrote it.
    """

    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    history: list[dict[str, Any]]
    fingerprint: dict[str, Any]


def save_training_state(directory: str | os.PathLike, state: TrainingState) -> Path:
    """Write ``state`` into ``directory`` (tensors in a torch file, the rest as JSON)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"model": state.model, "optimizer": state.optimizer, "scheduler": state.scheduler, "scaler": state.scaler}
    torch.save(tensors, directory / _STATE_FILE)
    meta = {"epoch": state.epoch, "history": state.history, "fingerprint": state.fingerprint}
    (directory / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_training_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """``epoch``, ``history`` and ``fingerprint`` of a training checkpoint, without its tensors."""
    return json.loads((Path(directory) / _META_FILE).read_text())


def load_training_state(directory: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> TrainingState:
    """Read a checkpoint written by :func:`save_training_state` (no pickled code is executed)."""
    directory = Path(directory)
    meta = read_training_meta(directory)
    tensors = torch.load(directory / _STATE_FILE, map_location=map_location, weights_only=True)
    return TrainingState(
        epoch=int(meta["epoch"]),
        model=tensors["model"],
        optimizer=tensors["optimizer"],
        scheduler=tensors["scheduler"],
        scaler=tensors.get("scaler"),
        history=list(meta.get("history") or []),
        fingerprint=dict(meta.get("fingerprint") or {}),
    )
