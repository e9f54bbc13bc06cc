"""The small models shipped with the package: GTFormer and SAM trained on synthetic scenes, and the
DeiT backbone GTFormer was fine-tuned from.

Official SAM and DeiT weights and real WSOL data sets need downloads; these models need none.
All were trained here on 2 CPU cores, each run in under 35 minutes; ``pro2sam/shipped/README.md``
gives the exact commands and seeds, and a JSON record beside each model holds its command,
settings, loss history, wall time and SHA-256.

- The backbone (timm DeiT format, the GTFormer preset's sizes) was pretrained by
  ``scripts/pretrain_backbone.py`` on :mod:`pro2sam.synthetic_pretrain`, whose 144 classes are
  not the target world's: what ImageNet is for the paper's DeiT (METHOD.md §5).
- GTFormer (preset ``gtformer_synthetic_patch16_224``) was fine-tuned from that backbone
  (``--backbone-checkpoint``, the path that loads real DeiT weights) by the project's own training
  job (:mod:`pro2sam.pipeline.train_job`) with image-level labels only, on the ``train`` split of
  ``pro2sam synthetic --seed 0``.
- A second GTFormer (``gtformer_dir("object")``), the same recipe on the synthetic world's object
  regime (:data:`pro2sam.synthetic.REGIMES`: class evidence over the object, objects on supports),
  whose map covers the object as the paper's does on CUB.
- SAM (variant ``"synthetic"`` of :data:`pro2sam.sam.SAM_VARIANTS`, Segment
  Anything's own modules at a small size) was trained class-agnostically by
  ``scripts/train_sam_synthetic.py`` on the ``sam`` stream, which no written data set contains.
  One SAM per regime (``sam_checkpoint(regime)``): the same SAM trained from scratch, then
  fine-tuned on that regime's scenes (the object regime's twice; its targets include the object
  with its support, SA-1B's nested masks).

They load through the same code as official checkpoints::

    Pro2SAM.from_checkpoints(gtformer_dir(), sam=SAM_VARIANT, sam_checkpoint=sam_checkpoint())

They are good for the synthetic world only: on photographs they mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..sam import SAM_VARIANTS
from ..storage import sha256_file

__all__ = [
    "MODELS_DIR",
    "SAM_VARIANT",
    "SYNTHETIC_SEED",
    "SHIPPED_SHA256",
    "backbone_checkpoint",
    "gtformer_dir",
    "sam_checkpoint",
    "settings_file",
    "training_records",
    "verify_shipped",
    "SHIPPED_NAME",
    "CANDIDATE_THRESHOLDS",
    "resolve_model_options",
]

MODELS_DIR = Path(__file__).resolve().parent
SAM_VARIANT = "synthetic"
# The seed of the synthetic data set GTFormer was trained on; its val/test splits never met
# either model (SAM trained on the separate "sam" stream).
SYNTHETIC_SEED = 0

# What ``--gtformer`` says to mean the shipped GTFormer.
SHIPPED_NAME = "shipped"

# The GTFormer shipped for each regime of the synthetic world (pro2sam.synthetic.REGIMES).
_GTFORMER_DIRS = {"part": "gtformer_synthetic", "object": "gtformer_synthetic_object"}
# The SAM shipped for each regime: one SAM trained from scratch on part-regime scenes, then
# fine-tuned on each regime's scenes (README.md here; each record holds its parents' under init_record).
_SAM_FILES = {"part": "sam_synthetic.pth", "object": "sam_synthetic_object.pth"}
_BACKBONE_FILE = "deit_backbone_synthetic.safetensors"
# What pro2sam tune chose for the shipped models on each regime's synthetic val split (README.md here).
_SETTINGS_FILES = {"part": "settings_synthetic.json", "object": "settings_synthetic_object.json"}

# SAM's candidate filter thresholds for the shipped SAM, declared with its sizes in SAM_VARIANTS.
CANDIDATE_THRESHOLDS = dict(SAM_VARIANTS[SAM_VARIANT].filter_thresholds)

# SHA-256 of the shipped weights files, as the training runs wrote them.
SHIPPED_SHA256 = {
    "gtformer": "577adcda90dda39304bca5c00360eb6e3393a1663f9135ef395804d7ea703f8e",
    "gtformer_object": "8d043ac851a1ab161157c1f5805b68e5db7bad9309e5388afa95f146eb6937e6",
    "sam": "c79492b5f1313f188ede8714d011ace2777694e67775af1c4c88c5264c148485",
    "sam_object": "54544144b9d988f902b6cff1f6f0fdac1972fbe04704ca18de2293fdec9607bd",
    "backbone": "8bead150e14c30187c1a8183350e50802be1cf1ad59592abb12b9af20805b87b",
}


def gtformer_dir(regime: str = "part") -> Path:
    """The shipped GTFormer export (``model.safetensors`` + ``config.json``) fine-tuned on the
    synthetic world's ``regime`` (``"part"``, the default, or ``"object"``)."""
    if regime not in _GTFORMER_DIRS:
        raise ValueError(f"no GTFormer shipped for regime {regime!r}; choose from {sorted(_GTFORMER_DIRS)}")
    return _existing(MODELS_DIR / _GTFORMER_DIRS[regime])


