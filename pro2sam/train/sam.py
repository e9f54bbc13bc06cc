"""Training a small SAM on synthetic scenes, class-agnostically, the way Segment Anything was trained.

The official SAM weights are out of reach here, so a small variant of :data:`SAM_VARIANTS`
("synthetic" for the shipped model, "tiny" in tests) is trained from scratch on the ``sam``
stream of :mod:`pro2sam.synthetic` (scenes that never appear in a written data set). The recipe follows the SAM paper (Kirillov et al., 2023, §3 and appendix A)
for single-point prompts, the only prompts Pro2SAM gives SAM:

- every target is one mask: a whole target object, its class part, or a distractor (SAM-tiny is
  told nothing about classes); each prompt is one foreground point drawn uniformly inside its
  target;
- multimask output: the decoder's three masks are all scored, and only the one with the lowest
  mask loss is back-propagated (a point on a part may mean the part or the whole object);
- mask loss = 20 * focal + 1 * dice, on the logits upsampled to the input frame;
- the IoU head regresses, with MSE (weight 1), the actual IoU of each of the three outputs
  (logits > 0) with the target;
- AdamW (lr 8e-4, weight decay 0.1, betas 0.9/0.999), linear warm-up then cosine decay.

Left out from SAM's recipe: the interactive rounds (extra points and mask prompts sampled from
the errors of earlier rounds), box prompts and the single-output path, none of which Pro2SAM uses.

Frames: "input" is SAM's padded square input (256 x 256 for tiny) after the image is resized so
that its longest side is 256 (:class:`segment_anything.utils.transforms.ResizeLongestSide`),
exactly as :class:`pro2sam.candidates.GridCandidateGenerator` feeds SAM at inference.
"""

from __future__ import annotations

import io
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import sigmoid_focal_loss

from ..checkpoints import load_state_dict
from ..sam import SAM_PIXEL_MEAN, SAM_PIXEL_STD, SAM_VARIANTS, SamVariant, sam_from_variant
from ..storage import sha256_file, write_bytes_atomic
from ..synthetic import DEFAULT_SIZE_RANGE, GENERATOR_VERSION, REGIMES, SyntheticScene, make_scene
from .schedule import lr_at_step, make_optimizer

__all__ = [
    "SamTrainConfig",
    "PromptedScenes",
    "prompt_targets",
    "predict_prompted",
    "sam_losses",
    "train_step",
    "evaluate_prompted",
    "train_sam",
]

# Loss weights of the SAM paper: mask loss = 20 focal + 1 dice; IoU MSE added with weight 1.
FOCAL_WEIGHT = 20.0
DICE_WEIGHT = 1.0
IOU_WEIGHT = 1.0
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
# Scenes for the held-out check start here in the "sam" stream (training uses indices below).
HELD_OUT_START = 1_000_000_000


