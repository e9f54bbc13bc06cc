"""Stage 2's seam: a promptable segmenter, seen by the grid generator only through this interface.

:class:`pro2sam.candidates.GridCandidateGenerator` filters, deduplicates and upsamples masks the
same way whatever model made them. What it needs from a model is here, implemented once per
model family:

- :meth:`PromptableSegmenter.prepare`: one image -> its pixels on the device and its
  :class:`Frames` (how the model sees the image: input size, low-resolution grid, how low-res
  logits map back to pixels);
- :meth:`PromptableSegmenter.encode`: a batch of prepared images -> one
  :class:`ImageEmbedding` each (one image-encoder call);
- :meth:`PromptableSegmenter.point_decoder`: a :class:`pro2sam.grid_decoder.GridDecoder` that
  takes one image's embedding (``set_image_embedding``) and decodes point prompts in the model's
  input frame (:meth:`PromptableSegmenter.to_input_coords`) to ``(low_res_logits,
  predicted_iou)``, three masks per point (multimask);
- the memory each of those takes, for the generator's budget.

Two families:

- :class:`SamSegmenter`: segment-anything v1 (``segment_anything.modeling.Sam``): the image's
  longest side resized to ``img_size`` (PIL, ``ResizeLongestSide``), zero-padded to a square;
  low-res logits one cell per 4 input pixels; ``Sam.postprocess_masks`` upsamples them to the
  padded input, crops and upsamples again.
- :class:`Sam2Segmenter`: SAM 2 / 2.1 in image mode (``sam2.modeling.sam2_base.SAM2Base``, the
  ``sam2`` package): the image resized to an ``image_size`` square whatever its aspect
  (``SAM2Transforms``: bilinear with antialiasing on [0, 1] floats, ImageNet normalisation), the
  image encoder's FPN features of three levels (the two finer ones projected by the mask
  decoder's ``conv_s0`` / ``conv_s1`` and passed to it as high-resolution features), the
  ``no_mem_embed`` added to the coarsest, as ``SAM2ImagePredictor.set_image`` computes them;
  low-res logits (256 x 256 for 1024) cover the whole image and are upsampled straight to the
  image's size (``SAM2Transforms.postprocess_masks`` without hole filling, as
  ``SAM2AutomaticMaskGenerator`` runs it by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .grid_decoder import GridDecoder

__all__ = [
    "Frames",
    "ImageEmbedding",
    "PromptableSegmenter",
    "Sam2Frames",
    "Sam2Segmenter",
    "SamFrames",
    "SamSegmenter",
    "segmenter_for",
]


@dataclass(frozen=True)
class Frames:
    """How a segmenter sees one image (sizes are (H, W)).

    Attributes:
        original: the image passed to the generator.
        sam_image: the image the segmenter was given (the original, or 224 x 224 with the
            reference option).
        low_res: cells of the model's low-resolution logit grid that cover ``sam_image`` (the
            rest of the grid, if any, is padding).
        cell: (sy, sx) ``sam_image`` pixels per low-res cell (cell (i, j) covers pixels
            [i * sy, (i + 1) * sy) x [j * sx, (j + 1) * sx)).
        region: (rows, cols) image-embedding cells to decode: those over the image and one past
            it (bilinear upsampling of the edge pixels reads it); the decoder clips it to the grid.
    """

    original: tuple[int, int]
    sam_image: tuple[int, int]
    low_res: tuple[int, int]
    cell: tuple[float, float]

    @property
    def region(self) -> tuple[int, int]:
        return self.low_res[0] // 4 + 1, self.low_res[1] // 4 + 1

    def upsample(self, logits: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """(B, C, kh, kw) low-res logits (the cells over the image and at least one cell past
        it where there is padding) -> (B, C, *out_size), as the model's own post-processing
        upsamples them to an image of ``out_size``."""
        raise NotImplementedError

    def interpolation_matrix(self, axis: int, cells: int, out_size: int, device: torch.device) -> torch.Tensor:
        """(out_size, cells) float32: the weights :meth:`upsample` gives each of ``cells``
        low-res cells along ``axis`` (0 rows, 1 columns) for an output of ``out_size`` pixels
        along it (bilinear interpolation is separable: full = A @ logits @ B^T). Each row holds
        a few adjacent non-negative weights that sum to one."""
        raise NotImplementedError


@dataclass(frozen=True)
class SamFrames(Frames):
    """segment-anything v1: ``sam_input`` is ``sam_image`` resized so its longest side is the
    model's ``img_size`` (before padding); ``upscale`` input pixels per low-res cell."""

    sam_input: tuple[int, int] = (0, 0)
    upscale: int = 4

    @classmethod
    def of(cls, original, sam_image, sam_input, upscale) -> SamFrames:
        low_res = (math.ceil(sam_input[0] / upscale), math.ceil(sam_input[1] / upscale))
        cell = (sam_image[0] * upscale / sam_input[0], sam_image[1] * upscale / sam_input[1])
        return cls(original, sam_image, low_res, cell, sam_input, upscale)

    def upsample(self, logits, out_size):
        return upscale_logits(logits, self.upscale, self.sam_input, out_size)

    def interpolation_matrix(self, axis, cells, out_size, device):
        return _interpolation_matrix(cells, self.upscale, self.sam_input[axis], out_size, device)


