"""Stage 2 of Pro2SAM: candidate masks from Segment Anything prompted with a grid of points.

METHOD.md §2. One image is encoded once; every grid point is decoded as a single foreground
click with three masks each (multimask), in large batches through :class:`GridDecoder`; masks are
then filtered exactly as ``SamAutomaticMaskGenerator`` filters a single full-image crop
(predicted IoU, stability score, box NMS; no crops, no small-region post-processing). As there,
the masks of an image travel through short stages in a ``MaskData``: decode and filter each batch
of points, concatenate, box NMS, then hand out :class:`Candidates`.

Two paths compute the filters:

- ``"exact"``: on masks upscaled to the image's full resolution, as the official generator does;
  its candidate set equals the official one (tests/test_candidates.py checks it).
- ``"fast"`` (default): on SAM's low-resolution logits (256x256 for the 1024 px models) cropped to
  the image, never upsampling every mask; ``Candidates.full_resolution_mask(i)`` upsamples one
  candidate exactly as ``Sam.postprocess_masks`` does. Where a low-resolution value lies close
  enough to a threshold that full resolution could decide otherwise (a stability score within
  :data:`STABILITY_MARGIN` of its threshold), it is decided as the exact path decides it, on the
  upsampled mask; and the boxes NMS compares are the full-resolution masks' boxes, found from the
  few full-resolution lines next to the low-resolution box's edges (interpolation is separable,
  and no line outside them can hold a pixel of the mask), so that both keep the same candidates
  (``benchmarks/bench_speed.py --shipped`` measures how often the chosen mask is the official
  flow's).

Many images: :meth:`GridCandidateGenerator.generate_batch` encodes the images of a batch in one
image-encoder call (uint8 pixels go to the device and are normalised there), then decodes each
image's grid in as few passes as the memory budget allows (``CandidateConfig.memory_budget_mb``:
the large-image OOM of ``SamAutomaticMaskGenerator`` cannot happen), filters on the device and
hands each image's candidates out as soon as they are ready, so that matching on the CPU overlaps
the next image's decoding. Optional: bfloat16 autocast (``dtype``) and ``torch.compile``.

The model is seen only through :mod:`pro2sam.segmenters` (encode images; decode point prompts
to low-resolution logits and predicted IoUs; how those logits map back to pixels): everything
here runs the same on segment-anything v1 and on SAM 2.1 (``GridCandidateGenerator`` takes
either model).

Frames (:class:`pro2sam.segmenters.Frames`): "original" is the image passed to
:meth:`GridCandidateGenerator.generate` (H x W); "SAM image" is the image SAM was given (the
original, or 224 x 224 with the reference option); "low-res" is the model's mask logit grid over
the SAM image (v1: SAM's input is the SAM image resized so its longest side is
``img_size``, zero-padded to a square, one low-res cell per 4 input pixels; SAM 2: the SAM image
resized to a square, 256 x 256 cells over all of it). Boxes are ``(x0, y0, x1, y1)`` inclusive
pixel indices (``x1`` is the last foreground column), the convention of
``segment_anything.utils.amg.batched_mask_to_box``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import cv2
import numpy as np
import torch
from segment_anything.utils.amg import (
    MaskData,
    batch_iterator,
    batched_mask_to_box,
    build_all_layer_point_grids,
    calculate_stability_score,
)
from torchvision.ops.boxes import batched_nms, box_iou

from .sam import REFERENCE_SAM_SIZE, SAM_VARIANTS
from .segmenters import Frames, ImageEmbedding, PromptableSegmenter, segmenter_for
from .segmenters import _interpolation_matrix  # noqa: F401  (tests)
from .segmenters import upscale_logits as _upscale_logits  # noqa: F401  (tests)


__all__ = ["CandidateConfig", "Candidates", "DTYPES", "GridCandidateGenerator"]

# CandidateConfig.dtype -> the dtypes SAM's image encoder and mask decoder run in (autocast).
DTYPES = {
    "float32": (torch.float32, torch.float32),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "bfloat16-encoder": (torch.bfloat16, torch.float32),
    "float16-encoder": (torch.float16, torch.float32),
}
# The memory budget where none is given and the device is not a GPU.
DEFAULT_MEMORY_BUDGET_MB = 4096
# Off a GPU the fast decoder is memory-bound: it decodes as many prompts per pass as take this
# much activation memory (GridDecoder.bytes_per_prompt: 8-9 prompts of SAM vit_b or SAM 2.1 on a
# 64x64 embedding, hundreds for small models), and runs its per-pixel tail on this many embedding
# cells at a time, so that the intermediates stay near the cache (one torch thread, 64x64
# embedding: 2.5-3x faster decoding than 64 prompts at once, benchmarks/README.md "The decoder in
# cache-sized pieces"). Results do not depend on either.
CPU_PASS_BYTES = 256 << 20
CPU_TAIL_CELLS = 1024
# Fast path: a low-resolution stability score this close to its threshold is recomputed at full
# resolution. Low and full resolution differ by up to ~0.04 in stability (the shipped SAM, 4 px
# per low-res cell).
STABILITY_MARGIN = 0.05
# Masks whose full-resolution box edges are searched for together (memory: a few full-resolution
# lines per mask and edge).
EDGE_SEARCH_CHUNK = 512


@dataclass(frozen=True)
class CandidateConfig:
    """How grid-prompted SAM candidates are generated and filtered.

    The first group are ``SamAutomaticMaskGenerator``'s arguments, with its defaults (the
    reference settings, METHOD.md §2); a threshold of 0 switches its filter off, as there.

    Attributes:
        points_per_side: the grid has points_per_side**2 points over the whole image.
        points_per_batch: prompts decoded and filtered together (memory vs speed; no effect on
            results), at most; fewer when the memory budget asks for it. Off a GPU the decoder
            runs each such pass in pieces of ``CPU_PASS_BYTES`` of activations.
        pred_iou_thresh: keep masks whose predicted IoU is strictly above this.
        stability_score_thresh: keep masks whose stability score is at least this.
        stability_score_offset: logit offset of the stability score's two thresholds.
        box_nms_thresh: box IoU above which the lower-scoring (predicted IoU) mask is dropped.
        mask_threshold: logit above which a pixel is foreground (SAM uses 0.0).
        mode: "fast" filters on the low-resolution logits; "exact" on full-resolution masks,
            reproducing the official generator.
        prune_with_coarse_map: drop grid points outside the coarse foreground before decoding
            (about half the grid). On by default: on the synthetic val split it cost no GT-known
            Loc (88.0 either way, ``benchmarks/bench_quality.py``); ``False`` decodes every point.
        prune_threshold: a coarse-map cell is foreground where the min-max normalised map is at
            least this.
        prune_dilation: grow that foreground by this many coarse-map cells (square neighbourhood)
            so that points near the object's edge are kept.
        reference_resize_224: resize the image to 224x224 (bilinear, OpenCV) before SAM, as the
            authors do; filters then run in that frame and candidates are reported in the
            original frame. By default SAM sees the original image (and resizes its longest
            side itself).
        dtype: "float32"; "bfloat16": SAM's image encoder and mask decoder run under bfloat16
            autocast (the filters read float32 copies of the logits); or "bfloat16-encoder": the
            image encoder only (most of the work on a GPU), its embedding decoded in float32.
            Faster where the hardware has bfloat16 matrix units (recent GPUs; CPUs with
            AVX512-BF16 or AMX); masks near a threshold may flip, so check the same-answer rate
            (benchmarks/bench_speed.py --shipped: on the shipped SAM 74-79 % of chosen masks the
            same with "bfloat16", 90-91 % with "bfloat16-encoder"). "float16-encoder": the image
            encoder under float16 autocast (3 more mantissa bits than bfloat16, as fast on a GPU's
            matrix units, a narrower range: an embedding that overflows is refused with a clear
            error), its embedding decoded in float32 (100 % the same there).
        compile: run SAM's image encoder and the per-prompt decoder pass through
            ``torch.compile``: a cold start (the first batch, and the first of another size)
            of seconds on small models to minutes on ViT-H, then faster batches.
        relax_filters_when_empty: **[ours]**, off by default (the reference falls back to the coarse
            map's box): when no mask of an image passes the predicted-IoU and stability filters,
            decode its grid again with both filters off (pruning and NMS as set) instead of
            leaving matching nothing. Where the map lights a part, its box is the part's, and
            SAM's less confident masks still hold the object (the part regime of the synthetic
            world: 89.0 -> 91.0 GT-known Loc on val, ``benchmarks/README.md``); where the map
            already covers the object its box may be the better answer: ``pro2sam tune`` decides.
        memory_budget_mb: activation memory one batch may take on the device: bounds the prompts
            decoded per pass (fast path: fixed per prompt; exact path: grows with the image) and
            the images encoded per image-encoder call. None: half the GPU's memory on CUDA,
            4096 MB elsewhere.
    """

    points_per_side: int = 32
    points_per_batch: int = 256
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    mask_threshold: float = 0.0
    mode: str = "fast"
    prune_with_coarse_map: bool = True
    prune_threshold: float = 0.2
    prune_dilation: int = 1
    reference_resize_224: bool = False
    dtype: str = "float32"
    compile: bool = False
    memory_budget_mb: int | None = None
    relax_filters_when_empty: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("fast", "exact"):
            raise ValueError(f"mode must be 'fast' or 'exact', not {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.memory_budget_mb is not None and self.memory_budget_mb < 1:
            raise ValueError(f"memory_budget_mb must be positive, not {self.memory_budget_mb}")
        if not 1 <= self.points_per_side <= 256:
            raise ValueError(f"points_per_side must be 1..256, not {self.points_per_side}")
        if self.points_per_batch < 1:
            raise ValueError(f"points_per_batch must be positive, not {self.points_per_batch}")
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], not {getattr(self, name)}")
        if self.prune_dilation < 0:
            raise ValueError("prune_dilation must be >= 0")

    @classmethod
    def for_variant(cls, variant: str, **settings) -> CandidateConfig:
        """The settings for a SAM variant: ``settings`` (None values are left out), with the
        variant's own filter thresholds and grid (:attr:`SamVariant.filter_thresholds`,
        :attr:`SamVariant.points_per_side`) where not given, and the defaults above for the rest."""
        if variant not in SAM_VARIANTS:
            raise ValueError(f"unknown SAM variant {variant!r}; choose from {', '.join(sorted(SAM_VARIANTS))}")
        spec = SAM_VARIANTS[variant]
        own = dict(spec.filter_thresholds)
        if spec.points_per_side is not None:
            own["points_per_side"] = spec.points_per_side
        given = {k: v for k, v in settings.items() if v is not None}
        return cls(**{**own, **given})

    @classmethod
    def resolve(cls, variant: str, candidates: CandidateConfig | None) -> CandidateConfig:
        """What an optional ``candidates`` means: itself where given; None: the variant's
        defaults (:meth:`for_variant`)."""
        return candidates if candidates is not None else cls.for_variant(variant)


@dataclass
class Candidates:
    """The candidate masks of one image, sorted by decreasing predicted IoU (NMS order).

    Attributes:
        masks: (N, h, w) bool covering the whole original image. Exact mode: full resolution,
            (h, w) = (H, W). Fast mode: SAM's low-resolution grid cropped to the image, e.g.
            (192, 256) for a 3:4 image with a 1024 px SAM; cell (i, j) covers original pixels
            [i*sy, (i+1)*sy) x [j*sx, (j+1)*sx) with sy = H/h, sx = W/w (up to the last cell,
            which may be partial).
        pred_ious: (N,) float32, SAM's predicted IoU.
        stability_scores: (N,) float32, computed at the resolution of ``masks``.
        point_coords: (N, 2) float64, the (x, y) grid point that prompted each mask, original pixels.
        multimask_index: (N,) int64, which of SAM's three multimask outputs (0..2) each mask is.
        boxes_xyxy: (N, 4) int64 inclusive box of each mask in original pixels ([0, 0, 0, 0]
            for an empty mask). Fast mode: that of the full-resolution mask, found from the
            lines next to the low-resolution box's edges (up to float rounding); with the 224
            option, from the low-resolution mask (within about one cell).
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
    # (N, kh, kw) float32 logits over the unpadded SAM input plus one cell of padding (bilinear
    # upsampling near the image edge reads it), on SAM's device (only the winner leaves it), and
    # the frames that say how to upsample them.
    _low_res_logits: torch.Tensor | None = field(default=None, repr=False)
    _frames: Frames | None = field(default=None, repr=False)
    _mask_threshold: float = field(default=0.0, repr=False)
    # What matching derived from these candidates under one set of rejection rules (see
    # pro2sam.matching.match_at_full_resolution's ``cache``): several matching rules, one upsampling.
    match_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.pred_ious)

    def full_resolution_mask(self, i: int) -> np.ndarray:
        """(H, W) bool mask of candidate ``i`` in the original frame.

        Exact mode: ``masks[i]``. Fast mode: that candidate's logits upsampled exactly as
        ``Sam.postprocess_masks`` does (bilinear to the padded SAM input, crop, bilinear to H x W),
        then thresholded: the mask the exact path has for the same point and multimask output.
        """
        if self.mode == "exact":
            return self.masks[i]
        logits = self._low_res_logits[i : i + 1, None]
        full = self._frames.upsample(logits, self.image_size)[0, 0]
        return full.gt(self._mask_threshold).cpu().numpy()


