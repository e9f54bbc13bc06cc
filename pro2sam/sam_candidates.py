"""Stage 2 of Pro2SAM: candidate masks from Segment Anything prompted with a grid of points.

METHOD.md §2. One image is encoded once; every grid point is decoded as a single foreground
click with three masks each (multimask), in large batches through :class:`GridDecoder`; masks are
then filtered exactly as ``SamAutomaticMaskGenerator`` filters a single full-image crop
(predicted IoU, stability score, box NMS; no crops, no small-region post-processing).

Two paths compute those filters:

- ``"exact"``: on masks upscaled to the image's full resolution, as the official generator does;
  its candidate set equals the official one (tests/test_sam_candidates.py checks it).
- ``"fast"`` (default): on SAM's low-resolution logits (256x256 for the 1024 px models) cropped to
  the image, never upsampling every mask; ``Candidates.full_resolution_mask(i)`` upsamples one
  candidate exactly as ``Sam.postprocess_masks`` does.

Frames: "original" is the image passed to :meth:`GridCandidateGenerator.generate` (H x W);
"SAM input" is that image resized so its longest side is ``sam.image_encoder.img_size`` (1024), then
zero-padded to a square. Boxes are ``(x0, y0, x1, y1)`` inclusive pixel indices (``x1`` is the last
foreground column), the convention of ``segment_anything.utils.amg.batched_mask_to_box``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import partial

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.amg import (
    batched_mask_to_box,
    build_all_layer_point_grids,
    calculate_stability_score,
)
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops.boxes import batched_nms

from .checkpoints import OFFICIAL_SAM_CHECKPOINTS, CheckpointError, load_state_dict
from .grid_decoder import GridDecoder

__all__ = [
    "SAM_VARIANTS",
    "SamVariant",
    "build_sam",
    "CandidateConfig",
    "Candidates",
    "GridCandidateGenerator",
]

# Segment Anything's pixel normalisation (ImageNet mean/std in 0..255), as in build_sam.py.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

# Side of the square image the authors resize to before SAM (METHOD.md §2, reference option).
REFERENCE_SAM_SIZE = 224


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamVariant:
    """Sizes of one SAM architecture (the arguments of segment_anything's ``_build_sam``).

    Attributes:
        encoder_embed_dim, encoder_depth, encoder_num_heads: image encoder ViT width, depth, heads.
        encoder_global_attn_indexes: blocks with global attention (the others use windows).
        image_size: side of the square SAM input; the embedding is ``image_size / patch_size``.
        patch_size, window_size: ViT patch side and attention window side, in tokens.
        prompt_embed_dim: channels of the image embedding, prompt tokens and mask decoder.
        decoder_mlp_dim, decoder_num_heads, decoder_depth: TwoWayTransformer sizes.
        iou_head_hidden_dim: width of the IoU prediction MLP.
        mask_in_chans: hidden channels of the (unused here) mask-prompt encoder.
        filter_thresholds: this variant's own ``CandidateConfig`` filter thresholds where
            ``SamAutomaticMaskGenerator``'s defaults do not suit it (see
            :meth:`CandidateConfig.for_variant`); empty for the official variants.
    """

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    decoder_depth: int = 2
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    filter_thresholds: tuple[tuple[str, float], ...] = ()


# Every SAM we build. The official three match segment_anything/build_sam.py; "tiny" is a
# random-weight stand-in for tests and CPU benchmarks of the pipeline (no pretrained weights);
# "synthetic" is the small SAM trained on pro2sam.synthetic scenes and shipped with the package
# (pro2sam.shipped, jobs/train_sam_tiny.py).
SAM_VARIANTS: dict[str, SamVariant] = {
    "vit_h": SamVariant(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamVariant(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamVariant(768, 12, 12, (2, 5, 8, 11)),
    "tiny": SamVariant(
        encoder_embed_dim=64,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        image_size=256,
        window_size=8,
        prompt_embed_dim=32,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
    ),
    "synthetic": SamVariant(
        encoder_embed_dim=128,
        encoder_depth=4,
        encoder_num_heads=4,
        encoder_global_attn_indexes=(1, 3),
        image_size=256,
        window_size=8,
        prompt_embed_dim=64,
        decoder_mlp_dim=256,
        decoder_num_heads=4,
        iou_head_hidden_dim=64,
        # Its predicted IoUs and stability run lower than the official SAM's: at the generator's
        # defaults (0.88, 0.95) nearly every image falls back to the coarse map. Chosen on the
        # synthetic val split with `benchmarks/bench_quality.py --choose-sam-thresholds`.
        filter_thresholds=(("pred_iou_thresh", 0.7), ("stability_score_thresh", 0.8)),
    ),
}


def _sam_from_variant(v: SamVariant) -> Sam:
    embedding_size = v.image_size // v.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=v.encoder_depth,
            embed_dim=v.encoder_embed_dim,
            img_size=v.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=v.encoder_num_heads,
            patch_size=v.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=v.encoder_global_attn_indexes,
            window_size=v.window_size,
            out_chans=v.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=v.prompt_embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(v.image_size, v.image_size),
            mask_in_chans=v.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=v.decoder_depth,
                embedding_dim=v.prompt_embed_dim,
                mlp_dim=v.decoder_mlp_dim,
                num_heads=v.decoder_num_heads,
            ),
            transformer_dim=v.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=v.iou_head_hidden_dim,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )


@torch.no_grad()
def _make_random_masks_coherent(sam: Sam) -> None:
    """Adjust a randomly initialised SAM so its masks are worth filtering.

    With default initialisation the random 2x2 taps of the mask decoder's transposed
    convolutions turn every mask into a checkerboard whose box is the whole frame (box NMS then
    keeps a single candidate), mask logits stay within +-0.1 (every stability score is 0) and
    predicted IoUs are near 0 (any pred_iou_thresh removes everything). Tying each transposed
    convolution's taps (nearest-neighbour upsampling of random features), scaling the
    hypernetwork MLPs and centring predicted IoUs near 0.5 gives masks that follow image content
    at the embedding grid, logits of order 1 and IoUs that thresholds can split.
    """
    decoder = sam.mask_decoder
    for m in decoder.output_upscaling.modules():
        if isinstance(m, torch.nn.ConvTranspose2d):
            m.weight.copy_(m.weight.mean(dim=(2, 3), keepdim=True).expand_as(m.weight))
    for m in decoder.output_hypernetworks_mlps.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.mul_(4.0)
    decoder.iou_prediction_head.layers[-1].bias.add_(0.5)


def build_sam(
    variant: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    verify: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Sam:
    """Build a Segment Anything model in eval mode, reading weights without running pickled code.

    Args:
        variant: a key of :data:`SAM_VARIANTS`: "vit_h", "vit_l", "vit_b" (the official
            architectures), "tiny" (256 px input, a few hundred thousand parameters) or
            "synthetic" (256 px input, 1.2 M parameters; the shipped weights are
            :func:`pro2sam.shipped.sam_checkpoint`).
        checkpoint: a state-dict file (``.pth`` or ``.safetensors``). None gives **random
            weights** drawn with ``seed`` (for tests and speed benchmarks only: a random SAM
            segments nothing meaningful; the random "tiny" one is adjusted so that its masks
            are spatially coherent, see ``_make_random_masks_coherent``).
        verify: for official variants, check the file's SHA-256 against the released file
            (:data:`pro2sam.checkpoints.OFFICIAL_SAM_CHECKPOINTS`) before reading it. Pass False
            to load other weights of the same architecture. Ignored for the other variants.
        device: where the model lives; "meta" builds the structure without memory (parameter
            counts, shapes).
        seed: seed of the random initialisation when ``checkpoint`` is None; the global torch
            random state is left untouched.

    Raises:
        ValueError: unknown variant.
        CheckpointError: the file is missing, truncated, corrupt, not the official file (when
            ``verify``), or does not fit the architecture.
    """
    if variant not in SAM_VARIANTS:
        raise ValueError(f"unknown SAM variant {variant!r}; choose from {sorted(SAM_VARIANTS)}")
    spec = SAM_VARIANTS[variant]
    device = torch.device(device)

    if checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device(device):
                sam = _sam_from_variant(spec)
                if variant == "tiny":
                    _make_random_masks_coherent(sam)
        return sam.to(device).eval()

    if variant in OFFICIAL_SAM_CHECKPOINTS:
        filename, sha256 = OFFICIAL_SAM_CHECKPOINTS[variant]
        what = f"the official SAM {variant} checkpoint {filename}"
        state = load_state_dict(checkpoint, expected_sha256=sha256 if verify else None, what=what)
    else:
        what = f"SAM {variant} checkpoint"
        state = load_state_dict(checkpoint, what=what)

    # Weights replace the parameters, so skip the random initialisation (seconds for ViT-H).
    with torch.device("meta"):
        sam = _sam_from_variant(spec)
    try:
        sam.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{what} {checkpoint} does not fit the {variant} architecture: {e}"
        ) from None
    # pixel_mean/std are not in the state dict; segment_anything creates them on the CPU.
    leftover = [n for n, t in [*sam.named_parameters(), *sam.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{what} {checkpoint} lacks tensors: {leftover}")
    return sam.to(device).eval()


# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CandidateConfig:
    """How grid-prompted SAM candidates are generated and filtered.

    The first group are ``SamAutomaticMaskGenerator``'s arguments, with its defaults (the
    reference settings, METHOD.md §2); a threshold of 0 switches its filter off, as there.

    Attributes:
        points_per_side: the grid has points_per_side**2 points over the whole image.
        points_per_batch: prompts decoded together (memory vs speed; no effect on results).
        pred_iou_thresh: keep masks whose predicted IoU is strictly above this.
        stability_score_thresh: keep masks whose stability score is at least this.
        stability_score_offset: logit offset of the stability score's two thresholds.
        box_nms_thresh: box IoU above which the lower-scoring (predicted IoU) mask is dropped.
        mask_threshold: logit above which a pixel is foreground (SAM uses 0.0).
        mode: "fast" filters on the low-resolution logits; "exact" on full-resolution masks,
            reproducing the official generator.
        prune_with_coarse_map: drop grid points outside the coarse foreground before decoding
            (off by default until a benchmark shows it keeps the same answers).
        prune_threshold: a coarse-map cell is foreground where the min-max normalised map is at
            least this.
        prune_dilation: grow that foreground by this many coarse-map cells (square neighbourhood)
            so that points near the object's edge are kept.
        reference_resize_224: resize the image to 224x224 (bilinear, OpenCV) before SAM, as the
            authors do; filters then run in that frame and candidates are reported in the
            original frame. By default SAM sees the original image (and resizes its longest
            side itself).
    """

    points_per_side: int = 32
    points_per_batch: int = 256
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    mask_threshold: float = 0.0
    mode: str = "fast"
    prune_with_coarse_map: bool = False
    prune_threshold: float = 0.2
    prune_dilation: int = 1
    reference_resize_224: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("fast", "exact"):
            raise ValueError(f"mode must be 'fast' or 'exact', not {self.mode!r}")
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise ValueError("points_per_side and points_per_batch must be positive")
        if self.prune_dilation < 0:
            raise ValueError("prune_dilation must be >= 0")

    @classmethod
    def for_variant(cls, variant: str, **settings) -> CandidateConfig:
        """The settings for a SAM variant: ``settings`` (None values are left out), with the
        variant's own filter thresholds (:attr:`SamVariant.filter_thresholds`) where not given,
        and the defaults above for the rest."""
        given = {k: v for k, v in settings.items() if v is not None}
        return cls(**{**dict(SAM_VARIANTS[variant].filter_thresholds), **given})


@dataclass
class Candidates:
    """The candidate masks of one image, sorted by decreasing predicted IoU (NMS order).

    Attributes:
        masks: (N, h, w) bool covering the whole original image. Exact mode: full resolution,
            (h, w) = (H, W). Fast mode: SAM's low-resolution grid cropped to the image, e.g.
            (192, 256) for a 3:4 image with a 1024 px SAM; cell (i, j) covers original pixels
            [i*sy, (i+1)*sy) x [j*sx, (j+1)*sx) with sy = H/h, sx = W/w (up to the last partial
            cell, see ``low_res_cell_size``).
        pred_ious: (N,) float32, SAM's predicted IoU.
        stability_scores: (N,) float32, computed at the resolution of ``masks``.
        point_coords: (N, 2) float64, the (x, y) grid point that prompted each mask, original pixels.
        multimask_index: (N,) int64, which of SAM's three multimask outputs (0..2) each mask is.
        boxes_xyxy: (N, 4) int64 inclusive box of each mask in original pixels ([0, 0, 0, 0]
            for an empty mask). Fast mode: from the low-resolution mask, so within about one
            low-resolution cell of the full-resolution box.
        image_size: (H, W) of the original image.
        mode: "fast" or "exact".
        num_grid_points: how many grid points were decoded (after pruning).
        timings: seconds per stage: "embed" (image encoder), "decode" (prompt encoder + mask
            decoder), "filter" (everything else in generate, upsampling included).
    """

    masks: np.ndarray
    pred_ious: np.ndarray
    stability_scores: np.ndarray
    point_coords: np.ndarray
    multimask_index: np.ndarray
    boxes_xyxy: np.ndarray
    image_size: tuple[int, int]
    mode: str
    num_grid_points: int
    timings: dict[str, float] = field(default_factory=dict)
    # (N, kh, kw) float32 CPU logits over the unpadded SAM input plus one cell of padding
    # (bilinear upsampling near the image edge reads it), and how to upsample them.
    _low_res_logits: torch.Tensor | None = field(default=None, repr=False)
    _input_size: tuple[int, int] = field(default=(0, 0), repr=False)
    _upscale: int = field(default=4, repr=False)
    _mask_threshold: float = field(default=0.0, repr=False)

    def __len__(self) -> int:
        return len(self.pred_ious)

    @property
    def low_res_cell_size(self) -> tuple[float, float]:
        """(sy, sx): original pixels per cell of a fast-mode mask, as (H*upscale/input_h, ...)."""
        h, w = self.image_size
        return (h * self._upscale / self._input_size[0], w * self._upscale / self._input_size[1])

    def full_resolution_mask(self, i: int) -> np.ndarray:
        """(H, W) bool mask of candidate ``i`` in the original frame.

        Exact mode: ``masks[i]``. Fast mode: that candidate's logits upsampled exactly as
        ``Sam.postprocess_masks`` does (bilinear to the padded SAM input, crop, bilinear to H x W),
        then thresholded: the mask the exact path has for the same point and multimask output.
        """
        if self.mode == "exact":
            return self.masks[i]
        logits = self._low_res_logits[i : i + 1, None]
        return _upscale_logits(logits, self._upscale, self._input_size, self.image_size)[0, 0].gt(
            self._mask_threshold
        ).numpy()


def _upscale_logits(
    logits: torch.Tensor, upscale: int, input_size: tuple[int, int], out_size: tuple[int, int]
) -> torch.Tensor:
    """``Sam.postprocess_masks`` on logits (B, C, kh, kw) that hold the unpadded region of SAM's
    low-res grid plus at least one cell: the same values, without upsampling the padding."""
    kh, kw = logits.shape[-2:]
    x = F.interpolate(logits, (kh * upscale, kw * upscale), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(x, out_size, mode="bilinear", align_corners=False)


def _scale_boxes(boxes: torch.Tensor, cell: tuple[float, float], size: tuple[int, int]) -> torch.Tensor:
    """Inclusive boxes on a grid whose cells are ``cell`` = (sy, sx) pixels -> the inclusive
    pixel boxes they cover in an image of ``size`` (H, W). An empty mask's [0, 0, 0, 0] becomes
    the first cell's pixels: callers zero those boxes again."""
    sy, sx = cell
    h, w = size
    b = boxes.double()
    x0 = torch.floor(b[:, 0] * sx)
    y0 = torch.floor(b[:, 1] * sy)
    x1 = torch.clamp(torch.ceil((b[:, 2] + 1) * sx) - 1, max=w - 1)
    y1 = torch.clamp(torch.ceil((b[:, 3] + 1) * sy) - 1, max=h - 1)
    return torch.stack([x0, y0, x1, y1], dim=1).long()


