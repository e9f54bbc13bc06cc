"""Pro2SAM: image-level labels to boxes and masks (GTFormer + grid-prompted SAM + mask matching)."""

from .checkpoints import CheckpointError
from .gtformer import create_gtformer, load_gtformer, save_gtformer  # also registers the timm presets
from .matching import MatchConfig
from .model import Pro2SAM, Pro2SAMResult
from .sam_candidates import CandidateConfig, GridCandidateGenerator, build_sam

__version__ = "0.1.0"

__all__ = [
    "CandidateConfig",
    "CheckpointError",
    "GridCandidateGenerator",
    "MatchConfig",
    "Pro2SAM",
    "Pro2SAMResult",
    "build_sam",
    "create_gtformer",
    "load_gtformer",
    "save_gtformer",
]
