"""The offline world's ImageNet: a broad synthetic classification task to pretrain a DeiT backbone.

As DeiT is pretrained on ImageNet before it meets CUB, the backbone of the shipped GTFormer is
pretrained here before it meets the target world of :mod:`pro2sam.synthetic` (METHOD.md §5). The
classes are **not** the target world's: each is a triple

    (hue of the part, accent of its pattern, texture of the body the part is attached to)

over :data:`PRETRAIN_HUES` (6 saturated hues; never the target world's red or blue),
:data:`PRETRAIN_ACCENTS` (6: a solid part, or a fine pattern in white, black, a darker or a
lighter shade, or the complementary hue) and :data:`PRETRAIN_TEXTURES` (4), i.e. 144 classes.
The part's shape (:data:`PRETRAIN_SHAPES`, 10, the target world's five among them, as ImageNet
holds birds) and its pattern (:data:`PRETRAIN_PATTERNS`) are drawn at random and are not part of
the class. A scene is built like a target-world scene: a textured, cluttered background of low
saturation, one large *body* with a small saturated *part* attached to its outline, and 0-4
*distractor* bodies without a part whose textures are drawn from the same four. To name the class
a model must find the part, read its colours, and read the texture of the body it belongs to
(not of a distractor): what the coarse map of a WSOL model needs to know, taught with other labels.

Scenes are square, ``size`` pixels a side (default 144, smaller than GTFormer's 224 input so
that pretraining sees more images in the same time; a ViT built with ``dynamic_img_size``
resamples its 224 position embedding). Parts are drawn at 12-36 px (square root of their area;
scaled with ``size``), near the scale of the target world's parts at 224 (20-38 px), with the
target world's pattern periods, so patch-level features transfer.

Every scene is determined by ``(seed, index)`` (:func:`make_pretrain_scene`); labels cycle through
the classes in shuffled blocks. Frames: images (S, S, 3) uint8 RGB.
"""

from __future__ import annotations

import colorsys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from .synthetic import (
    DISTRACTOR_AREA_FRACTION,
    PART_PATTERN_KINDS,
    _background,
    _boundary_distance,
    _contrasting_colour,
    _pattern,
    _place_body,
    _polygon_area,
    _rasterize,
    _shift_value,
    _smooth_noise,
    _transform,
    _unit_part_polygon,
    part_pattern,
    two_tone,
)

__all__ = [
    "PRETRAIN_SHAPES",
    "PRETRAIN_PATTERNS",
    "PRETRAIN_HUES",
    "PRETRAIN_ACCENTS",
    "PRETRAIN_TEXTURES",
    "PRETRAIN_CLASSES",
    "PRETRAIN_GENERATOR_VERSION",
    "pretrain_class_factors",
    "pretrain_label",
    "PretrainScene",
    "make_pretrain_scene",
    "make_pretrain_arrays",
]

PRETRAIN_GENERATOR_VERSION = 3  # 3: the accent colour of the part's pattern is a class factor

PRETRAIN_SHAPES = ("disc", "triangle", "square", "star", "cross", "ring", "crescent", "bar", "chevron", "ell")
# Hue (0..1 of the HSV circle), away from the target world's red (~0.00) and blue (~0.63).
PRETRAIN_HUES: dict[str, float] = {
    "orange": 0.075, "yellow": 0.15, "green": 0.33, "cyan": 0.5, "purple": 0.77, "magenta": 0.87,
}  # fmt: skip
# Patterns of accented parts (solid parts have none).
PRETRAIN_PATTERNS = tuple(k for k in PART_PATTERN_KINDS if k != "solid")
# Second colour of the part's pattern: "plain" parts are solid; "dark" / "light" are shades of
# the part's hue; "complement" is the opposite hue.
PRETRAIN_ACCENTS = ("plain", "white", "black", "dark", "light", "complement")
# Body textures: "plain" is shading only; the others are pro2sam.synthetic's dull patterns.
PRETRAIN_TEXTURES = ("plain", "stripes", "spots", "checker")
# Class = (part hue, accent, body texture), hue-major: "orange_black_on_checker".
PRETRAIN_CLASSES: tuple[str, ...] = tuple(
    f"{h}_{a}_on_{t}" for h in PRETRAIN_HUES for a in PRETRAIN_ACCENTS for t in PRETRAIN_TEXTURES
)

_STREAM = 11  # apart from pro2sam.synthetic's streams (0..3)
_LABEL_KEY = 13
DEFAULT_SIZE = 144
PART_SIDE_PX = (12.0, 36.0)  # square root of the part's area at DEFAULT_SIZE, log-uniform
BODY_AREA_FRACTION = (0.15, 0.45)
MAX_DISTRACTORS = 4
_HOLE = 0.55  # inner radius of "ring"