def _first_positive_lines(
    logits: torch.Tensor, first_cell: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, threshold: float
) -> torch.Tensor:
    """For (N, kh, kw) low-res logits whose first row of cells with a logit above ``threshold``
    is ``first_cell`` (N,): the first row of the full-resolution logits ``rows @ logits @ cols^T``
    with a value above ``threshold``, looked for among the rows that weigh that cell or the next;
    -1 where none of them has one.

    The rows above those weigh only cells whose logits are all at most the threshold, with
    non-negative weights that sum to one, so none of them can exceed it. Only the few cells the
    searched rows weigh are interpolated, along the whole width."""
    n, kh, kw = logits.shape
    device = logits.device
    reached = rows > 0  # (H, kh)
    top = reached.float().argmax(0)  # (kh,) the first full-resolution row that weighs each cell
    bottom = rows.shape[0] - 1 - reached.flip(0).float().argmax(0)  # (kh,) the last
    after = torch.clamp(torch.arange(kh, device=device) + 1, max=kh - 1)
    band = int((bottom[after] - top + 1).max())
    row_index = torch.clamp(top[first_cell][:, None] + torch.arange(band, device=device), max=rows.shape[0] - 1)
    weights = rows[row_index]  # (N, band, kh)
    nonzero = weights > 0
    low = nonzero.any(1).float().argmax(1)  # (N,) the first cell the band weighs
    high = kh - 1 - nonzero.any(1).flip(1).float().argmax(1)  # the last
    width = int((high - low + 1).max())
    offset = torch.arange(width, device=device)
    cell_index = torch.clamp(low[:, None] + offset, max=kh - 1)  # (N, width)
    weights = weights.gather(2, cell_index[:, None, :].expand(-1, band, -1))
    weights = weights * (offset <= (high - low)[:, None])[:, None, :]  # a clamped repeat weighs 0
    lines = logits.gather(1, cell_index[:, :, None].expand(-1, -1, kw)).float() @ cols.T  # (N, width, W)
    hit = (weights @ lines > threshold).any(2)  # (N, band): full-resolution rows with a positive pixel
    first = row_index.gather(1, hit.float().argmax(1, keepdim=True))[:, 0]
    return torch.where(hit.any(1), first, torch.full_like(first, -1))