class GridCandidateGenerator:
    """Candidate masks of an image from SAM prompted with a grid of single points.

    Args:
        sam: a Segment Anything model in eval mode (see :func:`build_sam`); stays frozen.
        config: filters and mode; defaults are the official generator's (METHOD.md §2).
    """

    def __init__(self, sam: Sam, config: CandidateConfig | None = None):
        self.sam = sam
        self.config = config or CandidateConfig()
        self.decoder = GridDecoder(sam)
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self._image_size: tuple[int, int] | None = None  # original (H, W)
        self._sam_image_size: tuple[int, int] | None = None  # the image SAM was given
        self._input_size: tuple[int, int] | None = None  # after ResizeLongestSide
        self._embed_seconds = 0.0

    @property
    def device(self) -> torch.device:
        return self.sam.device

    @torch.inference_mode()
    def set_image(self, image: np.ndarray) -> None:
        """Encode one image with SAM's own preprocessing (as ``SamPredictor.set_image``).

        Args:
            image: (H, W, 3) uint8 RGB, the original frame.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
        start = time.perf_counter()
        self._image_size = (int(image.shape[0]), int(image.shape[1]))
        if self.config.reference_resize_224:
            image = cv2.resize(image, (REFERENCE_SAM_SIZE, REFERENCE_SAM_SIZE), interpolation=cv2.INTER_LINEAR)
        self._sam_image_size = (int(image.shape[0]), int(image.shape[1]))
        resized = self.transform.apply_image(image)
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        self._input_size = (int(x.shape[-2]), int(x.shape[-1]))
        embedding = self.sam.image_encoder(self.sam.preprocess(x))
        self.decoder.set_image_embedding(embedding)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._embed_seconds = time.perf_counter() - start

    def grid_points(self, image_size: tuple[int, int], coarse_map: np.ndarray | None = None) -> np.ndarray:
        """(P, 2) float64 (x, y) grid points in original pixels, in the official generator's
        order; with pruning on and a coarse map, only those inside its dilated foreground.

        Args:
            image_size: (H, W) of the original image.
            coarse_map: (h, w) float map covering the whole image on its own grid (14x14).
        """
        h, w = image_size
        grid = build_all_layer_point_grids(self.config.points_per_side, 0, 1)[0]
        points = grid * np.array([w, h], dtype=np.float64)[None]
        if self.config.prune_with_coarse_map and coarse_map is not None:
            points = points[self._inside_coarse_foreground(points, image_size, coarse_map)]
        return points

    def _inside_coarse_foreground(
        self, points: np.ndarray, image_size: tuple[int, int], coarse_map: np.ndarray
    ) -> np.ndarray:
        coarse = np.asarray(coarse_map, dtype=np.float32)
        if coarse.ndim != 2:
            raise ValueError(f"coarse_map must be 2-D (h, w), got shape {coarse.shape}")
        lo, hi = float(coarse.min()), float(coarse.max())
        if not hi > lo:  # a flat map says nothing about where the object is
            return np.ones(len(points), dtype=bool)
        foreground = ((coarse - lo) / (hi - lo) >= self.config.prune_threshold).astype(np.uint8)
        d = self.config.prune_dilation
        if d > 0:
            foreground = cv2.dilate(foreground, np.ones((2 * d + 1, 2 * d + 1), np.uint8))
        ch, cw = coarse.shape
        h, w = image_size
        rows = np.clip(np.floor(points[:, 1] * ch / h).astype(int), 0, ch - 1)
        cols = np.clip(np.floor(points[:, 0] * cw / w).astype(int), 0, cw - 1)
        return foreground[rows, cols].astype(bool)

    @torch.inference_mode()
    def generate(self, image: np.ndarray | None, coarse_map: np.ndarray | None = None) -> Candidates:
        """Candidate masks of one image.

        Args:
            image: (H, W, 3) uint8 RGB; None reuses the image of the last :meth:`set_image`
                (the embedding is not recomputed).
            coarse_map: (h, w) GTFormer coarse map covering the whole image; used only to prune
                grid points when ``config.prune_with_coarse_map``.

        Returns:
            :class:`Candidates`, sorted by decreasing predicted IoU.
        """
        if image is not None:
            self.set_image(image)
        elif self._image_size is None:
            raise RuntimeError("pass an image, or call set_image() first")
        cfg = self.config
        exact = cfg.mode == "exact"
        image_size, sam_size, input_size = self._image_size, self._sam_image_size, self._input_size
        decode_seconds = 0.0
        start = time.perf_counter()

        points = self.grid_points(image_size, coarse_map)
        # Grid points in the frame SAM was given (differs from the original only for the 224 option).
        sam_scale = np.array([sam_size[1] / image_size[1], sam_size[0] / image_size[0]])
        # SAM's low-res logits are 4x its embedding grid; ``upscale`` input pixels per cell.
        upscale = self.sam.image_encoder.img_size // (4 * self.sam.prompt_encoder.image_embedding_size[0])
        valid_h, valid_w = math.ceil(input_size[0] / upscale), math.ceil(input_size[1] / upscale)
        kept: dict[str, list[torch.Tensor]] = {k: [] for k in ("logits", "iou", "stab", "point", "index", "masks", "boxes")}
        for first in range(0, len(points), cfg.points_per_batch):
            batch = points[first : first + cfg.points_per_batch]
            coords = self.transform.apply_coords(batch * sam_scale, sam_size)
            coords = torch.as_tensor(coords, dtype=torch.float32, device=self.device)[:, None, :]
            labels = torch.ones(coords.shape[:2], dtype=torch.int, device=self.device)
            t = time.perf_counter()
            low_res, iou = self.decoder.decode(coords, labels, multimask_output=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            decode_seconds += time.perf_counter() - t

            n_masks = low_res.shape[1]
            logits = low_res.flatten(0, 1)
            iou = iou.flatten(0, 1)
            point_idx = torch.arange(first, first + len(batch), device=self.device).repeat_interleave(n_masks)
            mask_idx = torch.arange(n_masks, device=self.device).repeat(len(batch))

            keep = torch.ones_like(iou, dtype=torch.bool)
            if cfg.pred_iou_thresh > 0.0:
                keep = iou > cfg.pred_iou_thresh
            logits, iou, point_idx, mask_idx = logits[keep], iou[keep], point_idx[keep], mask_idx[keep]
            # One cell of padding past the image: bilinear upsampling of the edge pixels reads it.
            logits = logits[:, : valid_h + 1, : valid_w + 1]

            if exact:
                masks, stab = self._full_resolution_filter_inputs(logits, upscale, input_size, sam_size)
            else:
                valid = logits[:, :valid_h, :valid_w]
                masks = valid > cfg.mask_threshold
                stab = calculate_stability_score(valid, cfg.mask_threshold, cfg.stability_score_offset)
            keep = torch.ones_like(stab, dtype=torch.bool)
            if cfg.stability_score_thresh > 0.0:
                keep = stab >= cfg.stability_score_thresh
            masks, logits = masks[keep], logits[keep]
            boxes = batched_mask_to_box(masks)
            if not exact:
                boxes = self._cells_to_pixels(boxes, masks, upscale, input_size, sam_size)
            kept["masks"].append(masks)
            kept["boxes"].append(boxes)
            kept["logits"].append(logits)
            kept["iou"].append(iou[keep])
            kept["stab"].append(stab[keep])
            kept["point"].append(point_idx[keep])
            kept["index"].append(mask_idx[keep])

        if not kept["iou"]:  # every grid point was pruned
            mask_size = image_size if exact else (valid_h, valid_w)
            return self._empty(image_size, mask_size, upscale, decode_seconds, start)
        data = {k: torch.cat(v) for k, v in kept.items()}
        # The official generator also drops boxes near a crop's edge unless they are near the
        # image's edge (is_box_near_crop_edge); with one full-image crop both edges coincide and
        # it keeps every box, so there is no such filter here.
        order = batched_nms(
            data["boxes"].float(), data["iou"], torch.zeros_like(data["iou"]), iou_threshold=cfg.box_nms_thresh
        )
        data = {k: v[order] for k, v in data.items()}

        boxes = data["boxes"]
        if sam_size != image_size:  # the 224 option: report boxes and masks in the original frame
            if exact:
                full = _upscale_logits(data["logits"][:, None], upscale, input_size, image_size)[:, 0]
                data["masks"] = full > cfg.mask_threshold
                boxes = batched_mask_to_box(data["masks"])
            else:
                empty = ~data["masks"].flatten(1).any(1)
                cell = (image_size[0] / sam_size[0], image_size[1] / sam_size[1])
                boxes = _scale_boxes(boxes, cell, image_size)
                boxes[empty] = 0
        point_idx = data["point"].cpu().numpy()
        candidates = Candidates(
            masks=data["masks"].cpu().numpy(),
            pred_ious=data["iou"].float().cpu().numpy(),
            stability_scores=data["stab"].float().cpu().numpy(),
            point_coords=points[point_idx],
            multimask_index=data["index"].cpu().numpy().astype(np.int64),
            boxes_xyxy=boxes.cpu().numpy().astype(np.int64),
            image_size=image_size,
            mode=cfg.mode,
            num_grid_points=len(points),
            _low_res_logits=data["logits"].float().cpu(),
            _input_size=input_size,
            _upscale=upscale,
            _mask_threshold=cfg.mask_threshold,
        )
        total = time.perf_counter() - start
        candidates.timings = {"embed": self._embed_seconds, "decode": decode_seconds, "filter": total - decode_seconds}
        return candidates

    def _full_resolution_filter_inputs(
        self, logits: torch.Tensor, upscale: int, input_size: tuple[int, int], out_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Upscale logits to the SAM image frame in chunks (a 256-point batch of 3 masks at
        1000x1000 would be 3 GB of float32); return bool masks and stability scores."""
        cfg = self.config
        chunk = max(1, (1 << 24) // max(1, out_size[0] * out_size[1]))
        masks, stab = [], []
        for part in torch.split(logits, chunk):
            full = _upscale_logits(part[:, None], upscale, input_size, out_size)[:, 0]
            stab.append(calculate_stability_score(full, cfg.mask_threshold, cfg.stability_score_offset))
            masks.append(full > cfg.mask_threshold)
        if not masks:
            return torch.zeros((0, *out_size), dtype=torch.bool, device=logits.device), logits.new_zeros(0)
        return torch.cat(masks), torch.cat(stab)

    @staticmethod
    def _cells_to_pixels(
        boxes: torch.Tensor, masks: torch.Tensor, upscale: int, input_size: tuple[int, int], size: tuple[int, int]
    ) -> torch.Tensor:
        """Inclusive low-res cell boxes -> inclusive pixel boxes in an image of ``size``."""
        cell = (size[0] * upscale / input_size[0], size[1] * upscale / input_size[1])
        pixels = _scale_boxes(boxes, cell, size)
        pixels[~masks.flatten(1).any(1)] = 0
        return pixels

    def _empty(self, image_size, mask_size, upscale, decode_seconds, start) -> Candidates:
        c = Candidates(
            masks=np.zeros((0, *mask_size), dtype=bool),
            pred_ious=np.zeros(0, np.float32),
            stability_scores=np.zeros(0, np.float32),
            point_coords=np.zeros((0, 2)),
            multimask_index=np.zeros(0, np.int64),
            boxes_xyxy=np.zeros((0, 4), np.int64),
            image_size=image_size,
            mode=self.config.mode,
            num_grid_points=0,
            _low_res_logits=torch.zeros(0, 1, 1),
            _input_size=self._input_size,
            _upscale=upscale,
            _mask_threshold=self.config.mask_threshold,
        )
        total = time.perf_counter() - start
        c.timings = {"embed": self._embed_seconds, "decode": decode_seconds, "filter": total - decode_seconds}
        return c
