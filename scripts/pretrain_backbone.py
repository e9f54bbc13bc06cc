"""Pretrain a DeiT backbone on the offline world's ImageNet and export it in timm's DeiT format.

    python scripts/pretrain_backbone.py --output /work/quality_runs/backbone --num-images 40000

What ImageNet is for DeiT, :mod:`pro2sam.synthetic_pretrain` is here (METHOD.md §5): 144 classes
(part hue x accent colour of its pattern x texture of the body the part belongs to), none of them
the target world's. The model is a plain timm ``VisionTransformer`` of a GTFormer preset's sizes
(:func:`pro2sam.gtformer.create_deit_backbone`) with ``dynamic_img_size``, so it trains on
``--size`` px scenes (fewer tokens, more images per minute) while its position embedding stays
the 224 px one. GTFormer is then fine-tuned from the export through the same path that loads
real DeiT weights::

    python jobs/train_gtformer.py ... --backbone-checkpoint OUTPUT/backbone.safetensors

Besides the class-token head (exported as ``head.*``), training-only heads (not exported) read
the class from the average of the patch tokens (``--avg-head-weight``: trains the patch tokens
to carry the class, as GTFormer's classifier reads them) and each class factor (hue, accent,
texture) from the class token, the patch average and the patch maximum (``--factor-weight``,
``--max-head-weight``: easier signals early on, while a ViT trained from scratch would otherwise
sit at chance for hundreds of steps).

Writes into ``--output``:

- ``backbone.safetensors``: the state dict, timm DeiT keys (``cls_token``, ``pos_embed``,
  ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``, ``head.*``), float32;
- ``backbone.json``: command, seeds, settings, per-epoch history (loss, held-out accuracy of each
  head and of each class factor), wall times of data generation and training, the process's CPU
  time, ``uptime`` before and after, machine, SHA-256 of the weights.

No Ray; the scenes are generated before training (``--cache`` keeps them on disk, memory-mapped,
for later runs; the generation time is recorded apart from the training time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from pro2sam.storage import sha256_file
from pro2sam.gtformer import GTFORMER_PRESETS, create_deit_backbone
from pro2sam.synthetic_pretrain import (
    PRETRAIN_CLASSES,
    PRETRAIN_HUES,
    PRETRAIN_ACCENTS,
    PRETRAIN_TEXTURES,
    PRETRAIN_GENERATOR_VERSION,
    make_pretrain_arrays,
    pretrain_class_factors,
)
from pro2sam.train.schedule import lr_at_step, param_groups

WEIGHTS_FILE = "backbone.safetensors"
RECORD_FILE = "backbone.json"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + " ".join(Path("/proc/loadavg").read_text().split()[:3])


def load_or_make(seed: int, count: int, size: int, workers: int, cache: Path | None, first: int = 0):
    """Pretraining scenes ``first .. first + count - 1``: (images (N, S, S, 3) uint8, labels (N,)
    int64, seconds spent generating, cache folder read or None). With ``cache`` they are written
    there as .npy files once and memory-mapped afterwards."""
    if cache is None:
        start = time.perf_counter()
        images, labels = make_pretrain_arrays(seed, count, first=first, size=size, workers=workers)
        return images, labels, time.perf_counter() - start, None
    folder = cache / f"pretrain_v{PRETRAIN_GENERATOR_VERSION}_seed{seed}_from{first}_n{count}_s{size}"
    if (folder / "labels.npy").is_file():
        return np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "labels.npy"), 0.0, str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8, shape=(count, size, size, 3))
    images, labels = make_pretrain_arrays(seed, count, first=first, size=size, workers=workers, out=images)
    images.flush()
    np.save(folder / "labels.npy", labels)  # written last: marks the folder complete
    return np.load(folder / "images.npy", mmap_mode="r"), labels, time.perf_counter() - start, None


class Normalise:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 normalised with ImageNet mean/std."""

    def __init__(self) -> None:
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1) * 255

    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2).float()
        return (x - self.mean) / self.std