def _full_resolution_boxes(
    logits: torch.Tensor, upscale: int, input_size: tuple[int, int], out_size: tuple[int, int], threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_boxes_at_full_resolution` for segment-anything v1's upsampling
    (:func:`pro2sam.segmenters.upscale_logits`)."""
    rows = _interpolation_matrix(logits.shape[1], upscale, input_size[0], out_size[0], logits.device)
    cols = _interpolation_matrix(logits.shape[2], upscale, input_size[1], out_size[1], logits.device)
    return _boxes_at_full_resolution(logits, rows, cols, out_size, threshold)


def _boxes_at_full_resolution(
    logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, out_size: tuple[int, int], threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive xyxy boxes of the masks ``rows @ logits @ cols^T > threshold`` of (N, kh, kw)
    low-res logits (``rows`` (H, kh) and ``cols`` (W, kw): the upsampling's interpolation
    matrices, :meth:`pro2sam.segmenters.Frames.interpolation_matrix`), without upsampling whole
    masks: each edge is looked for among the full-resolution lines next to the outermost low-res
    cells above the threshold.

    Returns:
        boxes: (N, 4) int64, those of ``batched_mask_to_box`` on the upsampled masks up to float
            rounding (the two axes are interpolated in another order); [0, 0, 0, 0] for a mask
            empty at low resolution.
        found: (N,) bool; False where an edge is not among those lines (the outermost cells fade
            out once upsampled): upsample those masks instead.
    """
    n, kh, kw = logits.shape
    positive = logits > threshold
    any_row, any_col = positive.any(2), positive.any(1)  # (N, kh), (N, kw)
    first_row, last_row = any_row.float().argmax(1), kh - 1 - any_row.flip(1).float().argmax(1)
    first_col, last_col = any_col.float().argmax(1), kw - 1 - any_col.flip(1).float().argmax(1)
    across = logits.transpose(1, 2)
    y0 = _first_positive_lines(logits, first_row, rows, cols, threshold)
    y1 = _first_positive_lines(logits.flip(1), kh - 1 - last_row, rows.flip(0, 1), cols, threshold)
    x0 = _first_positive_lines(across, first_col, cols, rows, threshold)
    x1 = _first_positive_lines(across.flip(1), kw - 1 - last_col, cols.flip(0, 1), rows, threshold)
    edges = torch.stack([x0, y0, x1, y1], 1)
    boxes = torch.stack([x0, y0, out_size[1] - 1 - x1, out_size[0] - 1 - y1], 1)
    empty = ~any_row.any(1)
    return torch.where(empty[:, None], torch.zeros_like(boxes), boxes), empty | (edges >= 0).all(1)


def _scale_boxes(
    boxes: torch.Tensor, masks: torch.Tensor, cell: tuple[float, float], size: tuple[int, int]
) -> torch.Tensor:
    """Inclusive boxes of ``masks`` on a grid whose cells are ``cell`` = (sy, sx) pixels -> the
    inclusive pixel boxes they cover in an image of ``size`` (H, W); [0, 0, 0, 0] for an empty mask,
    as ``batched_mask_to_box`` gives."""
    sy, sx = cell
    h, w = size
    b = boxes.double()
    x0 = torch.floor(b[:, 0] * sx)
    y0 = torch.floor(b[:, 1] * sy)
    x1 = torch.clamp(torch.ceil((b[:, 2] + 1) * sx) - 1, max=w - 1)
    y1 = torch.clamp(torch.ceil((b[:, 3] + 1) * sy) - 1, max=h - 1)
    pixels = torch.stack([x0, y0, x1, y1], dim=1).long()
    pixels[~masks.flatten(1).any(1)] = 0
    return pixels


class GridCandidateGenerator:
    """Candidate masks of an image from SAM prompted with a grid of single points.

    Args:
        sam: a Segment Anything model in eval mode (see :func:`pro2sam.sam.build_sam`): a
            segment-anything v1 ``Sam``, a SAM 2.1 ``SAM2Base``, or a
            :class:`pro2sam.segmenters.PromptableSegmenter`; stays frozen.
        config: filters and mode; defaults are the official generator's (METHOD.md §2).
    """

    def __init__(self, sam, config: CandidateConfig | None = None):
        self.config = config or CandidateConfig()
        self.segmenter: PromptableSegmenter = segmenter_for(sam, compile=self.config.compile)
        self.sam = self.segmenter.model
        self._budget = self._memory_budget_bytes()
        encoder_dtype, decoder_dtype = DTYPES[self.config.dtype]
        self.decoder = self.segmenter.point_decoder(compile=self.config.compile)
        self.prompts_per_pass = self._prompts_per_pass(decoder_dtype.itemsize)  # decoded and filtered together
        self.decoder.batch_size = self.prompts_per_pass
        if self.device.type == "cpu":  # the decoder splits a pass into cache-sized pieces
            per_prompt = self.decoder.bytes_per_prompt(decoder_dtype.itemsize)
            self.decoder.batch_size = min(self.prompts_per_pass, max(1, CPU_PASS_BYTES // per_prompt))
            self.decoder.tail_cells = CPU_TAIL_CELLS
        self._images_per_pass = max(1, self._budget // self.segmenter.encoder_bytes_per_image(encoder_dtype.itemsize))
        self._frames: Frames | None = None  # of the image last given to set_image
        self._embedding: ImageEmbedding | None = None  # and its embedding
        self._embed_seconds = 0.0
        self._decode_seconds = 0.0
        self._path: _Path = _PATHS[self.config.mode]

    @property
    def device(self) -> torch.device:
        return self.sam.device

    def _autocast(self, network: str = "decoder"):
        """SAM's ``"encoder"`` or ``"decoder"`` in its dtype of ``config.dtype``."""
        dtype = DTYPES[self.config.dtype][network == "decoder"]
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    # ---------------------------------------------------------------- memory

    def _memory_budget_bytes(self) -> int:
        mb = self.config.memory_budget_mb
        if mb is None:
            if self.device.type == "cuda":
                return torch.cuda.get_device_properties(self.device).total_memory // 2
            mb = DEFAULT_MEMORY_BUDGET_MB
        return mb << 20

    def _prompts_per_pass(self, itemsize: int) -> int:
        """Prompts per decoder pass: ``points_per_batch``, fewer if the budget asks for it."""
        return max(1, min(self.config.points_per_batch, self._budget // self.decoder.bytes_per_prompt(itemsize)))

    # ---------------------------------------------------------------- encoding

    def _prepare(self, image: np.ndarray) -> tuple[torch.Tensor, Frames]:
        """One image -> its pixels on the device, as the segmenter's own predictor prepares
        them (the 224 option first), and its frames."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
        original = (int(image.shape[0]), int(image.shape[1]))
        if self.config.reference_resize_224:
            image = cv2.resize(image, (REFERENCE_SAM_SIZE, REFERENCE_SAM_SIZE), interpolation=cv2.INTER_LINEAR)
        return self.segmenter.prepare(image, original)

    def _encode(self, pixels: list[torch.Tensor]) -> list[ImageEmbedding]:
        """Prepared images -> their embeddings, in one image-encoder call (the decoder takes
        them in its own dtype, :meth:`GridDecoder.set_image_embedding`)."""
        with self._autocast("encoder"):
            embeddings = self.segmenter.encode(pixels)
        if DTYPES[self.config.dtype][0] == torch.float16:  # float16's range is narrow: one check per batch
            finite = [torch.isfinite(t).all() for e in embeddings for t in [e.embedding, *(e.high_res or [])]]
            if not bool(torch.stack(finite).all()):
                raise FloatingPointError(
                    f"SAM's image encoder overflowed float16 (--dtype {self.config.dtype}): "
                    "use --dtype bfloat16-encoder or float32"
                )
        return embeddings

    @torch.inference_mode()
    def set_image(self, image: np.ndarray) -> None:
        """Encode one image with SAM's own preprocessing (as ``SamPredictor.set_image``).

        Args:
            image: (H, W, 3) uint8 RGB, the original frame.
        """
        start = time.perf_counter()
        pixels, self._frames = self._prepare(image)
        self._set_embedding(self._encode([pixels])[0])
        self._synchronize()
        self._embed_seconds = time.perf_counter() - start

    def adopt_image(self, other: GridCandidateGenerator) -> None:
        """Take over the image ``other`` encoded last, so that :meth:`generate` (with ``image``
        None) decodes it under this generator's settings without running SAM's image encoder
        again: one encoding, several filter or pruning settings (``pro2sam tune``).

        Raises:
            ValueError: ``other`` holds another SAM, no image, or encodes differently
                (``reference_resize_224``, ``dtype``).
        """
        encoding = ("reference_resize_224", "dtype")
        if other.sam is not self.sam or other._frames is None or other._embedding is None:
            raise ValueError("adopt_image needs a generator of the same SAM that holds an image")
        if any(getattr(other.config, k) != getattr(self.config, k) for k in encoding):
            raise ValueError(f"adopt_image needs generators that encode alike ({', '.join(encoding)})")
        self._frames = other._frames
        self._set_embedding(other._embedding)
        self._embed_seconds = 0.0

    def _set_embedding(self, embedding: ImageEmbedding) -> None:
        self._embedding = embedding
        with self._autocast():
            self.decoder.set_image_embedding(embedding.embedding, embedding.high_res)

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
        elif self._frames is None:
            raise RuntimeError("pass an image, or call set_image() first")
        return self._candidates(coarse_map)

    @torch.inference_mode()
    def generate_batch(
        self, images: Sequence[np.ndarray], coarse_maps: Sequence[np.ndarray | None] | None = None
    ) -> Iterator[Candidates]:
        """Candidate masks of several images: :meth:`generate` of each, in order, with the
        images encoded together (as many per image-encoder call as the memory budget allows).

        Args:
            images: (H_i, W_i, 3) uint8 RGB images, any sizes.
            coarse_maps: one (h, w) coarse map (or None) per image, for pruning.

        Yields:
            One :class:`Candidates` per image, as soon as it is ready (lazily: the next image is
            decoded when the next one is asked for). Its ``timings["embed"]`` is its share of
            its encoder call.
        """
        if coarse_maps is None:
            coarse_maps = [None] * len(images)
        if len(coarse_maps) != len(images):
            raise ValueError(f"got {len(images)} images but {len(coarse_maps)} coarse maps")
        for first in range(0, len(images), self._images_per_pass):
            chunk = range(first, min(len(images), first + self._images_per_pass))
            start = time.perf_counter()
            prepared = [self._prepare(images[i]) for i in chunk]
            embeddings = self._encode([pixels for pixels, _ in prepared])
            self._synchronize()
            seconds = (time.perf_counter() - start) / len(chunk)
            for i, (_, frames), embedding in zip(chunk, prepared, embeddings):
                self._frames, self._embed_seconds = frames, seconds
                self._set_embedding(embedding)
                yield self._candidates(coarse_maps[i])

    def _candidates(self, coarse_map: np.ndarray | None) -> Candidates:
        """The stages after encoding, for the image of ``self._frames``: decode the grid in
        passes, filter each, NMS, hand out."""
        start = time.perf_counter()
        self._decode_seconds = 0.0
        points = self.grid_points(self._frames.original, coarse_map)
        if len(points) == 0:  # every grid point was pruned
            return self._finalize(self._no_masks(), 0, start)

        filters = _Filters(self.config.pred_iou_thresh, self.config.stability_score_thresh)
        data = self._filtered_masks(points, filters)
        if len(data["iou_preds"]) == 0 and self.config.relax_filters_when_empty:
            data = self._filtered_masks(points, _Filters(0.0, 0.0))
        self._nms(data)
        if self._frames.sam_image != self._frames.original:
            self._path.to_original_frame(self, data)
        return self._finalize(data, len(points), start)

    def _filtered_masks(self, points: np.ndarray, filters: _Filters) -> MaskData:
        """The masks of (P, 2) grid points (original pixels) that pass ``filters``, before NMS."""
        data = MaskData()
        for (batch,) in batch_iterator(self._path.points_per_batch(self), points):
            data.cat(self._process_batch(batch, filters))
        return data

    def _process_batch(self, points: np.ndarray, filters: _Filters) -> MaskData:
        """Decode (B, 2) grid points (original pixels); keep the masks that pass ``filters``."""
        data = self._decode(points, filters.pred_iou)
        if filters.pred_iou > 0.0:
            data.filter(data["iou_preds"] > filters.pred_iou)
        # Keep the cells over the image and one cell of padding past it: bilinear upsampling of
        # the edge pixels reads it.
        low_h, low_w = self._frames.low_res
        data["logits"] = data["logits"][:, : low_h + 1, : low_w + 1]
        self._path.masks(self, data, filters.stability)
        return data

    def _decode(self, points: np.ndarray, pred_iou_thresh: float) -> MaskData:
        """SAM's three masks for each of (B, 2) points: (3B', kh, kw) float32 low-res logits over
        the image and one cell past it, predicted IoUs, the prompting point and which multimask
        output each mask is, point-major. With ``pred_iou_thresh`` > 0, the B' points kept are
        those with a mask above it: the others' masks are never upscaled."""
        f = self._frames
        # Grid points in the SAM image (differs from the original only for the 224 option).
        sam_scale = np.array([f.sam_image[1] / f.original[1], f.sam_image[0] / f.original[0]])
        coords = self.segmenter.to_input_coords(points * sam_scale, f)
        coords = torch.as_tensor(coords, dtype=torch.float32, device=self.device)[:, None, :]
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=self.device)
        region = f.region  # embedding cells over the image and the low-res cell past it
        start = time.perf_counter()
        with self._autocast():
            if pred_iou_thresh > 0.0:
                logits, iou, kept = self.decoder.decode_masks_above(coords, labels, pred_iou_thresh, region=region)
            else:
                logits, iou = self.decoder.decode(coords, labels, multimask_output=True, region=region)
                kept = torch.arange(len(points), device=self.device)
        self._synchronize()
        self._decode_seconds += time.perf_counter() - start
        n_masks = logits.shape[1]
        kept = kept.cpu().numpy()
        return MaskData(
            logits=logits.flatten(0, 1).float(),
            iou_preds=iou.flatten(0, 1).float(),
            points=torch.as_tensor(points[kept].repeat(n_masks, axis=0)),
            multimask_index=torch.arange(n_masks, device=self.device).repeat(len(kept)),
        )

    def _nms(self, data: MaskData) -> None:
        """Box NMS by predicted IoU, leaving the masks in NMS order (decreasing predicted IoU).

        The official generator also drops boxes near a crop's edge unless they are near the
        image's edge (is_box_near_crop_edge); with one full-image crop both edges coincide and it
        keeps every box, so there is no such filter here.
        """
        iou_preds = data["iou_preds"]
        self._path.boxes_for_nms(self, data)
        keep = batched_nms(
            data["boxes"].float(), iou_preds, torch.zeros_like(iou_preds), iou_threshold=self.config.box_nms_thresh
        )
        data.filter(keep)

    def _full_resolution_stability(self, logits: torch.Tensor) -> torch.Tensor:
        """Stability scores of (N, kh, kw) low-res logits computed on their full-resolution
        masks, as the exact path computes them."""
        cfg = self.config
        return torch.cat([
            calculate_stability_score(self._upscale_to(chunk, self._frames.sam_image), cfg.mask_threshold,
                                      cfg.stability_score_offset)
            for chunk in torch.split(logits, self._full_resolution_chunk())
        ])

    def _full_resolution_chunk(self) -> int:
        """Masks upscaled to the SAM image together: a 256-point batch of 3 masks at 1000x1000
        would be 3 GB of float32."""
        h, w = self._frames.sam_image
        return max(1, min(1 << 24, self._budget // 16) // max(1, h * w))

    def _upscale_to(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(N, kh, kw) low-res logits -> (N, *size) as the model's own post-processing upscales
        them (``Sam.postprocess_masks``, ``SAM2Transforms.postprocess_masks``)."""
        return self._frames.upsample(logits[:, None], size)[:, 0]

    def _no_masks(self) -> MaskData:
        """What is left when no grid point is decoded."""
        f = self._frames
        return MaskData(
            logits=torch.zeros(0, 1, 1),
            iou_preds=torch.zeros(0),
            points=torch.zeros((0, 2), dtype=torch.float64),
            multimask_index=torch.zeros(0, dtype=torch.int64),
            stability_score=torch.zeros(0),
            masks=torch.zeros((0, *self._path.mask_frame(f)), dtype=torch.bool),
            boxes=torch.zeros((0, 4), dtype=torch.int64),
        )

    def _finalize(self, data: MaskData, num_grid_points: int, start: float) -> Candidates:
        f = self._frames
        candidates = Candidates(
            masks=data["masks"].cpu().numpy(),
            pred_ious=data["iou_preds"].float().cpu().numpy(),
            stability_scores=data["stability_score"].float().cpu().numpy(),
            point_coords=data["points"].numpy(),
            multimask_index=data["multimask_index"].cpu().numpy().astype(np.int64),
            boxes_xyxy=data["boxes"].cpu().numpy().astype(np.int64),
            image_size=f.original,
            mode=self.config.mode,
            num_grid_points=num_grid_points,
            _low_res_logits=data["logits"],
            _frames=f,
            _mask_threshold=self.config.mask_threshold,
        )
        filter_seconds = time.perf_counter() - start - self._decode_seconds
        candidates.timings = {"embed": self._embed_seconds, "decode": self._decode_seconds, "filter": filter_seconds}
        return candidates

    def _synchronize(self) -> None:
        """Wait for the GPU, so that stage timings hold the work they started."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ---------------------------------------------------------------- the two paths


class _Filters(NamedTuple):
    """The thresholds a batch of masks is filtered with (0: that filter is off): the config's,
    or both off for an image none of whose masks passes them (``relax_filters_when_empty``)."""

    pred_iou: float
    stability: float


class _Path:
    """Where the exact and fast paths differ, chosen once per generator (``CandidateConfig.mode``).
    Each method works on the generator's current image (``gen._frames``)."""

    def points_per_batch(self, gen: GridCandidateGenerator) -> int:
        """Grid points decoded and filtered together."""
        return gen.prompts_per_pass

    def masks(self, gen: GridCandidateGenerator, data: MaskData, stability_thresh: float) -> None:
        """Add ``masks``, ``stability_score`` and ``boxes`` to ``data`` (low-res logits over the
        image and one cell past it) and keep the masks whose stability passes ``stability_thresh``."""
        raise NotImplementedError

    def boxes_for_nms(self, gen: GridCandidateGenerator, data: MaskData) -> None:
        """Make ``data["boxes"]`` those NMS must compare (the full-resolution masks' boxes)."""

    def to_original_frame(self, gen: GridCandidateGenerator, data: MaskData) -> None:
        """The 224 option: boxes (and masks) from the SAM image to the original frame."""
        raise NotImplementedError

    def mask_frame(self, frames: Frames) -> tuple[int, int]:
        """(h, w) of the masks handed out."""
        raise NotImplementedError


def _keep_stable(data: MaskData, stability_thresh: float) -> None:
    if stability_thresh > 0.0:
        data.filter(data["stability_score"] >= stability_thresh)


class _ExactPath(_Path):
    """Masks, stability scores and boxes from the logits upscaled to the SAM image, as
    ``Sam.postprocess_masks`` and the official generator compute them."""

    def points_per_batch(self, gen: GridCandidateGenerator) -> int:
        # fewer when the batch's full-resolution masks would not fit the budget
        h, w = gen._frames.sam_image
        return min(gen.prompts_per_pass, max(1, gen._budget // (3 * h * w * 10)))  # 3: logits, bool, stability

    def masks(self, gen: GridCandidateGenerator, data: MaskData, stability_thresh: float) -> None:
        cfg = gen.config
        size = gen._frames.sam_image
        masks, stability = [], []
        for logits in torch.split(data["logits"], gen._full_resolution_chunk()):
            full = gen._upscale_to(logits, size)
            stability.append(calculate_stability_score(full, cfg.mask_threshold, cfg.stability_score_offset))
            masks.append(full > cfg.mask_threshold)
        if masks:
            data["masks"], data["stability_score"] = torch.cat(masks), torch.cat(stability)
        else:
            data["masks"] = torch.zeros((0, *size), dtype=torch.bool, device=data["logits"].device)
            data["stability_score"] = data["logits"].new_zeros(0)
        _keep_stable(data, stability_thresh)
        data["boxes"] = batched_mask_to_box(data["masks"])

    def to_original_frame(self, gen: GridCandidateGenerator, data: MaskData) -> None:
        data["masks"] = gen._upscale_to(data["logits"], gen._frames.original) > gen.config.mask_threshold
        data["boxes"] = batched_mask_to_box(data["masks"])

    def mask_frame(self, frames: Frames) -> tuple[int, int]:
        return frames.original


class _FastPath(_Path):
    """Masks and stability scores on the low-res cells over the image; every box that goes into
    NMS found at full resolution without upsampling whole masks. Where a value could decide
    otherwise at full resolution it is computed there, so that both paths keep the same masks:
    a stability score within :data:`STABILITY_MARGIN` of its threshold, and every box NMS
    compares (a low-res box is off by up to a cell per side, which flips NMS decisions between
    small masks at any margin)."""

    def masks(self, gen: GridCandidateGenerator, data: MaskData, stability_thresh: float) -> None:
        cfg, f = gen.config, gen._frames
        low_h, low_w = f.low_res
        logits = data["logits"][:, :low_h, :low_w]
        data["masks"] = logits > cfg.mask_threshold
        stability = calculate_stability_score(logits, cfg.mask_threshold, cfg.stability_score_offset)
        if stability_thresh > 0.0:
            near = torch.nonzero((stability - stability_thresh).abs() <= STABILITY_MARGIN).flatten()
            if len(near):
                stability[near] = gen._full_resolution_stability(data["logits"][near]).to(stability.dtype)
        data["stability_score"] = stability
        _keep_stable(data, stability_thresh)
        data["boxes"] = _scale_boxes(batched_mask_to_box(data["masks"]), data["masks"], f.cell, f.sam_image)

    def boxes_for_nms(self, gen: GridCandidateGenerator, data: MaskData) -> None:
        """The full-resolution box of every mask: each edge looked for among the lines next to
        the low-res box's edges (:func:`_boxes_at_full_resolution`); only masks whose edges are
        not there (they fade out once upsampled) are upsampled whole."""
        boxes, logits = data["boxes"], data["logits"]
        if len(boxes) == 0:
            return
        f, threshold = gen._frames, gen.config.mask_threshold
        kh, kw = logits.shape[1:]
        rows = f.interpolation_matrix(0, kh, f.sam_image[0], boxes.device)
        cols = f.interpolation_matrix(1, kw, f.sam_image[1], boxes.device)
        unresolved = []
        for index in torch.split(torch.arange(len(boxes), device=boxes.device), EDGE_SEARCH_CHUNK):
            found_boxes, found = _boxes_at_full_resolution(logits[index], rows, cols, f.sam_image, threshold)
            boxes[index[found]] = found_boxes[found].to(boxes.dtype)
            unresolved.append(index[~found])
        for index in torch.split(torch.cat(unresolved), gen._full_resolution_chunk()):
            masks = gen._upscale_to(logits[index], f.sam_image) > threshold
            boxes[index] = batched_mask_to_box(masks).to(boxes.dtype)

    def to_original_frame(self, gen: GridCandidateGenerator, data: MaskData) -> None:
        # the masks stay on the low-res grid of the SAM image
        f = gen._frames
        cell = (f.original[0] / f.sam_image[0], f.original[1] / f.sam_image[1])
        data["boxes"] = _scale_boxes(data["boxes"], data["masks"], cell, f.original)

    def mask_frame(self, frames: Frames) -> tuple[int, int]:
        return frames.low_res


_PATHS: dict[str, _Path] = {"exact": _ExactPath(), "fast": _FastPath()}
