"""Reading model weights safely: hash checks, no pickled code, clear errors.

Every checkpoint the project reads (official SAM files, timm DeiT files, our own GTFormer exports)
goes through :func:`load_state_dict`, which never executes pickled code (``torch.load`` with
``weights_only=True``, or safetensors) and turns the many ways a file can be broken into one
:class:`CheckpointError` that names the file and says what is wrong with it.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .storage import sha256_file

__all__ = [
    "CheckpointError",
    "OFFICIAL_SAM2_CHECKPOINTS",
    "OFFICIAL_SAM_CHECKPOINTS",
    "verify_sha256",
    "load_state_dict",
]

# The three official Segment Anything files: file name and SHA-256 of the released bytes.
OFFICIAL_SAM_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "vit_h": ("sam_vit_h_4b8939.pth", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
    "vit_l": ("sam_vit_l_0b3195.pth", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_b": ("sam_vit_b_01ec64.pth", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
}


# The four official SAM 2.1 files (facebookresearch/sam2, checkpoints/download_ckpts.sh, release
# 092824): file name and SHA-256 of the released bytes. Meta publishes no SHA-256 for them, and
# none could be read here (no download is possible on our machines), so None: such a file is
# checked by loading it strictly into the architecture (every tensor present, of its shape).
# Put the SHA-256 of a file you have verified here to check it as the SAM files are.
OFFICIAL_SAM2_CHECKPOINTS: dict[str, tuple[str, str | None]] = {
    "sam2.1_hiera_tiny": ("sam2.1_hiera_tiny.pt", None),
    "sam2.1_hiera_small": ("sam2.1_hiera_small.pt", None),
    "sam2.1_hiera_base_plus": ("sam2.1_hiera_base_plus.pt", None),
    "sam2.1_hiera_large": ("sam2.1_hiera_large.pt", None),
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, truncated or not the file it claims to be."""


def verify_sha256(path: str | os.PathLike, expected: str, what: str) -> str:
    """Check a file's SHA-256 against ``expected``; return the hash, raise CheckpointError if not.

    ``what`` names the file the caller expects (for example "the official SAM vit_h checkpoint
    sam_vit_h_4b8939.pth") so that the message says what went wrong in the user's words.
    """
    actual = sha256_file(path)
    if actual != expected.lower():
        size = os.path.getsize(path)
        raise CheckpointError(
            f"{path} ({size} bytes) has SHA-256 {actual}, but {what} has SHA-256 {expected}: "
            "the file is incomplete, corrupt or a different file. Download it again, or pass "
            "verify=False if you deliberately use other weights."
        )
    return actual


def load_state_dict(
    path: str | os.PathLike,
    *,
    expected_sha256: str | None = None,
    what: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file without running pickled code.

    Args:
        path: local file. ``.safetensors`` files are read with safetensors; anything else with
            ``torch.load(weights_only=True, map_location="cpu")``.
        expected_sha256: if given, the file's hash is checked first.
        what: how to name the file in error messages.

    Returns:
        A flat ``{name: tensor}`` dict on the CPU. Torch files that wrap their weights under a
        ``"model"`` or ``"state_dict"`` key (timm and DeiT releases do) are unwrapped.

    Raises:
        CheckpointError: the file is missing, empty, truncated, corrupt, not a state dict,
            carries pickled objects other than tensors, or fails the hash check.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): the download or copy did not finish")
    if expected_sha256 is not None:
        verify_sha256(path, expected_sha256, what)

    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"{what} {path} ({size} bytes) is not a readable safetensors file "
                f"(truncated or corrupt?): {e}"
            ) from None
    else:
        _check_torch_archive(path, size, what)
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise CheckpointError(
                    f"{what} {path} holds pickled Python objects, not only tensors; refusing to "
                    f"execute them. Re-save it as a plain state dict or safetensors. ({message})"
                ) from None
            raise CheckpointError(
                f"{what} {path} ({size} bytes) could not be read (truncated or corrupt?): {message}"
            ) from None
    return _unwrap_state_dict(state, path, what)


def _check_torch_archive(path: Path, size: int, what: str) -> None:
    """Catch truncated zip-format torch files before torch.load reports them obscurely."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK":  # torch >= 1.6 zip container
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except zipfile.BadZipFile as e:
            raise CheckpointError(
                f"{what} {path} ({size} bytes) is a truncated or corrupt torch archive: {e}. "
                "The download or copy probably did not finish."
            ) from None
        if bad is not None:
            raise CheckpointError(f"{what} {path}: archive member {bad} is corrupt (CRC mismatch)")


def _unwrap_state_dict(state: object, path: Path, what: str) -> dict[str, torch.Tensor]:
    if isinstance(state, Mapping):
        for key in ("model", "state_dict", "module"):
            inner = state.get(key)
            if isinstance(inner, Mapping) and inner and all(
                isinstance(v, torch.Tensor) for v in inner.values()
            ):
                state = inner
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{what} {path} does not hold a state dict of named tensors")
    return dict(state)