class AuxHeads(torch.nn.Module):
    """Training-only heads (not exported): the class from the patch-token average, and each class
    factor (hue, accent, texture) from the class token, the patch-token average and maximum."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        sizes = (len(PRETRAIN_HUES), len(PRETRAIN_ACCENTS), len(PRETRAIN_TEXTURES))
        self.avg = torch.nn.Linear(dim, len(PRETRAIN_CLASSES))
        self.factors_cls = torch.nn.Linear(dim, sum(sizes))
        self.factors_avg = torch.nn.Linear(dim, sum(sizes))
        self.factors_max = torch.nn.Linear(dim, sum(sizes))
        self.sizes = sizes


def heads(model, aux: AuxHeads, x):
    """Logits of a batch: class-token head, patch-average head, and the three factor heads (class
    token, patch average, patch maximum)."""
    tokens = model.forward_features(x)
    cls_logits = model.forward_head(tokens)
    patches = tokens[:, model.num_prefix_tokens :]
    patch_mean = patches.mean(dim=1)
    factors = (aux.factors_cls(tokens[:, 0]), aux.factors_avg(patch_mean), aux.factors_max(patches.max(dim=1).values))
    return cls_logits, aux.avg(patch_mean), *factors


def factor_loss(logits: torch.Tensor, factors: torch.Tensor, sizes, smoothing: float) -> torch.Tensor:
    """Sum over the class factors of the cross-entropy of that factor's slice of ``logits``."""
    total, start = 0.0, 0
    for j, n in enumerate(sizes):
        total = total + F.cross_entropy(logits[:, start : start + n], factors[:, j], label_smoothing=smoothing)
        start += n
    return total