@dataclass(frozen=True)
class PretrainScene:
    """One pretraining image and what it is made of.

    Attributes:
        image: (S, S, 3) uint8 RGB.
        label: class index into :data:`PRETRAIN_CLASSES`.
        part_mask: (S, S) bool, the saturated part that names hue and accent.
        body_mask: (S, S) bool, the body it is attached to (whose texture is the third factor),
            without the part.
        distractor_masks: (K, S, S) bool, K = 0..4, bodies without a part.
    """

    image: np.ndarray
    label: int
    part_mask: np.ndarray
    body_mask: np.ndarray
    distractor_masks: np.ndarray


def pretrain_class_factors(label: int) -> tuple[int, int, int]:
    """(hue, accent, texture) indices of a class."""
    na, nt = len(PRETRAIN_ACCENTS), len(PRETRAIN_TEXTURES)
    return label // (na * nt), (label // nt) % na, label % nt


def pretrain_label(seed: int, index: int) -> int:
    """Class of scene ``index``: every block of ``len(PRETRAIN_CLASSES)`` scenes holds each class once."""
    n = len(PRETRAIN_CLASSES)
    block, offset = divmod(index, n)
    return int(np.random.default_rng([seed, _STREAM, _LABEL_KEY, block]).permutation(n)[offset])


def _unit_polygon(shape: str) -> np.ndarray:
    """(N, 2) outline of a part shape of circumradius about 1 (ring and crescent: the outer disc)."""
    if shape in ("disc", "triangle", "square", "star", "cross"):
        return _unit_part_polygon(shape)
    if shape in ("ring", "crescent"):
        return _unit_part_polygon("disc")
    if shape == "bar":
        return np.array([[-0.95, -0.32], [0.95, -0.32], [0.95, 0.32], [-0.95, 0.32]])
    if shape == "chevron":
        return np.array([[-0.9, -0.8], [0.0, 0.1], [0.9, -0.8], [0.9, -0.2], [0.0, 0.7], [-0.9, -0.2]])
    if shape == "ell":
        return np.array([[-0.7, -0.9], [-0.2, -0.9], [-0.2, 0.4], [0.7, 0.4], [0.7, 0.9], [-0.7, 0.9]])
    raise ValueError(f"unknown pretraining shape {shape!r}")


