"""GTFormer's export format: ``model.safetensors`` (the state dict) and ``config.json`` (the
preset, its overrides and the settings a user of the model needs, :class:`GTFormerSettings`).

:class:`GTFormerSettings` is the one place of the input's defaults (224 px, ImageNet's mean and
std), which :mod:`pro2sam.model` and :mod:`pro2sam.classifier` read a config through.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .checkpoints import CheckpointError, load_state_dict
from .storage import sha256_file, write_bytes_atomic

if TYPE_CHECKING:
    from .gtformer import GTFormer

__all__ = [
    "CONFIG_FORMAT",
    "CONFIG_VERSION",
    "WEIGHTS_FILE",
    "CONFIG_FILE",
    "GTFormerSettings",
    "DEFAULT_SETTINGS",
    "save_gtformer",
    "load_gtformer",
    "gtformer_class_names",
]

CONFIG_FORMAT = "pro2sam.gtformer"
CONFIG_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class GTFormerSettings:
    """How a GTFormer export wants its input, and what its outputs mean.

    Attributes:
        img_size: the square input side; images are plain-resized to it (no crop).
        mean, std: RGB normalisation on [0, 1] pixels, the training's.
        class_names: one name per class, index-aligned with the logits; None if not recorded.
    """

    img_size: int = 224
    mean: tuple[float, ...] = tuple(IMAGENET_DEFAULT_MEAN)
    std: tuple[float, ...] = tuple(IMAGENET_DEFAULT_STD)
    class_names: tuple[str, ...] | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> GTFormerSettings:
        """The settings of a ``config.json`` (as :func:`load_gtformer` returns it); a key it lacks
        (older exports) takes the default."""
        names = config.get("class_names")
        return cls(
            img_size=int(config.get("img_size", cls.img_size)),
            mean=tuple(config.get("mean", cls.mean)),
            std=tuple(config.get("std", cls.std)),
            class_names=tuple(names) if names else None,
        )


# What an export without those keys, or a model built without a config, uses.
DEFAULT_SETTINGS = GTFormerSettings()


def save_gtformer(
    model: GTFormer,
    path_dir: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] = DEFAULT_SETTINGS.mean,
    std: Sequence[float] = DEFAULT_SETTINGS.std,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Export a GTFormer built by :func:`create_gtformer` (or ``timm.create_model``).

    Writes ``path_dir/model.safetensors`` (the state dict) and ``path_dir/config.json``
    (``format``, ``version``, ``preset``, ``num_classes``, ``class_names``, ``img_size``,
    ``mean``, ``std``, ``overrides``, ``extra``); each file is written under a temporary name and
    renamed, so a reader never sees half a file.

    Args:
        class_names: one name per class, index-aligned with the logits.
        mean, std: the RGB normalisation (on [0, 1] pixels) the model was trained with.
        extra: JSON-serialisable details to keep (training run, data set, metrics, ...).

    Returns:
        The directory.
    """
    from safetensors.torch import save

    from .gtformer import GTFORMER_PRESETS

    preset = getattr(model, "preset", None)
    if preset not in GTFORMER_PRESETS:
        raise ValueError("save_gtformer needs a GTFormer built from a preset (create_gtformer or timm.create_model)")
    if class_names is not None and len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {model.num_classes} classes")
    config = {
        "format": CONFIG_FORMAT,
        "version": CONFIG_VERSION,
        "preset": preset,
        "num_classes": model.num_classes,
        "class_names": list(class_names) if class_names is not None else None,
        "img_size": int(model.patch_embed.img_size[0]),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "overrides": dict(model.preset_overrides),
        "extra": dict(extra) if extra is not None else None,
    }
    try:
        config_text = json.dumps(config, indent=2)
    except TypeError as e:
        raise ValueError(f"GTFormer config is not JSON-serialisable (overrides or extra?): {e}") from None

    path_dir = Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    write_bytes_atomic(str(path_dir / WEIGHTS_FILE), save(state, metadata={"format": "pt"}))
    write_bytes_atomic(str(path_dir / CONFIG_FILE), (config_text + "\n").encode())
    return path_dir


