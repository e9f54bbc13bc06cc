"""Pro2SAM: image-level labels to boxes and masks (GTFormer + grid-prompted SAM + mask matching).

Names are imported lazily, so that light users (the Ray Data read and decode tasks, the CLI's
argument parsing) do not pay for importing torch and timm. Importing :mod:`pro2sam.gtformer`
(which ``Pro2SAM`` and ``create_gtformer`` do) registers the GTFormer presets with timm.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "CandidateConfig": "candidates",
    "CheckpointError": "checkpoints",
    "GridCandidateGenerator": "candidates",
    "MatchConfig": "matching",
    "Pro2SAM": "model",
    "Pro2SAMResult": "model",
    "build_sam": "sam",
    "create_gtformer": "gtformer",
    "load_gtformer": "gtformer",
    "read_labels": "reading",
    "row_mask": "reading",
    "save_gtformer": "gtformer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