@dataclass
class SamTrainConfig:
    """One SAM-tiny training run.

    Attributes:
        steps: optimiser steps.
        batch_size: images per step.
        prompts_per_image: targets (one point each) per image; the image is encoded once for all.
        lr, weight_decay, betas: AdamW (SAM: 8e-4, 0.1, (0.9, 0.999)); no decay on biases and
            other 1-D parameters.
        warmup_steps: linear warm-up; None gives min(250, steps // 10) (SAM warms up 250 steps).
        max_grad_norm: gradient clipping (0: off).
        size_range: (smallest, largest) side of the generated scenes, px.
        scene_pool: draw scenes from the first N of the stream only (None: a new scene for every
            image of every step). Prompts are drawn anew on every visit; each DataLoader process
            keeps the scenes it generated in memory (about 0.5 MB each).
        seed: model initialisation, scenes and prompts.
        variant: the SAM architecture (a key of :data:`pro2sam.sam.SAM_VARIANTS`).
        num_workers: DataLoader processes generating scenes (0: in this process).
        eval_scenes: held-out scenes scored after training (0: none).
        log_every: steps between loss records.
        loss_size: side of the square frame the mask loss and the IoU targets are computed in
            (logits upsampled bilinearly, targets area-averaged then thresholded at 0.5).
            None: the input frame, as SAM does; smaller sides make each step cheaper.
        regimes: regimes of the synthetic world (:data:`pro2sam.synthetic.REGIMES`) the scenes
            are drawn from, in turn (scene ``i`` in ``regimes[i % len(regimes)]``). With
            ``"object"``, the object with its support is a target too (:func:`prompt_targets`).
    """

    steps: int = 4000
    batch_size: int = 16
    prompts_per_image: int = 4
    lr: float = 8e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int | None = None
    max_grad_norm: float = 1.0
    size_range: tuple[int, int] = DEFAULT_SIZE_RANGE
    scene_pool: int | None = None
    seed: int = 0
    variant: str = "tiny"
    num_workers: int = 0
    eval_scenes: int = 64
    log_every: int = 50
    loss_size: int | None = None
    regimes: tuple[str, ...] = ("part",)

    def __post_init__(self) -> None:
        self.regimes = tuple(self.regimes)
        if not self.regimes or any(r not in REGIMES for r in self.regimes):
            raise ValueError(f"regimes must be a non-empty tuple of {REGIMES}, got {self.regimes}")
        if not isinstance(SAM_VARIANTS.get(self.variant), SamVariant):
            v1 = sorted(k for k, v in SAM_VARIANTS.items() if isinstance(v, SamVariant))
            raise ValueError(f"unknown SAM variant {self.variant!r} for training; choose from {v1}")
        if self.steps < 1 or self.batch_size < 1 or self.prompts_per_image < 1:
            raise ValueError("steps, batch_size and prompts_per_image must be >= 1")

    @property
    def warmup(self) -> int:
        return min(250, self.steps // 10) if self.warmup_steps is None else self.warmup_steps


# ---------------------------------------------------------------- data


def prompt_targets(scene: SyntheticScene) -> list[np.ndarray]:
    """The scene's segmentation targets, (H, W) bool each: the whole object, its part, each
    distractor and, where the object sits on a support (object regime), the object with its
    support: a click on the object then has three right answers (part, object, object + support),
    SA-1B's nested granularities. Empty ones, which rasterising tiny shapes can give, are skipped."""
    targets = [scene.object_mask, scene.part_mask, *scene.distractor_masks]
    if scene.support_mask is not None and scene.support_mask.any():
        targets.append(scene.object_mask | scene.support_mask)
    return [t for t in targets if t.any()]


class PromptedScenes(Dataset):
    """Item ``i``: one scene of the ``sam`` stream with ``prompts_per_image`` point prompts.

    Every item is a pure function of ``(seed, i)``, so a run is reproducible whatever the number
    of DataLoader workers. Targets are taken in a shuffled cycle (each one is prompted at least
    once when there are enough prompts).

    Returns a dict:
        image: (3, S, S) float32, SAM-normalised, zero-padded input (S = image_size).
        points: (P, 1, 2) float32 point coordinates (x, y) in the input frame.
        labels: (P, 1) int64, all 1 (foreground clicks).
        masks: (P, S, S) bool targets in the input frame (false in the padding).
    """

    def __init__(
        self,
        *,
        seed: int,
        length: int,
        image_size: int,
        prompts_per_image: int,
        size_range: tuple[int, int] = DEFAULT_SIZE_RANGE,
        scene_pool: int | None = None,
        first_index: int = 0,
        regimes: tuple[str, ...] = ("part",),
    ) -> None:
        self.seed, self.length, self.image_size = seed, length, image_size
        self.prompts_per_image, self.size_range = prompts_per_image, tuple(size_range)
        self.scene_pool, self.first_index = scene_pool, first_index
        self.regimes = tuple(regimes)
        self.transform = ResizeLongestSide(image_size)
        # With a pool, each scene is generated once per process and kept (generation costs tens
        # of milliseconds, about as much as a training step spends per image).
        self._cache: dict[int, SyntheticScene] = {}

    def __len__(self) -> int:
        return self.length

    def scene_index(self, i: int) -> int:
        return self.first_index + (i % self.scene_pool if self.scene_pool else i)

    def scene(self, index: int) -> SyntheticScene:
        """Scene ``index`` of the ``sam`` stream, in regime ``regimes[index % len(regimes)]``
        (kept in memory when drawing from a pool)."""
        scene = self._cache.get(index)
        if scene is None:
            regime = self.regimes[index % len(self.regimes)]
            scene = make_scene(self.seed, "sam", index, size_range=self.size_range, regime=regime)
            if self.scene_pool:
                self._cache[index] = scene
        return scene

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        scene = self.scene(self.scene_index(i))
        rng = np.random.default_rng([self.seed, self.first_index, i, 1])
        h, w = scene.object_mask.shape
        new_h, new_w = ResizeLongestSide.get_preprocess_shape(h, w, self.image_size)
        s = self.image_size

        resized = self.transform.apply_image(scene.image).astype(np.float32)
        image = np.zeros((s, s, 3), np.float32)
        image[:new_h, :new_w] = (resized - np.array(SAM_PIXEL_MEAN, np.float32)) / np.array(SAM_PIXEL_STD, np.float32)

        targets = prompt_targets(scene)
        order = np.concatenate([rng.permutation(len(targets)) for _ in range(-(-self.prompts_per_image // len(targets)))])
        masks = np.zeros((self.prompts_per_image, s, s), bool)
        points = np.zeros((self.prompts_per_image, 1, 2), np.float32)
        for p, t in enumerate(order[: self.prompts_per_image]):
            ys, xs = np.nonzero(targets[t])
            k = int(rng.integers(len(xs)))
            points[p, 0] = self.transform.apply_coords(np.array([xs[k] + 0.5, ys[k] + 0.5]), (h, w))
            masks[p, :new_h, :new_w] = cv2.resize(
                targets[t].astype(np.uint8), (new_w, new_h), interpolation=cv2.INTER_NEAREST
            ).astype(bool)
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
            "points": torch.from_numpy(points),
            "labels": torch.ones((self.prompts_per_image, 1), dtype=torch.int64),
            "masks": torch.from_numpy(masks),
        }


# ---------------------------------------------------------------- model and losses


def predict_prompted(sam: Sam, images: torch.Tensor, points: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Three masks per point prompt, with gradients.

    Args:
        images: (B, 3, S, S) normalised, padded input.
        points: (B, P, 1, 2) coordinates in the input frame; labels: (B, P, 1).

    Returns:
        low_res_logits (B, P, 3, S/4, S/4) and iou_predictions (B, P, 3).
    """
    embeddings = sam.image_encoder(images)
    image_pe = sam.prompt_encoder.get_dense_pe()
    logits, ious = [], []
    for b in range(images.shape[0]):  # the decoder takes one image embedding at a time
        sparse, dense = sam.prompt_encoder(points=(points[b], labels[b]), boxes=None, masks=None)
        low_res, iou = sam.mask_decoder(
            image_embeddings=embeddings[b : b + 1],
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
        logits.append(low_res)
        ious.append(iou)
    return torch.stack(logits), torch.stack(ious)


def sam_losses(
    low_res_logits: torch.Tensor, iou_predictions: torch.Tensor, masks: torch.Tensor, *, size: int | None = None
) -> dict[str, torch.Tensor]:
    """SAM's training loss for multimask outputs.

    Args:
        low_res_logits: (..., 3, h, w) mask logits; upsampled bilinearly to the loss frame.
        iou_predictions: (..., 3).
        masks: (..., H, W) bool targets (one per prompt).
        size: side of the square loss frame; None: the targets' own (H, W). Targets are
            area-averaged to it and thresholded at 0.5.

    Returns:
        dict of scalars: ``loss`` (to back-propagate: mask loss of the best of the three outputs
        + IoU MSE over all three), ``mask``, ``focal``, ``dice`` (of the best output), ``iou_mse``,
        and ``best_iou`` (mean actual IoU of the best output, no gradient).
    """
    if size is not None and tuple(masks.shape[-2:]) != (size, size):
        lead = masks.shape[:-2]
        small = F.interpolate(masks.flatten(0, -3)[:, None].float(), (size, size), mode="area")
        masks = (small[:, 0] >= 0.5).reshape(*lead, size, size)
    h, w = masks.shape[-2:]
    logits = F.interpolate(low_res_logits.flatten(0, -4), (h, w), mode="bilinear", align_corners=False)
    target = masks.flatten(0, -3)[:, None].expand_as(logits).float()  # (N, 3, H, W)
    focal = sigmoid_focal_loss(logits, target, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA, reduction="none").mean((-2, -1))
    prob = logits.sigmoid()
    dice = 1 - (2 * (prob * target).sum((-2, -1)) + 1) / (prob.sum((-2, -1)) + target.sum((-2, -1)) + 1)
    mask_loss = FOCAL_WEIGHT * focal + DICE_WEIGHT * dice  # (N, 3)
    best = mask_loss.detach().argmin(1, keepdim=True)
    with torch.no_grad():
        pred = logits > 0
        truth = target > 0.5
        inter = (pred & truth).sum((-2, -1)).float()
        union = (pred | truth).sum((-2, -1)).float()
        actual_iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    iou_mse = F.mse_loss(iou_predictions.reshape(-1, logits.shape[1]), actual_iou)
    chosen = mask_loss.gather(1, best).mean()
    return {
        "loss": chosen + IOU_WEIGHT * iou_mse,
        "mask": chosen.detach(),
        "focal": focal.gather(1, best).mean().detach(),
        "dice": dice.gather(1, best).mean().detach(),
        "iou_mse": iou_mse.detach(),
        "best_iou": actual_iou.gather(1, best).mean(),
    }


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(
    sam: Sam,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    *,
    max_grad_norm: float = 0.0,
    loss_size: int | None = None,
) -> dict[str, float]:
    """One optimiser step on a collated :class:`PromptedScenes` batch; returns the loss terms."""
    sam.train()
    logits, ious = predict_prompted(sam, batch["image"], batch["points"], batch["labels"])
    losses = sam_losses(logits, ious, batch["masks"], size=loss_size)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(sam.parameters(), max_grad_norm)
    optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()}


@torch.no_grad()
def evaluate_prompted(sam: Sam, dataset: PromptedScenes, *, batch_size: int = 8, device: str | torch.device = "cpu") -> dict[str, float]:
    """Mean IoU of single-point prompts on ``dataset``: of the best of the three outputs
    (``best_iou``) and of the output SAM itself ranks first by predicted IoU (``top_iou``, what
    a single answer would be), plus the IoU head's mean absolute error."""
    sam.eval()
    device = torch.device(device)
    totals = {"best_iou": 0.0, "top_iou": 0.0, "iou_abs_error": 0.0}
    count = 0
    for batch in DataLoader(dataset, batch_size=batch_size):
        batch = _to(batch, device)
        logits, ious = predict_prompted(sam, batch["image"], batch["points"], batch["labels"])
        s = batch["masks"].shape[-1]
        pred = F.interpolate(logits.flatten(0, 1), (s, s), mode="bilinear", align_corners=False) > 0
        truth = batch["masks"].flatten(0, 1)[:, None]
        actual = (pred & truth).sum((-2, -1)).float() / (pred | truth).sum((-2, -1)).float().clamp(min=1)
        predicted = ious.flatten(0, 1)
        totals["best_iou"] += float(actual.max(1).values.sum())
        totals["top_iou"] += float(actual.gather(1, predicted.argmax(1, keepdim=True)).sum())
        totals["iou_abs_error"] += float((predicted - actual).abs().mean(1).sum())
        count += actual.shape[0]
    return {k: v / max(count, 1) for k, v in totals.items()} | {"num_prompts": count}


# ---------------------------------------------------------------- the run


def _save_state_dict(sam: Sam, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in sam.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        data = save(state)
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
    write_bytes_atomic(str(path), data)  # a reader never sees half a file


def _init_fields(init_from: str | Path | None) -> dict:
    """The record's ``init_from`` (the file and SHA-256 of the weights a run continues from) and,
    when the ``.json`` beside them is the record of those very weights, ``init_record``, so that a
    fine-tuned SAM's record holds its whole lineage; ``{"init_from": None}`` for a run from scratch."""
    if init_from is None:
        return {"init_from": None}
    digest = sha256_file(Path(init_from))
    fields = {"init_from": {"file": Path(init_from).name, "sha256": digest}}
    try:
        parent = json.loads(Path(init_from).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return fields
    if isinstance(parent, dict) and parent.get("sha256") == digest:
        fields["init_record"] = parent
    return fields


def train_sam(
    out_path: str | Path,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    device: str | torch.device | None = None,
    command: str | None = None,
    checkpoint_every: int = 0,
    init_from: str | Path | None = None,
    **options,
) -> dict:
    """Train a small SAM variant on synthetic scenes (from scratch, or on from ``init_from``'s
    weights) and save its state dict.

    ``build_sam(variant, out_path)`` loads the result. A JSON record is written next
    to it (``out_path`` with suffix ``.json``): the command, seed, full config, loss history,
    held-out IoUs, wall time, versions and the weights' SHA-256.

    Args:
        out_path: ``.pth`` (torch.save of the state dict) or ``.safetensors``.
        steps, batch_size, seed: see :class:`SamTrainConfig`.
        device: default CUDA when available.
        command: recorded in the JSON (default: this process's command line).
        checkpoint_every: also save weights and record every N steps (0: only at the end).
        init_from: a state dict of the same variant (``.pth`` / ``.safetensors``, as this
            function writes) to continue from, e.g. to fine-tune a SAM on a second regime; its
            SHA-256 goes into the record. The optimiser and the schedule start anew.
        **options: other :class:`SamTrainConfig` fields.

    Returns:
        The JSON record as a dict.
    """
    config = SamTrainConfig(steps=steps, batch_size=batch_size, seed=seed, **options)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    record_path = out_path.with_suffix(".json")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variant = SAM_VARIANTS[config.variant]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        sam = sam_from_variant(variant)
    if init_from is not None:
        sam.load_state_dict(load_state_dict(init_from, what=f"SAM {config.variant} weights to continue from"), strict=True)
    sam = sam.to(device)
    optimizer = make_optimizer(sam, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas)

    def lr_at(step: int) -> float:
        return lr_at_step(step, lr=config.lr, total_steps=config.steps, warmup_steps=config.warmup)

    data = PromptedScenes(
        seed=config.seed,
        length=config.steps * config.batch_size,
        image_size=variant.image_size,
        prompts_per_image=config.prompts_per_image,
        size_range=config.size_range,
        scene_pool=config.scene_pool,
        regimes=config.regimes,
    )
    loader = DataLoader(
        data,
        batch_size=config.batch_size,
        shuffle=False,  # item i is already a random scene; order is the sampling
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=config.num_workers > 0,
    )
    record = {
        "what": f"SAM {config.variant} trained "
        + ("from scratch" if init_from is None else f"from {Path(init_from).name}")
        + f" on pro2sam.synthetic 'sam' stream scenes ({' and '.join(config.regimes)} regime)",
        "weights": out_path.name,
        "command": command if command is not None else shlex.join(["python", *sys.argv]),
        "seed": config.seed,
        **_init_fields(init_from),
        "config": asdict(config),
        "synthetic_generator_version": GENERATOR_VERSION,
        "device": str(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "history": [],
    }

    def write_record(step: int, seconds: float) -> None:
        record.update(steps_done=step, wall_seconds=round(seconds, 1))
        _save_state_dict(sam, out_path)
        record["sha256"] = sha256_file(out_path)
        record_path.write_text(json.dumps(record, indent=2) + "\n")

    start = time.perf_counter()
    window: dict[str, float] = {}
    for step, batch in enumerate(loader):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        stats = train_step(
            sam, optimizer, _to(batch, device), max_grad_norm=config.max_grad_norm, loss_size=config.loss_size
        )
        for k, v in stats.items():
            window[k] = window.get(k, 0.0) + v
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            n = (done - 1) % config.log_every + 1
            entry = {"step": done, "lr": lr_at(step)} | {k: round(v / n, 5) for k, v in window.items()}
            record["history"].append(entry)
            window = {}
            print(
                f"step {done}/{config.steps} loss {entry['loss']:.4f} focal {entry['focal']:.4f} "
                f"dice {entry['dice']:.4f} iou_mse {entry['iou_mse']:.4f} best_iou {entry['best_iou']:.3f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
        if checkpoint_every and done % checkpoint_every == 0 and done < config.steps:
            write_record(done, time.perf_counter() - start)

    if config.eval_scenes:
        held_out = PromptedScenes(
            seed=config.seed,
            length=config.eval_scenes,
            image_size=variant.image_size,
            prompts_per_image=config.prompts_per_image,
            size_range=config.size_range,
            first_index=HELD_OUT_START,
            regimes=config.regimes,
        )
        record["held_out"] = evaluate_prompted(sam, held_out, device=device)
    write_record(config.steps, time.perf_counter() - start)
    return record