def gtformer_class_names(gtformer: str | os.PathLike) -> list[str] | None:
    """``class_names`` of a GTFormer export (folder, ``config.json`` or weights file; local or
    URI), read from its ``config.json`` without loading the model; None if it has none."""
    from .storage import join_uri, read_bytes

    uri = os.fspath(gtformer)
    if not uri.rstrip("/").endswith(".json"):
        if uri.endswith(".safetensors"):
            uri = uri.rsplit("/", 1)[0] if "/" in uri else "."
        uri = join_uri(uri, CONFIG_FILE)
    names = json.loads(read_bytes(uri)).get("class_names")
    return list(names) if names else None


def _check_config(config: dict[str, Any], config_path: Path) -> None:
    """Raise CheckpointError for a config whose values would break or silently spoil labeling."""

    def bad(message: str) -> None:
        raise CheckpointError(f"GTFormer config {config_path}: {message}")

    num_classes = config.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        bad(f"num_classes must be a positive integer, not {num_classes!r}")
    names = config.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            bad("class_names must be a list of strings")
        if len(names) != num_classes:
            bad(f"class_names has {len(names)} names for {num_classes} classes")
    from .gtformer import GTFORMER_PRESETS

    img_size = config.get("img_size", DEFAULT_SETTINGS.img_size)
    patch = GTFORMER_PRESETS[config["preset"]].get("patch_size", 16)
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size < patch or img_size % patch:
        bad(f"img_size must be a positive multiple of the patch size {patch}, not {img_size!r}")
    for key, default in (("mean", DEFAULT_SETTINGS.mean), ("std", DEFAULT_SETTINGS.std)):
        values = config.get(key, default)
        if (
            not isinstance(values, (list, tuple)) or len(values) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        ):  # fmt: skip
            bad(f"{key} must be three finite numbers, not {values!r}")
        if key == "std" and min(values) <= 0:
            bad(f"std must be positive, not {values!r} (the normalised image would be infinite)")


def load_gtformer(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[GTFormer, dict[str, Any]]:
    """Load a GTFormer export written by :func:`save_gtformer`, in eval mode.

    Args:
        path: the export directory, or its ``model.safetensors`` / ``config.json``.
        device: where to put the model.

    Returns:
        model: the GTFormer, eval mode.
        config: ``config.json``'s contents plus ``sha256`` (of the weights file) and
            ``weights_path``.

    Raises:
        CheckpointError: a file is missing, unreadable or truncated, the config is not a GTFormer
            config, or the weights' keys or shapes do not match the configured model exactly.
    """
    from .gtformer import GTFORMER_PRESETS, create_gtformer

    path = Path(path)
    directory = path if path.is_dir() else path.parent
    weights_path, config_path = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    if path.is_file() and path.suffix == ".safetensors":
        weights_path = path
    if not config_path.is_file():
        raise CheckpointError(f"GTFormer config not found: {config_path} (expected beside {weights_path.name})")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"GTFormer config {config_path} is not readable JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        raise CheckpointError(f"{config_path} is not a GTFormer config (format != {CONFIG_FORMAT!r})")
    if config.get("preset") not in GTFORMER_PRESETS:
        raise CheckpointError(f"{config_path} names unknown GTFormer preset {config.get('preset')!r}")
    _check_config(config, config_path)

    state = load_state_dict(weights_path, what="GTFormer checkpoint")
    model = create_gtformer(config["preset"], num_classes=int(config["num_classes"]), **config.get("overrides") or {})
    if int(config.get("img_size", DEFAULT_SETTINGS.img_size)) != int(model.patch_embed.img_size[0]):
        raise CheckpointError(
            f"GTFormer config {config_path}: img_size {config.get('img_size')} differs from the model's "
            f"{model.patch_embed.img_size[0]}"
        )
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong_shape:
            problems.append(f"shape mismatches {wrong_shape[:3]}")
        raise CheckpointError(
            f"GTFormer checkpoint {weights_path} does not match its config {config_path} "
            f"(preset {config['preset']}, {config['num_classes']} classes): " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)
    config = dict(config, sha256=sha256_file(weights_path), weights_path=str(weights_path))
    return model.to(device).eval(), config