def sam_checkpoint(regime: str = "part") -> Path:
    """The shipped SAM state dict for the synthetic world's ``regime`` (``"part"``, the default, or
    ``"object"``), for ``build_sam(SAM_VARIANT, sam_checkpoint())``."""
    if regime not in _SAM_FILES:
        raise ValueError(f"no SAM shipped for regime {regime!r}; choose from {sorted(_SAM_FILES)}")
    return _existing(MODELS_DIR / _SAM_FILES[regime])


def backbone_checkpoint() -> Path:
    """The pretrained DeiT backbone (timm keys, safetensors) the shipped GTFormer was fine-tuned
    from, for ``pro2sam train --backbone-checkpoint``."""
    return _existing(MODELS_DIR / _BACKBONE_FILE)


def settings_file(regime: str = "part") -> Path:
    """The settings ``pro2sam tune`` chose for the shipped SAM and the GTFormer of ``regime`` on
    the val split of ``pro2sam synthetic --seed 0 --regime REGIME``; ``--settings shipped`` reads
    the part regime's, and ``pro2sam demo`` those of its ``--regime`` unless given others."""
    if regime not in _SETTINGS_FILES:
        raise ValueError(f"no settings shipped for regime {regime!r}; choose from {sorted(_SETTINGS_FILES)}")
    return _existing(MODELS_DIR / _SETTINGS_FILES[regime])


def training_records() -> dict[str, dict]:
    """What the training runs recorded: ``{"gtformer": ..., "gtformer_object": ..., "sam": ...,
    "sam_object": ..., "backbone": ...}``. A GTFormer's is its export's ``config.json`` (command, recipe, data set, per-epoch history,
    weights' SHA-256); SAM's and the backbone's are the JSON beside their weights."""
    return {
        "gtformer": json.loads((gtformer_dir() / "config.json").read_text()),
        "gtformer_object": json.loads((gtformer_dir("object") / "config.json").read_text()),
        "sam": json.loads(sam_checkpoint().with_suffix(".json").read_text()),
        "sam_object": json.loads(sam_checkpoint("object").with_suffix(".json").read_text()),
        "backbone": json.loads(backbone_checkpoint().with_suffix(".json").read_text()),
    }


def verify_shipped() -> dict[str, str]:
    """Check each shipped weights file against :data:`SHIPPED_SHA256`.

    Returns:
        ``{"gtformer": sha256, "gtformer_object": sha256, "sam": sha256, "sam_object": sha256,
        "backbone": sha256}``.

    Raises:
        FileNotFoundError: a file is missing (a broken install).
        ValueError: a file differs from what its training run wrote.
    """
    files = {
        "gtformer": gtformer_dir() / "model.safetensors",
        "gtformer_object": gtformer_dir("object") / "model.safetensors",
        "sam": sam_checkpoint(),
        "sam_object": sam_checkpoint("object"),
        "backbone": backbone_checkpoint(),
    }
    out = {}
    for name, path in files.items():
        digest = sha256_file(path)
        if digest != SHIPPED_SHA256[name]:
            raise ValueError(f"{path} has SHA-256 {digest}, not the shipped {SHIPPED_SHA256[name]}: a damaged install")
        out[name] = digest
    return out


def _existing(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the shipped models are package data of pro2sam; reinstall the package"
        )
    return path


def resolve_model_options(gtformer: str | None, sam: str, checkpoint: str | None) -> tuple[str | None, str, str | None]:
    """Command-line model options ``(--gtformer, --sam, --sam-checkpoint)`` with the shipped
    models filled in: ``--gtformer shipped`` is :func:`gtformer_dir`, and ``--sam synthetic``
    without a checkpoint reads :func:`sam_checkpoint`. Anything else is returned unchanged."""
    if gtformer == SHIPPED_NAME:
        gtformer = str(gtformer_dir())
    if sam == SAM_VARIANT and not checkpoint:
        checkpoint = str(sam_checkpoint())
    return gtformer, sam, checkpoint
