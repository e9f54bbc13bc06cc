"""The small models shipped with the package: GTFormer and SAM trained on synthetic scenes.

Official SAM and DeiT weights and real WSOL data sets need downloads; these two models need none.
Both were trained here, from scratch, on :mod:`pro2sam.synthetic` scenes, on 2 CPU cores in under
30 minutes each; ``pro2sam/shipped/README.md`` gives the exact commands and seeds, and a JSON record
beside each model holds its command, settings, loss history, wall time and SHA-256.

- GTFormer (preset ``gtformer_synthetic_patch16_224``) was trained by the project's own training
  job (:mod:`pro2sam.pipeline.train_job`) with image-level labels only, on the ``train`` split of
  ``pro2sam synthetic --seed 0``.
- SAM (variant ``"synthetic"`` of :data:`pro2sam.sam.SAM_VARIANTS`, Segment
  Anything's own modules at a small size) was trained class-agnostically by
  ``scripts/train_sam_synthetic.py`` on the ``sam`` stream, which no written data set contains.

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
    "gtformer_dir",
    "sam_checkpoint",
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

_GTFORMER_DIR = "gtformer_synthetic"
_SAM_FILE = "sam_synthetic.pth"

# SAM's candidate filter thresholds for the shipped SAM, declared with its sizes in SAM_VARIANTS.
CANDIDATE_THRESHOLDS = dict(SAM_VARIANTS[SAM_VARIANT].filter_thresholds)

# SHA-256 of the shipped weights files, as the training runs wrote them.
SHIPPED_SHA256 = {
    "gtformer": "866a93357f3fc324dc3ac5c09d52d49bf9c9244cca8386b428a78a8aabb5bfb7",
    "sam": "0e5ed7f09dd24f317534fa3c112dc88b38b382b5c65300743acc6171700d9291",
}


def gtformer_dir() -> Path:
    """The shipped GTFormer export (``model.safetensors`` + ``config.json``)."""
    return _existing(MODELS_DIR / _GTFORMER_DIR)


def sam_checkpoint() -> Path:
    """The shipped SAM state dict, for ``build_sam(SAM_VARIANT, sam_checkpoint())``."""
    return _existing(MODELS_DIR / _SAM_FILE)


def training_records() -> dict[str, dict]:
    """What the two training runs recorded: ``{"gtformer": ..., "sam": ...}``. GTFormer's is its
    export's ``config.json`` (command, recipe, data set, per-epoch history, weights' SHA-256);
    SAM's is the JSON beside its weights."""
    return {
        "gtformer": json.loads((gtformer_dir() / "config.json").read_text()),
        "sam": json.loads(sam_checkpoint().with_suffix(".json").read_text()),
    }


def verify_shipped() -> dict[str, str]:
    """Check each shipped weights file against :data:`SHIPPED_SHA256`.

    Returns:
        ``{"gtformer": sha256, "sam": sha256}``.

    Raises:
        FileNotFoundError: a file is missing (a broken install).
        ValueError: a file differs from what its training run wrote.
    """
    files = {"gtformer": gtformer_dir() / "model.safetensors", "sam": sam_checkpoint()}
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