@torch.no_grad()
def evaluate(model, aux, images, labels, normalise, batch_size: int = 128) -> dict:
    model.eval()
    correct = {"cls": 0, "avg": 0, "hue": 0, "accent": 0, "texture": 0}
    loss_sum = 0.0
    factors = np.array([pretrain_class_factors(int(c)) for c in range(len(PRETRAIN_CLASSES))])
    for a in range(0, len(labels), batch_size):
        x = normalise(images[a : a + batch_size])
        y = torch.from_numpy(labels[a : a + batch_size])
        cls_logits, avg_logits, *_ = heads(model, aux, x)
        loss_sum += F.cross_entropy(cls_logits, y, reduction="sum").item()
        pred = cls_logits.argmax(1).numpy()
        correct["cls"] += int((pred == y.numpy()).sum())
        correct["avg"] += int((avg_logits.argmax(1) == y).sum())
        for j, key in enumerate(("hue", "accent", "texture")):
            correct[key] += int((factors[pred, j] == factors[y.numpy(), j]).sum())
    n = max(len(labels), 1)
    model.train()
    return {"val_loss": loss_sum / n, **{f"val_{k}_accuracy": v / n for k, v in correct.items()}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, required=True, help="folder for backbone.safetensors and backbone.json")
    p.add_argument("--preset", default="gtformer_synthetic_patch16_224", choices=sorted(GTFORMER_PRESETS),
                   help="GTFormer preset whose backbone sizes to train (default %(default)s)")  # fmt: skip
    p.add_argument("--num-images", type=int, default=40000, help="distinct training scenes (default %(default)s)")
    p.add_argument("--num-val", type=int, default=1000, help="held-out scenes for accuracy (default %(default)s)")
    p.add_argument("--size", type=int, default=144, help="scene side in px, a multiple of 16 (default %(default)s)")
    p.add_argument("--epochs", type=float, default=2.0, help="passes over the scenes; fractions allowed")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--drop-path", type=float, default=0.05, help="stochastic depth rate (default %(default)s)")
    p.add_argument("--avg-head-weight", type=float, default=1.0, help="weight of the patch-average head's loss")
    p.add_argument("--factor-weight", type=float, default=1.0,
                   help="weight of the per-factor (hue, accent, texture) losses")  # fmt: skip
    p.add_argument("--max-head-weight", type=float, default=0.0,
                   help="weight of the factor head on the patch-token maximum (a part is a few tokens)")  # fmt: skip
    p.add_argument("--clip-grad", type=float, default=1.0, help="gradient norm clip (0: none)")
    p.add_argument("--seed", type=int, default=0, help="model initialisation, order and flips")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the pretraining scenes")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    p.add_argument("--data-workers", type=int, default=2, help="processes generating the scenes")
    p.add_argument("--cache", type=Path, help="folder to keep / reuse the generated scenes (.npy, memory-mapped)")
    p.add_argument("--eval-every", type=float, default=0.5, help="held-out evaluation every this many epochs")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.size % 16:
        p.error("--size must be a multiple of the patch size 16")

    torch.set_num_threads(args.threads)
    command = shlex.join([os.path.basename(sys.executable), *sys.argv])
    record: dict = {
        "command": command,
        "what": "DeiT backbone pretrained on pro2sam.synthetic_pretrain (timm DeiT state dict)",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "classes": list(PRETRAIN_CLASSES),
        "pretrain_generator_version": PRETRAIN_GENERATOR_VERSION,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "threads": torch.get_num_threads(), "device": "cpu"},  # fmt: skip
        "uptime_before": uptime(),
    }
    print(f"[pretrain] {record['uptime_before']}", flush=True)

    images, labels, gen_train, cached = load_or_make(args.data_seed, args.num_images, args.size, args.data_workers, args.cache)
    val_images, val_labels, gen_val, _ = load_or_make(
        args.data_seed, args.num_val, args.size, args.data_workers, args.cache, first=args.num_images
    )
    record["data"] = {"train_scenes": [0, args.num_images], "val_scenes": [args.num_images, args.num_images + args.num_val],
                      "generation_seconds": gen_train + gen_val, "read_from_cache": cached}  # fmt: skip
    print(f"[pretrain] {len(labels)} + {len(val_labels)} scenes ({gen_train + gen_val:.0f} s to generate)", flush=True)

    torch.manual_seed(args.seed)
    model = create_deit_backbone(
        args.preset, num_classes=len(PRETRAIN_CLASSES), dynamic_img_size=True, drop_path_rate=args.drop_path
    )
    aux = AuxHeads(model.embed_dim)
    groups = param_groups(model, args.weight_decay)
    for g, extra in zip(groups, param_groups(aux, args.weight_decay)):
        g["params"] = g["params"] + extra["params"]
    factor_table = torch.tensor([pretrain_class_factors(c) for c in range(len(PRETRAIN_CLASSES))])
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    steps_per_epoch = math.ceil(len(labels) / args.batch_size)
    total_steps = max(1, round(args.epochs * steps_per_epoch))
    eval_every = max(1, round(args.eval_every * steps_per_epoch))
    normalise = Normalise()
    rng = np.random.default_rng(args.seed)
    history: list[dict] = []

    start, cpu_start = time.perf_counter(), time.process_time()
    model.train()
    order = np.empty(0, np.int64)
    loss_sum = correct = seen = 0.0
    for step in range(total_steps):
        if len(order) < args.batch_size:
            order = np.concatenate([order, rng.permutation(len(labels))])
        idx, order = np.sort(order[: args.batch_size]), order[args.batch_size :]
        x = normalise(images[idx])
        flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        y = torch.from_numpy(labels[idx])
        lr = lr_at_step(step, lr=args.lr, total_steps=total_steps, warmup_steps=args.warmup_steps, min_lr=args.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        cls_logits, avg_logits, factors_cls, factors_avg, factors_max = heads(model, aux, x)
        smoothing = args.label_smoothing
        loss = F.cross_entropy(cls_logits, y, label_smoothing=smoothing)
        if args.avg_head_weight:
            loss = loss + args.avg_head_weight * F.cross_entropy(avg_logits, y, label_smoothing=smoothing)
        if args.factor_weight:
            factors = factor_table[y]
            loss = loss + args.factor_weight * (
                factor_loss(factors_cls, factors, aux.sizes, smoothing)
                + args.avg_head_weight * factor_loss(factors_avg, factors, aux.sizes, smoothing)
                + args.max_head_weight * factor_loss(factors_max, factors, aux.sizes, smoothing)
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_([q for g in optimizer.param_groups for q in g["params"]], args.clip_grad)
        optimizer.step()
        loss_sum += loss.item() * len(idx)
        correct += (cls_logits.argmax(1) == y).sum().item()
        seen += len(idx)
        if (step + 1) % eval_every == 0 or step + 1 == total_steps:
            train_seconds = time.perf_counter() - start
            entry = {"step": step + 1, "epoch": (step + 1) / steps_per_epoch, "lr": lr,
                     "train_loss": loss_sum / seen, "train_accuracy": correct / seen}  # fmt: skip
            entry.update(evaluate(model, aux, val_images, val_labels, normalise))
            entry["seconds"] = time.perf_counter() - start
            entry["cpu_seconds"] = time.process_time() - cpu_start
            entry["eval_seconds"] = entry["seconds"] - train_seconds
            history.append(entry)
            shown = " ".join(f"{k} {v:.4g}" for k, v in entry.items())
            print(f"[pretrain] {shown}", flush=True)
            loss_sum = correct = seen = 0.0
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start

    from safetensors.torch import save_file

    args.output.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.output / WEIGHTS_FILE), metadata={"format": "pt"})
    record.update(
        steps=total_steps,
        images_seen=total_steps * args.batch_size,
        train_wall_seconds=wall,
        # CPU seconds of this process (all threads): about wall x threads on an otherwise idle machine
        train_cpu_seconds=cpu,
        history=history,
        uptime_after=uptime(),
        weights=WEIGHTS_FILE,
        sha256=sha256_file(args.output / WEIGHTS_FILE),
        keys="timm DeiT / VisionTransformer (global_pool='token'); img_size 224, loaded by --backbone-checkpoint",
    )
    (args.output / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    print(f"[pretrain] {record['uptime_after']}", flush=True)
    print(f"[pretrain] {total_steps} steps in {wall:.0f} s; wrote {args.output / WEIGHTS_FILE}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