@dataclass(frozen=True)
class Sam2Frames(Frames):
    """SAM 2: the image was resized to a square; its low-res grid covers all of it."""

    @classmethod
    def of(cls, original, sam_image, low_res_side: int) -> Sam2Frames:
        low_res = (low_res_side, low_res_side)
        return cls(original, sam_image, low_res, (sam_image[0] / low_res_side, sam_image[1] / low_res_side))

    def upsample(self, logits, out_size):
        return F.interpolate(logits, out_size, mode="bilinear", align_corners=False)

    def interpolation_matrix(self, axis, cells, out_size, device):
        eye = torch.eye(cells, dtype=torch.float32, device=device)[None]  # channel c: the impulse at cell c
        return F.interpolate(eye, out_size, mode="linear", align_corners=False)[0].T.contiguous()


def upscale_logits(
    logits: torch.Tensor, upscale: int, input_size: tuple[int, int], out_size: tuple[int, int]
) -> torch.Tensor:
    """``Sam.postprocess_masks`` on logits (B, C, kh, kw) that hold the unpadded region of SAM's
    low-res grid plus at least one cell: the same values, without upsampling the padding."""
    kh, kw = logits.shape[-2:]
    x = F.interpolate(logits, (kh * upscale, kw * upscale), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(x, out_size, mode="bilinear", align_corners=False)


def _interpolation_matrix(
    cells: int, upscale: int, input_size: int, out_size: int, device: torch.device
) -> torch.Tensor:
    """(out_size, cells) float32: the weights :func:`upscale_logits` gives each low-res cell
    along one axis."""
    eye = torch.eye(cells, dtype=torch.float32, device=device)[None]  # channel c: the impulse at cell c
    x = F.interpolate(eye, cells * upscale, mode="linear", align_corners=False)[..., :input_size]
    return F.interpolate(x, out_size, mode="linear", align_corners=False)[0].T.contiguous()


@dataclass
class ImageEmbedding:
    """One image as the mask decoder reads it: ``embedding`` (1, C, h, w) and, for SAM 2, the
    high-resolution features ``[feat_s0, feat_s1]`` (see :meth:`GridDecoder.set_image_embedding`)."""

    embedding: torch.Tensor
    high_res: list[torch.Tensor] | None = None


class PromptableSegmenter:
    """A promptable segmenter for the grid generator (see the module docstring).

    Attributes:
        model: the wrapped network (``Sam`` or ``SAM2Base``), in eval mode, frozen.
        kind: "sam" or "sam2".
        input_size: side of the model's square input.
    """

    kind = ""

    def __init__(self, model: torch.nn.Module, *, compile: bool = False):
        self.model = model
        self._compile = compile

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def image_encoder(self) -> torch.nn.Module:
        """The image-encoder module (its forward runs once per :meth:`encode` call)."""
        return self.model.image_encoder

    @property
    def input_size(self) -> int:
        raise NotImplementedError

    def prepare(self, image: np.ndarray, original: tuple[int, int]) -> tuple[torch.Tensor, Frames]:
        """(H, W, 3) uint8 RGB -> its pixels on the device (what :meth:`encode` takes) and its
        frames; ``original`` is the (H, W) of the image the caller reports in (``image`` may be
        a resized copy of it)."""
        raise NotImplementedError

    def encode(self, pixels: list[torch.Tensor]) -> list[ImageEmbedding]:
        """Prepared images -> their embeddings, in one image-encoder call."""
        raise NotImplementedError

    def to_input_coords(self, points: np.ndarray, frames: Frames) -> np.ndarray:
        """(P, 2) (x, y) points in ``frames.sam_image`` pixels -> the model's input frame."""
        raise NotImplementedError

    def point_decoder(self, *, compile: bool = False) -> GridDecoder:
        """A decoder of point prompts for one image at a time (it keeps that image's shared
        work): ``set_image_embedding(e.embedding, e.high_res)``, then ``decode`` /
        ``decode_masks_above``."""
        return GridDecoder(self.model, compile=compile)

    def encoder_bytes_per_image(self, itemsize: int) -> int:
        """Peak activations of one image in the image encoder (an upper estimate)."""
        raise NotImplementedError

    def too_elongated(self, h: int, w: int) -> bool:
        """Whether an image of (h, w) leaves a side under one pixel in the model's input."""
        return False


class SamSegmenter(PromptableSegmenter):
    """segment-anything v1 behind the seam (see the module docstring)."""

    kind = "sam"

    def __init__(self, model, *, compile: bool = False):
        from segment_anything.utils.transforms import ResizeLongestSide

        super().__init__(model, compile=compile)
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        # SAM's low-res logits are 4x its embedding grid.
        self._upscale = model.image_encoder.img_size // (4 * model.prompt_encoder.image_embedding_size[0])
        self._encoder = torch.compile(model.image_encoder) if compile else model.image_encoder

    @property
    def input_size(self) -> int:
        return self.model.image_encoder.img_size

    def prepare(self, image, original):
        resized = self.transform.apply_image(image)  # as SamPredictor.set_image: on the CPU, PIL
        x = torch.as_tensor(resized).permute(2, 0, 1).to(self.device, non_blocking=True)
        sam_image = (int(image.shape[0]), int(image.shape[1]))
        return x, SamFrames.of(original, sam_image, (int(x.shape[-2]), int(x.shape[-1])), self._upscale)

    def encode(self, pixels):
        """Normalised and padded on the device (``Sam.preprocess``), encoded in one call."""
        x = torch.cat([self.model.preprocess(p[None].float()) for p in pixels])
        return [ImageEmbedding(e[None]) for e in self._encoder(x)]

    def to_input_coords(self, points, frames):
        return self.transform.apply_coords(points, frames.sam_image)

    def encoder_bytes_per_image(self, itemsize):
        """A global attention block's (heads, N, N) mask and scores, and a dozen (N, D) token
        tensors."""
        enc = self.model.image_encoder
        tokens = (enc.img_size // enc.patch_embed.proj.kernel_size[0]) ** 2
        dim = enc.patch_embed.proj.out_channels
        heads = enc.blocks[0].attn.num_heads
        return itemsize * (2 * heads * tokens * tokens + 16 * tokens * dim)

    def too_elongated(self, h, w):
        return min(h, w) * self.input_size / max(h, w) < 0.5


class Sam2Segmenter(PromptableSegmenter):
    """SAM 2 / 2.1 in image mode behind the seam (see the module docstring)."""

    kind = "sam2"
    # SAM2Transforms' normalisation, on [0, 1] pixels
    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, model, *, compile: bool = False):
        super().__init__(model, compile=compile)
        self._encoder = torch.compile(model.image_encoder) if compile else model.image_encoder
        self._mean = torch.tensor(self.MEAN, device=model.device).view(3, 1, 1)
        self._std = torch.tensor(self.STD, device=model.device).view(3, 1, 1)

    @property
    def input_size(self) -> int:
        return int(self.model.image_size)

    @property
    def _low_res_side(self) -> int:
        return 4 * int(self.model.sam_image_embedding_size)

    def prepare(self, image, original):
        x = torch.tensor(image).permute(2, 0, 1).to(self.device, non_blocking=True)  # a copy: images may be read-only
        sam_image = (int(image.shape[0]), int(image.shape[1]))
        return x, Sam2Frames.of(original, sam_image, self._low_res_side)

    def _transform(self, pixels: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 -> (3, S, S) float as SAM2Transforms computes it (ToTensor, Resize
        bilinear with antialiasing, Normalize), on the device."""
        from torchvision.transforms.functional import resize

        x = pixels.float().div(255.0)
        x = resize(x, [self.input_size, self.input_size], antialias=True)
        return (x - self._mean) / self._std

    def encode(self, pixels):
        """``SAM2ImagePredictor.set_image_batch``'s features, in one image-encoder call."""
        model = self.model
        x = torch.stack([self._transform(p) for p in pixels])
        out = self._encoder(x)
        if model.use_high_res_features_in_sam:
            out["backbone_fpn"][0] = model.sam_mask_decoder.conv_s0(out["backbone_fpn"][0])
            out["backbone_fpn"][1] = model.sam_mask_decoder.conv_s1(out["backbone_fpn"][1])
        _, feats, _, sizes = model._prepare_backbone_features(out)
        if model.directly_add_no_mem_embed:
            feats[-1] = feats[-1] + model.no_mem_embed
        # (HW, B, C) per level -> (B, C, H, W), finest first
        feats = [f.permute(1, 2, 0).reshape(len(pixels), -1, *size) for f, size in zip(feats, sizes)]
        return [
            ImageEmbedding(feats[-1][i : i + 1], [f[i : i + 1] for f in feats[:-1]] if len(feats) > 1 else None)
            for i in range(len(pixels))
        ]

    def to_input_coords(self, points, frames):
        h, w = frames.sam_image
        return points / np.array([w, h], dtype=np.float64) * self.input_size

    def encoder_bytes_per_image(self, itemsize):
        """Hiera's first stage ((S/4)^2 tokens of ``embed_dim``, a dozen copies), a global
        attention block's scores in the third stage ((S/16)^2 tokens), and the FPN's levels."""
        trunk = self.model.image_encoder.trunk
        dim = trunk.blocks[0].dim
        tokens = (self.input_size // 4) ** 2
        global_tokens = (self.input_size // 16) ** 2
        heads = max(block.attn.num_heads for block in trunk.blocks)
        fpn = self.model.image_encoder.neck.d_model * tokens * 4 // 3
        return itemsize * (16 * tokens * dim + 2 * heads * global_tokens * global_tokens + 2 * fpn)


def segmenter_for(model: torch.nn.Module, *, compile: bool = False) -> PromptableSegmenter:
    """The segmenter of a ``segment_anything`` ``Sam`` or a ``sam2`` ``SAM2Base``."""
    if isinstance(model, PromptableSegmenter):
        return model
    if hasattr(model, "sam_mask_decoder"):
        return Sam2Segmenter(model, compile=compile)
    if hasattr(model, "mask_decoder") and hasattr(model, "image_encoder"):
        return SamSegmenter(model, compile=compile)
    raise TypeError(f"not a Segment Anything model: {type(model).__name__}")
