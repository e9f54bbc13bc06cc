"""Stage 3 of Pro2SAM: pick one SAM candidate mask with the GTFormer coarse map (METHOD.md §3).

Frames: the coarse map covers the whole image on its own grid (14x14 for a 224 input). Candidate
masks cover the whole image too, at any resolution (full resolution on the exact path, SAM's
low-resolution grid on the fast path). Boxes are ``(x0, y0, x1, y1)`` inclusive pixel indices
(``x1`` is the last foreground column), the convention of the inclusive-IoU metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "MatchConfig",
    "Match",
    "SIMILARITIES",
    "match_masks",
    "match_at_full_resolution",
    "FULL_RESOLUTION_MARGIN",
    "min_component_area",
    "boxed_mask",
    "mask_box",
    "coarse_fallback",
    "upsample_coarse_map",
    "absorb_lit_parts",
]

# Minimum connected-component area of a usable mask, in pixels of a 224x224 frame.
REFERENCE_FRAME = 224

# match_at_full_resolution: candidates whose low-resolution score is within this of the best are
# scored again at full resolution (a 14x14 cell more or less moves an IoU by a few hundredths).
FULL_RESOLUTION_MARGIN = 0.1


@dataclass(frozen=True)
class MatchConfig:
    """How a candidate mask is chosen.

    Attributes:
        similarity: name in :data:`SIMILARITIES`: "iou" (reference), "dice", or "soft-iou"
            (candidate against the continuous coarse map instead of its binarisation).
        coarse_threshold: the raw coarse map is foreground where it is strictly above this (0.2).
        match_size: side of the square grid both maps are compared on; None uses the coarse
            map's own grid (14x14 for 224 input, the reference).
        min_component_area: a candidate needs a connected component of at least this many pixels
            in a 224x224 frame; scaled with the mask's resolution. The chosen mask keeps only its
            components of at least this area, and its box is theirs (:func:`boxed_mask`).
        reject_full_frame: reject candidates whose box spans the whole image.
        fallback_threshold: threshold on the min-max normalised, upsampled coarse map for the
            coarse-map box used when no candidate survives.
        part_to_object: **[ours]**, off by default: part-to-object completion (METHOD.md §3). A
            classifier's map may favour the discriminative part, and SAM segments that part as a
            confident mask of its own; SAM's nested outputs give the hierarchy. When the best match lies inside a
            larger kept candidate that still agrees with the coarse map, that candidate (the
            object) is taken instead, and again from it while one qualifies.
        containment: the best match "lies inside" a candidate when at least this share of its
            pixels are the candidate's.
        min_growth: the candidate must be at least this many times the best match's area.
        agreement: the candidate "still agrees with the coarse map" when its similarity is at
            least this share of the best match's.
        completion_size: side of the square grid completion compares the candidates on (their
            containment and areas; each mask resized to it, a cell is the mask's where most of
            its pixels are); None compares them pixel by pixel at the masks' own resolution. A
            coarse grid forgives a part whose edge stops a pixel short of its object's (SAM's
            masks of neighbouring regions meet, they do not overlap); every path resizes the same
            full-resolution masks, so the fast and exact paths still decide alike. Part-to-object
            only: container-to-object compares pixels.
        container_to_object: **[ours]**, off by default; not with ``part_to_object``: the climb's
            mirror (METHOD.md §3), for a map that already covers the object. SAM's grid also
            emits containers (object + branch, dog + sofa), and a coarse map's blur can favour
            the container over the object inside it. When a smaller kept candidate lies inside
            the best match (``containment`` of its pixels are the match's), keeps at least
            ``object_mass`` of the map's mass over the match, and the area it sheds is weakly lit
            (its mean map value at most ``support_contrast`` times the candidate's own), that
            candidate is taken instead, and again from it while one qualifies (the mass always
            measured against the best match's). The same rule drops a stray piece that stretches
            the match's box when SAM also emits the match without it.
        object_mass: share of the map's mass (the coarse map upsampled bilinearly to the masks'
            frame, summed over the mask's pixels) over the best match that the object keeps.
        support_contrast: the shed area's mean map value, at most this times the object's mean
            (>= 0; ``inf`` asks nothing of the shed area).
        absorb_parts: **[ours]**, off by default; after any rule: SAM's grid may split an object
            into its body and the part at its edge that the map lights (the class part); with the
            body chosen, the stored mask would leave the part out. The stored mask also takes each
            smaller kept candidate (at most ``absorb_area`` of its area) that the map lights at
            least ``absorb_contrast`` times as brightly as the chosen mask (mean of the map,
            min-max normalised and upsampled, over the pixels) and that grows the chosen box's area
            at most ``absorb_box_growth`` times; the box is the new mask's (:func:`absorb_lit_parts`).
        absorb_contrast: the candidate's mean map value, at least this times the chosen mask's (>= 0).
        absorb_box_growth: the chosen box with the candidate's pixels, at most this times its area (>= 1).
        absorb_area: the candidate's area, at most this share of the chosen mask's (in (0, 1]).
    """

    similarity: str = "iou"
    coarse_threshold: float = 0.2
    match_size: int | None = None
    min_component_area: float = 10.0
    reject_full_frame: bool = True
    fallback_threshold: float = 0.2
    # Off by default: the authors' rule. Part-to-object gains where the map lights a part (the
    # shipped synthetic world: 53.5 -> 86.5 GT-known on val) and loses where the map already covers
    # the object (95.5 -> 92.5); no rule read from the map alone did both (benchmarks/README.md,
    # "Which rule by default"), so the data decide: ``pro2sam tune`` turns it on where it gains,
    # and the shipped models come with the settings it chose (``--settings shipped``).
    part_to_object: bool = False
    containment: float = 0.6
    min_growth: float = 1.5
    agreement: float = 0.02
    completion_size: int | None = None
    container_to_object: bool = False
    object_mass: float = 0.4
    support_contrast: float = 0.7
    # Off by default; `pro2sam tune` tries it on its choice (the part regime's val split: the part
    # held 95.0 -> 98.0 % of images, the boxes unchanged; benchmarks/README.md, "Absorbing the lit part").
    absorb_parts: bool = False
    absorb_contrast: float = 0.5
    absorb_box_growth: float = 1.1
    absorb_area: float = 0.25

    def __post_init__(self) -> None:
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {self.similarity!r}; choose from {sorted(SIMILARITIES)}")
        for name in ("coarse_threshold", "fallback_threshold", "containment", "agreement", "object_mass"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], not {getattr(self, name)}")
        if not self.support_contrast >= 0.0:  # past 1 the shed area may be lit more than the object; inf asks nothing
            raise ValueError(f"support_contrast must be >= 0, not {self.support_contrast}")
        if self.part_to_object and self.container_to_object:
            raise ValueError("part_to_object and container_to_object go opposite ways: turn on one of them")
        if self.min_growth < 1.0:
            raise ValueError(f"min_growth must be >= 1, not {self.min_growth}")
        if not self.absorb_contrast >= 0.0:
            raise ValueError(f"absorb_contrast must be >= 0, not {self.absorb_contrast}")
        if not self.absorb_box_growth >= 1.0:
            raise ValueError(f"absorb_box_growth must be >= 1, not {self.absorb_box_growth}")
        if not 0.0 < self.absorb_area <= 1.0:
            raise ValueError(f"absorb_area must be in (0, 1], not {self.absorb_area}")
        size = self.completion_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"completion_size must be a positive whole number of cells or None, not {size!r}")


@dataclass
class Match:
    """Outcome of matching one image's candidates.

    Attributes:
        index: position of the chosen candidate, or None when none survived (use the fallback).
        match_score: similarity of the chosen candidate (nan when index is None).
        scores: (N,) float64 similarity of every candidate; nan for rejected ones.
        rejected: (N,) str, "" for scored candidates, else why it was rejected
            ("no component of the minimum area", "box spans the whole frame").
        best_match: the candidate plain matching chose; differs from ``index`` when part-to-object
            completion took a larger candidate containing it, or container-to-object a smaller
            one inside it.
    """

    index: int | None
    match_score: float
    scores: np.ndarray
    rejected: np.ndarray
    best_match: int | None = None

    @property
    def completed(self) -> bool:
        """True when part-to-object (or container-to-object) replaced the best match by its object."""
        return self.index is not None and self.index != self.best_match


def _iou(target: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    inter = (candidates * target).flatten(1).sum(1)
    union = (candidates + target - candidates * target).flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(union))


def _dice(target: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    inter = (candidates * target).flatten(1).sum(1)
    total = candidates.flatten(1).sum(1) + target.sum()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1e-12), torch.zeros_like(total))


# Each similarity maps (binary coarse map, continuous coarse map, binary candidates (N, s, s))
# to (N,) scores in [0, 1]. soft-iou is the fuzzy Jaccard index against the continuous map.
SIMILARITIES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "iou": lambda binary, continuous, cands: _iou(binary, cands),
    "dice": lambda binary, continuous, cands: _dice(binary, cands),
    "soft-iou": lambda binary, continuous, cands: _iou(continuous, cands),
}


def min_component_area(mask_shape: tuple[int, int], area_at_224: float) -> int:
    """The minimum component area scaled from a 224x224 frame to a (h, w) mask, at least 1 px."""
    h, w = mask_shape
    return max(1, int(round(area_at_224 * h * w / REFERENCE_FRAME**2)))


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components: (labels (h, w) int32, stats (K, 5) without the background row)."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return labels, stats[1:]


def _has_component(mask: np.ndarray, min_area: int) -> bool:
    if not mask.any():
        return False
    _, stats = _components(mask)
    return bool((stats[:, cv2.CC_STAT_AREA] >= min_area).any())


def _spans_frame(mask: np.ndarray) -> bool:
    rows, cols = mask.any(1), mask.any(0)
    return bool(rows[0] and rows[-1] and cols[0] and cols[-1])


def _downsample(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize to (size, size); any non-zero value is foreground (the reference rule)."""
    resized = F.interpolate(masks[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
    return (resized[:, 0] > 0).float()


def _majority(mask: np.ndarray, size: int) -> np.ndarray:
    """(size, size) bool: the cells of a (H, W) bool mask on a square grid of that side that
    hold at least half of their pixels in the mask (cells split the frame as adaptive average
    pooling does; counts are exact)."""
    h, w = mask.shape
    counts = np.pad(mask, ((1, 0), (1, 0))).astype(np.int64).cumsum(0).cumsum(1)
    r0 = (np.arange(size) * h) // size
    r1 = -((-(np.arange(size) + 1) * h) // size)
    c0 = (np.arange(size) * w) // size
    c1 = -((-(np.arange(size) + 1) * w) // size)
    inside = counts[r1][:, c1] - counts[r0][:, c1] - counts[r1][:, c0] + counts[r0][:, c0]
    cells = np.outer(r1 - r0, c1 - c0)
    return 2 * inside >= cells


@dataclass(frozen=True)
class _Prepared:
    """What matching derives from the candidates before any score: which are rejected and why,
    the kept ones downsampled to the matching grid, and (for completion) their pixels as bits.

    Attributes:
        rejected: (N,) str, why each candidate was rejected ("" for kept ones).
        keep: (K,) int64 indices of the kept candidates.
        downsampled: (K, s, s) float32 0/1, the kept masks on the matching grid.
        packed: (K, B) uint8, ``np.packbits`` of each kept mask, flattened: 1/8 of the masks'
            memory, their overlaps counted exactly.
        shape: (H, W) of the masks.
        grids: completion grid side -> (K, b) uint8, the kept masks on that grid, packed
            (:meth:`on_grid`, made once per side).
    """

    rejected: np.ndarray
    keep: np.ndarray
    downsampled: torch.Tensor
    packed: np.ndarray
    shape: tuple[int, int] = (0, 0)
    grids: dict = field(default_factory=dict)

    def on_grid(self, size: int | None) -> np.ndarray:
        """The kept masks' packed bits at their own resolution (None) or on a ``size`` grid."""
        if size is None:
            return self.packed
        if size not in self.grids:
            pixels = self.shape[0] * self.shape[1]
            self.grids[size] = np.stack([
                np.packbits(_majority(np.unpackbits(bits, count=pixels).reshape(self.shape).astype(bool), size).ravel())
                for bits in self.packed
            ]) if len(self.packed) else np.zeros((0, 0), np.uint8)  # fmt: skip
        return self.grids[size]


def _prepare(candidate_masks, config: MatchConfig, size: int) -> _Prepared:
    """Read each candidate once, in order: reject, downsample and pack the kept ones."""
    n = len(candidate_masks)
    rejected = np.full(n, "", dtype=object)
    min_area, shape = None, (0, 0)
    keep, downsampled, packed = [], [], []
    for i in range(n):
        mask = np.asarray(candidate_masks[i], dtype=bool)
        if min_area is None:
            min_area, shape = min_component_area(mask.shape, config.min_component_area), mask.shape
        if not _has_component(mask, min_area):
            rejected[i] = "no component of the minimum area"
        elif config.reject_full_frame and _spans_frame(mask):
            rejected[i] = "box spans the whole frame"
        else:
            keep.append(i)
            downsampled.append(_downsample(torch.from_numpy(mask)[None], size)[0])
            packed.append(np.packbits(mask.ravel()))
    return _Prepared(
        rejected=rejected.astype(str),
        keep=np.asarray(keep, dtype=np.int64),
        downsampled=torch.stack(downsampled) if downsampled else torch.zeros((0, size, size)),
        packed=np.stack(packed) if packed else np.zeros((0, 0), np.uint8),
        shape=tuple(shape),
    )


def match_masks(
    coarse_map: np.ndarray,
    candidate_masks: np.ndarray | Sequence[np.ndarray],
    pred_ious: np.ndarray,
    config: MatchConfig = MatchConfig(),
    *,
    cache: dict | None = None,
) -> Match:
    """Score every candidate against the coarse map and pick the best.

    Args:
        coarse_map: (h, w) float, GTFormer's coarse foreground map M_b in (0, 1), whole image.
        candidate_masks: (N, H, W) bool, candidates over the whole image at any resolution; or
            a sequence of N such (H, W) masks, each read once, in order (masks made on demand,
            e.g. upsampled one at a time: :func:`match_at_full_resolution`).
        pred_ious: (N,) SAM's predicted IoU of each candidate; breaks ties in the score.
        config: similarity, thresholds and rejection rules.
        cache: a dict kept with these same candidates (empty at first): what does not depend on
            the scoring and completion rules is derived once and reused by the next call with
            other rules (``pro2sam tune`` matches each image's candidates under many).

    Returns:
        A :class:`Match`; ``index`` is None when there is no candidate or all were rejected.
    """
    n = len(candidate_masks)
    scores = np.full(n, np.nan)
    if n == 0:
        return Match(None, float("nan"), scores, np.full(0, "", dtype=str))

    size = config.match_size or coarse_map.shape[0]
    key = (config.min_component_area, config.reject_full_frame, size)
    prepared = None if cache is None else cache.get(key)
    if prepared is None:
        prepared = _prepare(candidate_masks, config, size)
        if cache is not None:
            cache[key] = prepared
    keep, rejected = prepared.keep, prepared.rejected.copy()
    if len(keep) == 0:
        return Match(None, float("nan"), scores, rejected)

    continuous = torch.as_tensor(np.asarray(coarse_map, dtype=np.float32))
    if continuous.shape != (size, size):
        continuous = F.interpolate(continuous[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    binary = (continuous > config.coarse_threshold).float()
    scores[keep] = SIMILARITIES[config.similarity](binary, continuous, prepared.downsampled).double().numpy()

    # Highest score first; among equal scores the higher predicted IoU wins.
    kept_scores = scores[keep]
    order = np.lexsort((-np.asarray(pred_ious, dtype=np.float64)[keep], -kept_scores))
    best = int(keep[order[0]])
    chosen = best
    if config.part_to_object:
        chosen = _complete_to_object(best, keep, prepared.on_grid(config.completion_size), scores, config)
    elif config.container_to_object:
        chosen = _shed_container(best, keep, prepared.packed, prepared.shape, scores, coarse_map, config)
    return Match(chosen, float(scores[chosen]), scores, rejected, best_match=best)


def match_at_full_resolution(
    coarse_map: np.ndarray,
    candidate_masks: np.ndarray,
    pred_ious: np.ndarray,
    full_resolution: Callable[[int], np.ndarray],
    config: MatchConfig = MatchConfig(),
    *,
    cache: dict | None = None,
) -> tuple[Match, np.ndarray | None]:
    """:func:`match_masks` of low-resolution candidates, decided as on full-resolution masks.

    Plain matching: the candidates are scored on ``candidate_masks``; those whose score is within
    :data:`FULL_RESOLUTION_MARGIN` of the best (the only ones that could win at full resolution)
    are scored again on ``full_resolution(i)``, and the best of those wins. With part-to-object
    or container-to-object on, which compare the kept candidates pixel by pixel (a low-resolution cell more
    or less moves a containment ratio across its threshold), everything is decided on the
    full-resolution masks, upsampled one at a time; a mask empty at low resolution is empty at
    full resolution (bilinear upsampling cannot exceed its cells), so it is not upsampled.

    Args:
        coarse_map, candidate_masks, pred_ious, config: as for :func:`match_masks`.
        full_resolution: candidate index -> its (H, W) bool mask in the original frame.
        cache: a dict kept with these candidates (``Candidates.match_cache``): with completion,
            the full-resolution masks are upsampled once for every rule matched on them.

    Returns:
        The :class:`Match` (``scores`` at low resolution, those of the rescored candidates at
        full resolution; with completion, all at full resolution), and the chosen
        full-resolution mask (None when nothing was chosen).
    """
    if config.part_to_object or config.container_to_object:
        n = len(candidate_masks)
        filled = np.flatnonzero(np.asarray(candidate_masks).reshape(n, -1).any(1)) if n else np.zeros(0, np.int64)
        if len(filled) == 0:
            return match_masks(coarse_map, candidate_masks, pred_ious, config), None
        full = _FullResolution(full_resolution, len(candidate_masks), filled)
        match = match_masks(coarse_map, full, pred_ious, config, cache=None if cache is None else cache.setdefault("full", {}))
        return match, (None if match.index is None else full_resolution(match.index))
    match = match_masks(coarse_map, candidate_masks, pred_ious, config)
    if match.index is None:
        return match, None
    contenders = np.flatnonzero(match.scores >= match.match_score - FULL_RESOLUTION_MARGIN)
    full = np.stack([full_resolution(int(i)) for i in contenders])
    refined = match_masks(coarse_map, full, np.asarray(pred_ious)[contenders], config)
    if refined.index is None:  # every contender vanished at full resolution
        return match, full[list(contenders).index(match.index)]
    scores = match.scores.copy()
    scores[contenders] = refined.scores
    rejected = match.rejected.copy()
    rejected[contenders] = refined.rejected
    chosen = int(contenders[refined.index])
    return Match(chosen, refined.match_score, scores, rejected, best_match=chosen), full[refined.index]


class _FullResolution:
    """N candidates' full-resolution masks made on demand: ``full_resolution(i)`` for the
    ``filled`` ones, an empty mask of the same frame for the others."""

    def __init__(self, full_resolution: Callable[[int], np.ndarray], n: int, filled: np.ndarray) -> None:
        self._full_resolution, self._n = full_resolution, n
        self._filled = set(int(i) for i in filled)
        self._first_filled = int(filled[0])
        self._empty: np.ndarray | None = None  # made when first asked for: a cached match asks nothing

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> np.ndarray:
        if i in self._filled:
            return self._full_resolution(i)
        if self._empty is None:
            self._empty = np.zeros_like(self._full_resolution(self._first_filled), dtype=bool)
        return self._empty


# set bits of each byte value
_POPCOUNT = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)


def _complete_to_object(best: int, keep: np.ndarray, packed: np.ndarray, scores: np.ndarray, config: MatchConfig) -> int:
    """The object whose part ``best`` is (see :class:`MatchConfig`), climbing while one qualifies.

    Args:
        keep: (K,) indices of the kept candidates; packed: (K, B) uint8, their masks'
            pixels as bits (``np.packbits`` of the flattened mask), 1/8 of the memory of the
            masks, whose overlaps are counted exactly.
    """
    areas = _POPCOUNT[packed].sum(1, dtype=np.int64)
    chosen, floor = best, config.agreement * scores[best]
    while True:
        i = int(np.flatnonzero(keep == chosen)[0])
        inside = _POPCOUNT[packed & packed[i]].sum(1, dtype=np.int64) / max(1, areas[i])
        container = (inside >= config.containment) & (areas >= config.min_growth * areas[i]) & (scores[keep] >= floor)
        if not container.any():
            return chosen
        # The container that agrees best with the map; among equals, the smaller (the next level up).
        options = np.flatnonzero(container)
        chosen = int(keep[options[np.lexsort((areas[options], -scores[keep][options]))[0]]])


def _shed_container(
    best: int, keep: np.ndarray, packed: np.ndarray, shape: tuple[int, int], scores: np.ndarray, coarse_map: np.ndarray,
    config: MatchConfig,
) -> int:
    """The object inside the container ``best`` (see :class:`MatchConfig`), descending while one
    qualifies; among several, the one that keeps the most of the map's mass, then the better
    match. ``packed`` as for :func:`_complete_to_object`; ``shape`` is the masks' (H, W)."""
    pixels = shape[0] * shape[1]
    lit = F.interpolate(
        torch.as_tensor(np.asarray(coarse_map, dtype=np.float32))[None, None], size=tuple(shape), mode="bilinear",
        align_corners=False,
    )[0, 0].numpy().ravel().astype(np.float64)  # fmt: skip
    areas = _POPCOUNT[packed].sum(1, dtype=np.int64)
    masks: dict[int, np.ndarray] = {}

    def pixels_of(k: int) -> np.ndarray:
        if k not in masks:
            masks[k] = np.unpackbits(packed[k], count=pixels).astype(bool)
        return masks[k]

    def mass(k: int) -> float:
        return float(lit[pixels_of(k)].sum())

    i = int(np.flatnonzero(keep == best)[0])
    floor = config.object_mass * mass(i)
    while True:
        shared = _POPCOUNT[packed & packed[i]].sum(1, dtype=np.int64)
        inside = np.flatnonzero((shared >= config.containment * np.maximum(areas, 1)) & (areas < areas[i]) & (areas > 0))
        options = []
        for k in inside:
            kept = mass(int(k))
            if kept <= 0 or kept < floor:
                continue
            shed = pixels_of(i) & ~pixels_of(int(k))
            if shed.any() and lit[shed].mean() <= config.support_contrast * kept / areas[k]:
                options.append((-kept, -scores[keep[k]], int(k)))
        if not options:
            return int(keep[i])
        i = min(options)[2]


def absorb_lit_parts(
    mask: np.ndarray,
    box: tuple[int, int, int, int],
    coarse_map: np.ndarray,
    candidate: Callable[[int], np.ndarray],
    indices: Sequence[int],
    config: MatchConfig,
) -> tuple[np.ndarray, tuple[int, int, int, int], list[int]]:
    """The chosen mask with the lit parts SAM split from it (``MatchConfig.absorb_parts``).

    Args:
        mask: (H, W) bool, the chosen mask as stored (:func:`boxed_mask`); box: its box.
        coarse_map: (h, w) float, the coarse map the choice was made with.
        candidate: index -> that candidate's (H, W) bool mask in the same frame.
        indices: the kept candidates to consider (not the chosen one).
        config: ``absorb_contrast``, ``absorb_box_growth``, ``absorb_area``, ``min_component_area``.

    Returns:
        ``(mask, box, absorbed)``: the mask with every qualifying candidate's pixels and its
        :func:`boxed_mask` box (the inputs when none qualifies), and the absorbed indices.
    """
    area = int(mask.sum())
    if area == 0:
        return mask, box, []
    lit = upsample_coarse_map(coarse_map, mask.shape)
    brightness = float(lit[mask].mean())
    x0, y0, x1, y1 = box
    box_area = (x1 - x0 + 1) * (y1 - y0 + 1)
    out, absorbed = mask.copy(), []
    for i in indices:
        other = np.asarray(candidate(int(i)), dtype=bool)
        size = int(other.sum())
        if size == 0 or size > config.absorb_area * area or lit[other].mean() < config.absorb_contrast * brightness:
            continue
        rows, cols = np.flatnonzero(other.any(1)), np.flatnonzero(other.any(0))
        grown = (max(x1, cols[-1]) - min(x0, cols[0]) + 1) * (max(y1, rows[-1]) - min(y0, rows[0]) + 1)
        if grown <= config.absorb_box_growth * box_area:
            out |= other
            absorbed.append(int(i))
    if not absorbed:
        return mask, box, []
    kept, new_box = boxed_mask(out, config.min_component_area)
    return kept, new_box, absorbed


def boxed_mask(
    mask: np.ndarray, min_area_at_224: float = 10.0
) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """The chosen mask as it is stored, and its box: the mask's components of at least the
    (scaled) minimum area, and their union box (METHOD.md §3).

    The box of the localisation leaves specks out (a stray pixel of SAM's mask would otherwise
    stretch it), so the stored mask leaves them out too: mask and box agree, the box is the tight
    box of the mask's pixels. When no component reaches the minimum area, every pixel is kept.

    Args:
        mask: (H, W) bool in original-image pixels.
        min_area_at_224: minimum component area in a 224x224 frame, scaled to (H, W).

    Returns:
        ``(kept, box)``: kept (H, W) bool, the components kept; box ``(x0, y0, x1, y1)``,
        inclusive pixel indices of ``kept``. None for an empty mask.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    labels, stats = _components(mask)
    big = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= min_component_area(mask.shape, min_area_at_224))
    if len(big) == 0 or len(big) == len(stats):
        kept, big = mask, np.arange(len(stats))
    else:
        kept = np.isin(labels, big + 1)  # component k has label k + 1 (0 is the background)
    s = stats[big]
    x0 = s[:, cv2.CC_STAT_LEFT].min()
    y0 = s[:, cv2.CC_STAT_TOP].min()
    x1 = (s[:, cv2.CC_STAT_LEFT] + s[:, cv2.CC_STAT_WIDTH]).max() - 1
    y1 = (s[:, cv2.CC_STAT_TOP] + s[:, cv2.CC_STAT_HEIGHT]).max() - 1
    return kept, (int(x0), int(y0), int(x1), int(y1))


def mask_box(mask: np.ndarray, min_area_at_224: float = 10.0) -> tuple[int, int, int, int] | None:
    """The box of :func:`boxed_mask`: union box of the mask's components of at least the (scaled)
    minimum area (of all foreground pixels when none reaches it); ``(x0, y0, x1, y1)`` inclusive
    pixel indices, or None for an empty mask."""
    boxed = boxed_mask(mask, min_area_at_224)
    return None if boxed is None else boxed[1]


def upsample_coarse_map(coarse_map: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Min-max normalise the coarse map and resize it bilinearly to (H, W) = image_size."""
    m = torch.as_tensor(np.asarray(coarse_map, dtype=np.float32))
    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
    up = F.interpolate(m[None, None], size=tuple(image_size), mode="bilinear", align_corners=False)
    return up[0, 0].numpy()


def coarse_fallback(
    coarse_map: np.ndarray, image_size: tuple[int, int], threshold: float = 0.2
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """GTFormer's own localisation, used when no SAM candidate survives.

    The min-max normalised coarse map is upsampled to the image, thresholded strictly above
    ``threshold``, and its largest connected component is kept.

    Returns:
        mask: (H, W) bool, the largest component (the whole image for a constant map).
        box: ``(x0, y0, x1, y1)`` inclusive pixel indices of that component.
    """
    h, w = image_size
    fg = upsample_coarse_map(coarse_map, image_size) > threshold
    if not fg.any():  # a constant map carries no location: the whole image is the honest answer
        return np.ones((h, w), dtype=bool), (0, 0, w - 1, h - 1)
    labels, stats = _components(fg)
    largest = 1 + int(np.argmax(stats[:, cv2.CC_STAT_AREA]))
    mask = labels == largest
    s = stats[largest - 1]
    box = (
        int(s[cv2.CC_STAT_LEFT]),
        int(s[cv2.CC_STAT_TOP]),
        int(s[cv2.CC_STAT_LEFT] + s[cv2.CC_STAT_WIDTH] - 1),
        int(s[cv2.CC_STAT_TOP] + s[cv2.CC_STAT_HEIGHT] - 1),
    )
    return mask, box
