"""Class scores from a separate classifier, for Top-1 / Top-5 Loc (METHOD.md §4); no Ray here.

The paper's Table 1 takes the classes of Pro2SAM's Top-1 / Top-5 Loc from a separate classifier
(EfficientNet-B7) while GTFormer + SAM give the box. :class:`Classifier` is that classifier: any
``timm`` model built by name, its weights read from a local state-dict file through
:func:`pro2sam.checkpoints.load_state_dict` (never pickled code), or a GTFormer export used for
its class scores only. :func:`pro2sam.evaluation.evaluate_predictions` takes its top-k classes
per image (``classes=``); the evaluation job runs it (``EvaluateJobConfig.classifier``).

Preprocessing is the model's own: for timm, its pretrained config's eval transform (input size,
resize + centre crop by ``crop_pct``, interpolation, mean and std; ``name.tag`` selects the
config of that tag, e.g. ``tf_efficientnet_b7.ns_jft_in1k``: 600 px, bicubic, crop 0.949); for a
GTFormer export, the plain resize to its input size and the normalisation in its ``config.json``,
as :meth:`pro2sam.model.Pro2SAM.preprocess` does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .checkpoints import CheckpointError, load_state_dict
from .storage import sha256_file

__all__ = ["GTFORMER_CLASSIFIER", "ClassifierConfig", "Classifier"]

# The ``ClassifierConfig.model`` that names a GTFormer export instead of a timm model.
GTFORMER_CLASSIFIER = "gtformer"


@dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    """Which classifier gives the class scores.

    Attributes:
        model: a timm model name (``tf_efficientnet_b7``, or ``name.tag`` to pick the pretrained
            config whose preprocessing is used), or ``"gtformer"`` for a GTFormer export.
        checkpoint: its weights, local or URI: for timm a state-dict file (``.safetensors``, or a
            torch file of tensors only; the classifier head may have any number of classes),
            for ``"gtformer"`` the export folder (``model.safetensors`` + ``config.json``).
        top_k: classes kept per image, best first.
        batch_size: images per forward pass.
    """

    model: str
    checkpoint: str
    top_k: int = 5
    batch_size: int = 16

    def validate(self) -> None:
        """Raise ValueError, naming the option, for a setting no run could use."""
        if not self.model:
            raise ValueError("--classifier: give a timm model name or 'gtformer'")
        if not self.checkpoint:
            raise ValueError(
                f"--classifier {self.model}: --classifier-checkpoint is required (no weights are downloaded)"
            )
        if self.top_k < 1:
            raise ValueError(f"classifier top_k {self.top_k}: must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"classifier batch_size {self.batch_size}: must be >= 1")


class Classifier:
    """A loaded image classifier: RGB images -> their top-k classes.

    Args:
        model: maps a (B, 3, H, W) float batch to (B, C) logits; put in eval mode here.
        transform: PIL RGB image -> (3, H, W) float tensor (the model's eval preprocessing).
        description: what it is, for reports (JSON-ready: kind, model, checkpoint, sha256,
            num_classes, preprocessing).
        top_k: classes kept per image.
        batch_size: images per forward pass.
        device: where the model runs; default CUDA if available.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        description: dict,
        top_k: int = 5,
        batch_size: int = 16,
        device: str | torch.device | None = None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.transform = transform
        self.description = dict(description)
        self.top_k = top_k
        self.batch_size = batch_size

    @classmethod
    def load(cls, config: ClassifierConfig, *, device: str | torch.device | None = None) -> Classifier:
        """Build the classifier of ``config`` from its local weights (fetch remote ones first,
        e.g. with :func:`pro2sam.storage.fetch_to_local`).

        Raises:
            ValueError: ``config.model`` is not a timm model name.
            CheckpointError: the weights are missing, unreadable, carry pickled code or do not
                fit the model.
        """
        config.validate()
        if config.model == GTFORMER_CLASSIFIER:
            model, transform, description = _gtformer(config.checkpoint)
        else:
            model, transform, description = _timm(config.model, config.checkpoint)
        return cls(
            model, transform, description=description, top_k=config.top_k, batch_size=config.batch_size, device=device
        )

    def __str__(self) -> str:
        d = self.description
        sha = (d.get("sha256") or "")[:12]
        return f"{d['kind']} {d['model']} ({d['checkpoint']}, SHA-256 {sha}..., {d['num_classes']} classes)"

    @torch.inference_mode()
    def topk(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The ``top_k`` most probable classes of each image.

        Args:
            images: (H, W, 3) uint8 RGB arrays, any sizes.

        Returns:
            classes: (B, k) int64 class indices, most probable first (k = min(top_k, C)).
            scores: (B, k) float32 softmax probabilities of those classes.
        """
        classes, scores = [], []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            x = torch.stack([self.transform(Image.fromarray(np.asarray(img, dtype=np.uint8))) for img in chunk])
            probs = self.model(x.to(self.device)).float().softmax(-1)
            top = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
            classes.append(top.indices.cpu().numpy())
            scores.append(top.values.cpu().numpy())
        if not classes:
            return np.zeros((0, self.top_k), np.int64), np.zeros((0, self.top_k), np.float32)
        return np.concatenate(classes).astype(np.int64), np.concatenate(scores).astype(np.float32)


def _timm(name: str, path: str | os.PathLike):
    """(model, eval transform, description) of timm model ``name`` with the weights at ``path``."""
    import timm
    from timm.data import create_transform, resolve_model_data_config

    try:
        model = timm.create_model(name, pretrained=False)
    except RuntimeError as e:  # timm's "Unknown model"
        raise ValueError(f"--classifier {name!r} is not a timm model name ({e})") from None
    what = f"{name} classifier checkpoint"
    state = load_state_dict(path, what=what)
    head = model.pretrained_cfg.get("classifier")
    head = head[0] if isinstance(head, (list, tuple)) else head
    head_weight = state.get(f"{head}.weight") if head else None
    if head_weight is not None and head_weight.ndim >= 1 and head_weight.shape[0] != model.num_classes:
        model.reset_classifier(int(head_weight.shape[0]))  # e.g. a CUB fine-tune: 200 classes
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{what} {path} does not fit timm's {name}: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{what} {path} does not fit timm's {name}: missing keys {sorted(missing)[:5]}, unexpected keys "
            f"{sorted(unexpected)[:5]}"
        )
    data_config = resolve_model_data_config(model)
    description = {
        "kind": "timm",
        "model": name,
        "checkpoint": os.fspath(path),
        "sha256": sha256_file(path),
        "num_classes": int(model.num_classes),
        "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
    }
    return model, create_transform(**data_config, is_training=False), description


def _gtformer(path: str | os.PathLike):
    """(class-logits model, transform, description) of a GTFormer export."""
    from torchvision import transforms

    from .gtformer import GTFormerSettings, load_gtformer

    gtformer, config = load_gtformer(path)
    settings = GTFormerSettings.from_config(config)
    size, mean, std = settings.img_size, settings.mean, settings.std
    transform = transforms.Compose([
        transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])  # fmt: skip
    description = {
        "kind": "GTFormer",
        "model": config["preset"],
        "checkpoint": os.fspath(path),
        "sha256": config["sha256"],
        "num_classes": int(config["num_classes"]),
        "preprocessing": {"input_size": [3, size, size], "resize": "plain", "interpolation": "bilinear",
                          "mean": list(mean), "std": list(std)},  # fmt: skip
    }
    return _Logits(gtformer), transform, description


class _Logits(torch.nn.Module):
    """GTFormer's class logits alone (its forward returns logits and maps)."""

    def __init__(self, gtformer: torch.nn.Module) -> None:
        super().__init__()
        self.gtformer = gtformer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gtformer(x).logits