def _part_mask(shape: str, radius: float, angle: float, centre: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool mask of a part of circumradius ``radius`` px, turned by ``angle``, at ``centre``."""
    mask = _rasterize(_transform(_unit_polygon(shape), radius, 1.0, angle, centre), size)
    if shape == "ring":
        mask &= ~_rasterize(_transform(_unit_part_polygon("disc"), _HOLE * radius, 1.0, 0.0, centre), size)
    elif shape == "crescent":
        offset = 0.45 * radius * np.array([np.cos(angle), np.sin(angle)])
        mask &= ~_rasterize(_transform(_unit_part_polygon("disc"), 0.8 * radius, 1.0, 0.0, centre + offset), size)
    return mask


def _unit_area(shape: str) -> float:
    area = _polygon_area(_unit_polygon(shape))
    if shape == "ring":
        area *= 1 - _HOLE**2
    elif shape == "crescent":
        area *= 0.45  # about what the offset disc leaves
    return area


def _textured(rng: np.random.Generator, size: tuple[int, int], base: np.ndarray, texture: str) -> np.ndarray:
    """(H, W, 3) float32 body texture of one of :data:`PRETRAIN_TEXTURES` around a dull ``base``."""
    shade = (_smooth_noise(rng, size, 3)[..., None] - 0.5) * rng.uniform(0, 30)
    if texture == "plain":
        return base + shade
    second = _shift_value(rng, base)
    weight = _pattern(rng, size, texture)[..., None] * rng.uniform(0.6, 0.9)
    return base * (1 - weight) + second * weight + shade


def make_pretrain_scene(seed: int, index: int, *, size: int = DEFAULT_SIZE) -> PretrainScene:
    """Scene ``index`` (of ``size`` x ``size`` px) of the pretraining stream of ``seed``; the same
    arguments always give the same scene."""
    rng = np.random.default_rng([seed, _STREAM, index])
    label = pretrain_label(seed, index)
    h, a, t = pretrain_class_factors(label)
    hue, accent, texture = list(PRETRAIN_HUES.values())[h], PRETRAIN_ACCENTS[a], PRETRAIN_TEXTURES[t]
    shape = PRETRAIN_SHAPES[int(rng.integers(len(PRETRAIN_SHAPES)))]
    pattern = "solid" if accent == "plain" else PRETRAIN_PATTERNS[int(rng.integers(len(PRETRAIN_PATTERNS)))]
    frame = (size, size)

    image = _background(rng, frame)
    background_mean = image.reshape(-1, 3).mean(0)

    part_side = float(np.exp(rng.uniform(*np.log(PART_SIDE_PX)))) * size / DEFAULT_SIZE
    radius = part_side / np.sqrt(_unit_area(shape))
    for attempt in range(20):
        area = rng.uniform(*BODY_AREA_FRACTION) * size * size * (0.85**attempt)
        placed = _place_body(rng, frame, area, margin=1.2 * radius + 1)
        if placed is not None:
            break
    else:  # a part too large for the frame: shrink it with the body
        radius *= 0.6
        placed = _place_body(rng, frame, 0.05 * size * size, margin=1.2 * radius + 1)
        if placed is None:
            placed = _place_body(rng, frame, 0.05 * size * size, margin=1)
    body_polygon, centre = placed
    body = _rasterize(body_polygon, frame)

    theta = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.cos(theta), np.sin(theta)])
    reach = _boundary_distance(body, centre, direction) + rng.uniform(-0.3, 0.3) * radius
    part_centre = centre + reach * direction
    part = _part_mask(shape, radius, rng.uniform(0, 2 * np.pi), part_centre, frame)

    taken = cv2.dilate((body | part).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    distractors = []
    for _ in range(int(rng.integers(0, MAX_DISTRACTORS + 1))):
        for _ in range(10):
            placed_d = _place_body(rng, frame, rng.uniform(*DISTRACTOR_AREA_FRACTION) * size * size, margin=1)
            if placed_d is None:
                continue
            mask = _rasterize(placed_d[0], frame)
            if mask.any() and not (mask & taken).any():
                distractors.append(mask)
                taken |= cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
                break

    image[body] = _textured(rng, frame, _contrasting_colour(rng, background_mean), texture)[body]
    for mask in distractors:
        kind = PRETRAIN_TEXTURES[int(rng.integers(len(PRETRAIN_TEXTURES)))]
        image[mask] = _textured(rng, frame, _contrasting_colour(rng, background_mean), kind)[mask]
    hue = (hue + rng.uniform(-0.02, 0.02)) % 1
    saturation, value = rng.uniform(0.75, 0.95), rng.uniform(0.75, 0.95)
    rgb = np.array(colorsys.hsv_to_rgb(hue, saturation, value), np.float32) * 255
    second = {
        "plain": None,
        "white": (240, 240, 232),
        "black": (22, 22, 28),
        "dark": rgb * 0.4,
        "light": np.array(colorsys.hsv_to_rgb(hue, 0.3, 1.0), np.float32) * 255,
        "complement": np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1, saturation, value), np.float32) * 255,
    }[accent]
    part_texture = two_tone(rng, rgb, part_pattern(rng, pattern, frame, part_centre), second)
    part_texture = part_texture + (_smooth_noise(rng, frame, 4)[..., None] - 0.5) * 30
    image[part] = part_texture[part]

    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 0.9))
    image = image + rng.normal(0, rng.uniform(1, 5), image.shape)
    return PretrainScene(
        image=np.clip(np.round(image), 0, 255).astype(np.uint8),
        label=label,
        part_mask=part,
        body_mask=body & ~part,
        distractor_masks=np.stack(distractors) if distractors else np.zeros((0, size, size), bool),
    )


def _make_range(args: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    seed, start, stop, size = args
    images = np.empty((stop - start, size, size, 3), np.uint8)
    labels = np.empty(stop - start, np.int64)
    for i in range(start, stop):
        scene = make_pretrain_scene(seed, i, size=size)
        images[i - start], labels[i - start] = scene.image, scene.label
    return images, labels


def make_pretrain_arrays(
    seed: int,
    count: int,
    *,
    first: int = 0,
    size: int = DEFAULT_SIZE,
    workers: int = 1,
    chunk: int = 500,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scenes ``first .. first + count - 1`` of ``seed`` as arrays (the same for any ``workers``).

    Args:
        out: optional (count, size, size, 3) uint8 array to fill (e.g. a ``np.lib.format.open_memmap``),
            so that tens of thousands of scenes need not be held twice in memory.

    Returns:
        images: (count, size, size, 3) uint8 RGB (``out`` when given).
        labels: (count,) int64.
    """
    images = np.empty((count, size, size, 3), np.uint8) if out is None else out
    if images.shape != (count, size, size, 3) or images.dtype != np.uint8:
        raise ValueError(f"out must be ({count}, {size}, {size}, 3) uint8, got {images.shape} {images.dtype}")
    labels = np.empty(count, np.int64)
    jobs = [(seed, a, min(a + chunk, first + count), size) for a in range(first, first + count, chunk)]
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        done = pool.map(_make_range, jobs) if pool is not None else map(_make_range, jobs)
        for (_, a, b, _), (part_images, part_labels) in zip(jobs, done):
            images[a - first : b - first] = part_images
            labels[a - first : b - first] = part_labels
    finally:
        if pool is not None:
            pool.shutdown()
    return images, labels
