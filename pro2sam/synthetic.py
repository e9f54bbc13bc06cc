"""A synthetic WSOL world: procedurally generated scenes in which the whole method runs offline.

Official SAM and DeiT weights and CUB / ImageNet cannot be downloaded everywhere; these scenes
stand in for them. Each image holds one **target object**: a large class-agnostic *body* (blob,
ellipse or star-shaped polygon of random scale, aspect, orientation, position and texture) with a
small class-specific *part* attached to its outline (like a bird's head). Only the part decides
the class: its colour (red or blue) and its kind (:data:`PART_KINDS`), a shape with its own fine
pattern in its own accent colour (a solid disc, a triangle with white stripes, a square with a
black checker, a star with yellow rings, a cross with green dots), as a bird's head differs in
outline and in plumage. So a classifier trained on image-level labels finds the part first,
which is the situation WSOL methods are built for. (Generator version 1 had plain parts told
apart by shape alone, 20-38 px at 224, and version 2 added a dark-shade pattern: a 16 px patch
ViT trained for 30 CPU minutes learned their colour, and whether they were patterned, but not
their shape or which pattern; version 3 gives each kind a colour cue a patch embedding sees.) Backgrounds are textured and cluttered, and 0-3
**distractors** (bodies of the same distribution without a part) compete with the target.

Colour is what separates class evidence from everything else: parts are saturated red or blue,
while bodies, distractors and background clutter are drawn with low saturation
(:data:`MAX_CLUTTER_SATURATION`).

Two **regimes** (:data:`REGIMES`, METHOD.md §5). ``"part"`` (the default, described above) is
the extreme of part domination: the part is the only class evidence, so a classifier's map
lights the part. In ``"object"`` the class evidence covers the object, as plumage covers a
bird: the body takes the class's colour (saturated red or blue) and the class kind's pattern and
accent colour at a coarser period, and the part stays on it. Each target sits on or in a larger
**support** (:data:`SUPPORT_KINDS`: a branch across it, a table under it, a pool of water it sits
in), dull and textured like the clutter, touching and partly surrounding the object, drawn
before it: part of the image, not of the object's mask or box (:attr:`SyntheticScene.support_mask`).
So SAM has an object-plus-support container to segment, as on photographs. The part regime's
scenes are unchanged by the second regime (same seed, same bytes).

Every scene is determined by ``(seed, stream, index)`` (:func:`make_scene`); labels cycle through
the classes in shuffled blocks, so any prefix of a split is close to balanced. The streams
``train``/``val``/``test`` make the data set written by :func:`write_wsol_dataset`; ``sam`` is
the disjoint stream SAM-tiny is trained on (:mod:`pro2sam.train.sam`), so that, as SAM never
saw CUB, SAM-tiny never sees an image of the data set.

Frames and conventions: images are (H, W, 3) uint8 RGB; masks are (H, W) bool in the same frame;
``box_xyxy`` is ``(x0, y0, x1, y1)`` in inclusive pixel indices (``x1`` is the last object
column), the tight box of ``object_mask``.
"""

from __future__ import annotations

import colorsys
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

__all__ = [
    "PART_SHAPES",
    "PART_COLOURS",
    "PART_KINDS",
    "PART_PATTERN_KINDS",
    "ACCENT_COLOURS",
    "SYNTHETIC_CLASSES",
    "STREAMS",
    "DEFAULT_SIZE_RANGE",
    "REGIMES",
    "SUPPORT_KINDS",
    "SyntheticScene",
    "SyntheticDataset",
    "generate_scene",
    "part_pattern",
    "two_tone",
    "make_scene",
    "scene_label",
    "write_wsol_dataset",
]

# 2: GT boxes one past the last pixel; 3: class parts carry a pattern in an accent colour as well
# as a shape; 4: both.
GENERATOR_VERSION = 4

# Class = (part colour, part kind); the class index is colour-major over these two tuples. Each
# kind has its own shape, its own fine pattern and the pattern's own accent colour (PART_KINDS).
PART_SHAPES = ("disc", "triangle", "square", "star", "cross")
# Fine patterns a class part can carry (pro2sam.synthetic_pretrain uses them all); period in px.
PART_PATTERN_KINDS = ("solid", "stripes", "checker", "rings", "dots", "grid", "zigzag")
PART_PATTERN_PERIOD_PX = (5.0, 7.0)
# Second colours of patterned parts (RGB); the part's own colour is the first.
ACCENT_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 232), "black": (22, 22, 28), "yellow": (238, 212, 40), "green": (40, 190, 70),
}  # fmt: skip
# kind (its shape) -> (pattern, accent colour or None)
PART_KINDS: dict[str, tuple[str, str | None]] = {
    "disc": ("solid", None), "triangle": ("stripes", "white"), "square": ("checker", "black"),
    "star": ("rings", "yellow"), "cross": ("dots", "green"),
}  # fmt: skip
PART_COLOURS: dict[str, tuple[int, int, int]] = {"red": (225, 40, 35), "blue": (35, 85, 235)}
SYNTHETIC_CLASSES: tuple[str, ...] = tuple(f"{c}_{s}" for c in PART_COLOURS for s in PART_SHAPES)

# Scene streams: data-set splits and SAM-tiny's own training scenes (never in the data set).
STREAMS = {"train": 0, "val": 1, "test": 2, "sam": 3}
_LABEL_KEY = 7  # seeds the per-block label permutations, apart from the scene seeds

DEFAULT_SIZE_RANGE = (160, 256)  # (smallest, largest) image side in pixels

# Everything but the class part stays at or below this HSV saturation (0..1).
MAX_CLUTTER_SATURATION = 0.4
# Body area as a fraction of the image, part area as a fraction of the body, distractor area
# as a fraction of the image. Part / object area stays near or below 0.1 (rasterising small
# shapes adds a few percent).
BODY_AREA_FRACTION = (0.12, 0.35)
PART_AREA_FRACTION = (0.06, 0.10)
DISTRACTOR_AREA_FRACTION = (0.03, 0.15)
MAX_DISTRACTORS = 3
# Smallest RGB distance between an object's base colour and the background's mean colour.
MIN_OBJECT_CONTRAST = 60.0

# Where the class evidence lies: on the part alone, or over the whole object (module docstring).
REGIMES = ("part", "object")
# Object regime: what the target sits on or in.
SUPPORT_KINDS = ("branch", "table", "water")
# Object regime: the body's class pattern is coarser than the part's (px), so both read at 16 px.
BODY_PATTERN_PERIOD_PX = (8.0, 12.0)
# Object regime: the body's colour is the class colour mixed with grey by this share (kept
# above MAX_CLUTTER_SATURATION, so no support, distractor or clutter carries class colour).
BODY_CLASS_COLOUR_SHARE = (0.65, 0.95)
# Keys the object regime's scene seeds apart from the part regime's (same seed, other scenes).
_REGIME_KEY = {"object": 11}


@dataclass(frozen=True)
class SyntheticScene:
    """One generated image and its ground truth.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        label: class index into :data:`SYNTHETIC_CLASSES`.
        box_xyxy: tight box of ``object_mask``, inclusive pixel indices ``(x0, y0, x1, y1)``.
        object_mask: (H, W) bool, the whole target object (body and part).
        part_mask: (H, W) bool, the class part (a subset of ``object_mask``).
        distractor_masks: (K, H, W) bool, K = 0..3, one per distractor; disjoint from the target.
        support_mask: (H, W) bool, the visible support the target sits on or in (object regime;
            all False in the part regime); disjoint from ``object_mask``. None only for scenes
            built by hand.
    """

    image: np.ndarray
    label: int
    box_xyxy: tuple[int, int, int, int]
    object_mask: np.ndarray
    part_mask: np.ndarray
    distractor_masks: np.ndarray
    support_mask: np.ndarray | None = None

    @property
    def class_name(self) -> str:
        return SYNTHETIC_CLASSES[self.label]

    @property
    def body_mask(self) -> np.ndarray:
        """(H, W) bool, the object without its part."""
        return self.object_mask & ~self.part_mask

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.image.shape[1], self.image.shape[0]


# ---------------------------------------------------------------- shapes


def _unit_part_polygon(shape: str) -> np.ndarray:
    """(N, 2) vertices of a part shape of circumradius 1 around the origin."""
    if shape == "disc":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "triangle":
        t = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "square":
        t = np.pi / 4 + np.arange(4) * np.pi / 2
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "star":
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if shape == "cross":
        a, b = 0.33, 1.0 / np.sqrt(1 + 0.33**2)  # arm half-width and half-length (corners on the unit circle)
        quarter = np.array([[a, b], [a, a], [b, a]])
        out = []
        for k in range(4):  # the quarter outline runs clockwise, so turn it clockwise
            c, s = np.cos(-k * np.pi / 2), np.sin(-k * np.pi / 2)
            out.append(quarter @ np.array([[c, s], [-s, c]]))
        return np.concatenate(out)
    raise ValueError(f"unknown part shape {shape!r}")


def _unit_body_polygon(rng: np.random.Generator) -> np.ndarray:
    """(N, 2) vertices of a random star-convex body around the origin, radius about 1."""
    kind = rng.choice(("ellipse", "blob", "polygon"))
    if kind == "polygon":
        n = int(rng.integers(5, 10))
        # jittered even angles: every gap stays under pi, so the origin stays inside
        t = (np.arange(n) + rng.uniform(-0.35, 0.35, n)) * 2 * np.pi / n
        r = rng.uniform(0.7, 1.0, n)
    else:
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        r = np.ones_like(t)
        if kind == "blob":
            for k in (2, 3, 4):
                r = r + rng.uniform(0, 0.14) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _transform(points: np.ndarray, scale: float, aspect: float, angle: float, centre: Sequence[float]) -> np.ndarray:
    xy = points * np.array([scale * np.sqrt(aspect), scale / np.sqrt(aspect)])
    c, s = np.cos(angle), np.sin(angle)
    return xy @ np.array([[c, s], [-s, c]]) + np.asarray(centre, dtype=np.float64)


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _rasterize(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool mask of a polygon given in pixel coordinates (pixel centres at integers)."""
    w, h = size
    mask = np.zeros((h, w), dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(points * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def _boundary_distance(mask: np.ndarray, centre: np.ndarray, direction: np.ndarray) -> float:
    """Distance from ``centre`` to the last mask pixel along ``direction`` (star-convex masks)."""
    h, w = mask.shape
    t = np.arange(0.0, float(np.hypot(h, w)), 0.5)
    x = np.round(centre[0] + t * direction[0]).astype(int)
    y = np.round(centre[1] + t * direction[1]).astype(int)
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    hit = np.zeros_like(t, dtype=bool)
    hit[inside] = mask[y[inside], x[inside]]
    return float(t[np.nonzero(hit)[0].max()]) if hit.any() else 0.0


# ---------------------------------------------------------------- colour and texture


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255


def _dull_colour(rng: np.random.Generator, v_range=(0.15, 0.95)) -> np.ndarray:
    return _rgb(rng.uniform(), rng.uniform(0, MAX_CLUTTER_SATURATION), rng.uniform(*v_range))


def _shift_value(rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
    """A second colour of a texture: same hue family, different brightness, still dull."""
    h, s, v = colorsys.rgb_to_hsv(*(colour / 255))
    v2 = np.clip(v + rng.choice((-1, 1)) * rng.uniform(0.15, 0.4), 0.05, 1.0)
    return _rgb((h + rng.uniform(-0.05, 0.05)) % 1, min(s * rng.uniform(0.5, 1.2), MAX_CLUTTER_SATURATION), v2)


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int], cells: int) -> np.ndarray:
    """(H, W) float32 in about [0, 1]: bicubic upsampling of a cells x cells random grid."""
    w, h = size
    grid = rng.random((cells, cells)).astype(np.float32)
    return np.clip(cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC), 0, 1)


# The texture patterns of bodies, distractors and backgrounds (:func:`_pattern`).
PATTERNS = ("stripes", "spots", "noise", "checker")


def _pattern(rng: np.random.Generator, size: tuple[int, int], kind: str | None = None) -> np.ndarray:
    """(H, W) float32 weight map in [0, 1]: stripes, spots, smooth noise or a checkerboard
    (``kind``, one of :data:`PATTERNS`; None draws one)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind is None:
        kind = rng.choice(PATTERNS)
    elif kind not in PATTERNS:
        raise ValueError(f"unknown pattern {kind!r}; choose from {PATTERNS}")
    if kind == "stripes":
        a = rng.uniform(0, np.pi)
        wave = np.sin(rng.uniform(0.15, 0.6) * (xx * np.cos(a) + yy * np.sin(a)) + rng.uniform(0, 2 * np.pi))
        return (0.5 + 0.5 * wave) if rng.random() < 0.5 else (wave > 0).astype(np.float32)
    if kind == "spots":
        spots = (_smooth_noise(rng, size, int(rng.integers(6, 16))) > rng.uniform(0.55, 0.7)).astype(np.float32)
        return cv2.GaussianBlur(spots, (0, 0), 0.8)
    if kind == "noise":
        return _smooth_noise(rng, size, int(rng.integers(4, 12)))
    step = int(rng.integers(4, 12))
    return (((xx // step) + (yy // step)) % 2).astype(np.float32)


def _object_texture(rng: np.random.Generator, size: tuple[int, int], base: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 texture of a body or distractor with mean colour near ``base``."""
    second = _shift_value(rng, base)
    weight = _pattern(rng, size)[..., None] * rng.uniform(0.25, 0.8)
    shade = (_smooth_noise(rng, size, 3)[..., None] - 0.5) * rng.uniform(0, 40)
    return base * (1 - weight) + second * weight + shade


def _background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) float32 textured, cluttered background of low saturation."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    ramp = (xx * np.cos(a) + yy * np.sin(a)) / max(w, h)
    ramp = ((ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6))[..., None]
    c0, c1 = _dull_colour(rng, (0.25, 0.85)), _dull_colour(rng, (0.25, 0.85))
    image = c0 * (1 - ramp) + c1 * ramp
    image = image + (_smooth_noise(rng, size, int(rng.integers(3, 7)))[..., None] - 0.5) * rng.uniform(20, 60)
    image = image + (_pattern(rng, size)[..., None] - 0.5) * rng.uniform(5, 35)
    side = min(w, h)
    for _ in range(int(rng.integers(8, 26))):  # small strokes and blobs: clutter, not objects
        colour = tuple(float(c) for c in _dull_colour(rng))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.random() < 0.5:
            length, angle = rng.uniform(0.05, 0.25) * side, rng.uniform(0, 2 * np.pi)
            end = (int(x + length * np.cos(angle)), int(y + length * np.sin(angle)))
            cv2.line(image, (x, y), end, colour, int(rng.integers(1, 4)), cv2.LINE_AA)
        else:
            axes = (max(1, int(rng.uniform(0.015, 0.05) * side)), max(1, int(rng.uniform(0.015, 0.05) * side)))
            cv2.ellipse(image, (x, y), axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
    return image


def _contrasting_colour(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
    for _ in range(50):
        colour = _dull_colour(rng)
        if np.linalg.norm(colour - background_mean) >= MIN_OBJECT_CONTRAST:
            return colour
    return np.where(background_mean > 127, 25.0, 230.0).astype(np.float32)  # dark on light, light on dark


# ---------------------------------------------------------------- class-part patterns


def part_pattern(
    rng: np.random.Generator,
    kind: str,
    size: tuple[int, int],
    centre: Sequence[float],
    period_px: tuple[float, float] = PART_PATTERN_PERIOD_PX,
) -> np.ndarray:
    """(H, W) float32 in [0, 1], where a class part takes its second tone (1) or its base tone (0).

    A fine, high-contrast pattern of period ``period_px`` (drawn uniformly from the range) at a
    random orientation and phase: small enough to show two or more periods inside a 16 px patch,
    so a ViT's patch embedding sees it locally. ``rings`` are centred on ``centre`` (x, y).

    Args:
        kind: one of :data:`PART_PATTERN_KINDS` (``solid``: no pattern).
    """
    if kind not in PART_PATTERN_KINDS:
        raise ValueError(f"unknown part pattern {kind!r}; choose from {PART_PATTERN_KINDS}")
    w, h = size
    if kind == "solid":
        return np.zeros((h, w), np.float32)
    period = rng.uniform(*period_px)
    angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 1, 2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase[0]
    v = (-xx * np.sin(angle) + yy * np.cos(angle)) / period + phase[1]
    if kind == "stripes":
        out = (u % 1) < 0.5
    elif kind == "checker":
        out = (np.floor(u) + np.floor(v)) % 2 == 0
    elif kind == "dots":
        out = ((u % 1) - 0.5) ** 2 + ((v % 1) - 0.5) ** 2 < 0.36**2
    elif kind == "rings":
        out = (np.hypot(xx - centre[0], yy - centre[1]) / period + phase[0]) % 1 < 0.5
    elif kind == "grid":
        out = ((u % 1) < 0.3) | ((v % 1) < 0.3)
    else:  # zigzag: stripes along a triangle wave
        out = ((u + 0.5 * np.abs((v % 1) - 0.5)) % 1) < 0.5
    return out.astype(np.float32)


def two_tone(
    rng: np.random.Generator, colour: np.ndarray, pattern: np.ndarray, second: np.ndarray | None = None
) -> np.ndarray:
    """(H, W, 3) float32: ``colour`` where ``pattern`` is 0, ``second`` (RGB, jittered a little)
    where it is 1; without ``second``, a darker shade of the same hue and saturation."""
    if second is None:
        second = colour * rng.uniform(0.35, 0.5)
    else:
        second = np.asarray(second, np.float32) * rng.uniform(0.9, 1.05) + rng.uniform(-8, 8, 3)
    return colour * (1 - pattern[..., None]) + second * pattern[..., None]


# ---------------------------------------------------------------- scenes


def _place_body(
    rng: np.random.Generator, size: tuple[int, int], area: float, margin: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """(polygon in pixels, centre) of a random body of ``area`` px^2 fully inside the image with
    ``margin`` px to spare, or None if it does not fit."""
    w, h = size
    unit = _unit_body_polygon(rng)
    aspect, angle = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0)))), rng.uniform(0, 2 * np.pi)
    shaped = _transform(unit, 1.0, aspect, angle, (0.0, 0.0))
    scale = np.sqrt(area / _polygon_area(shaped))
    shaped = shaped * scale
    lo, hi = shaped.min(0), shaped.max(0)
    x_range = (margin - lo[0], w - 1 - margin - hi[0])
    y_range = (margin - lo[1], h - 1 - margin - hi[1])
    if x_range[0] > x_range[1] or y_range[0] > y_range[1]:
        return None
    centre = np.array([rng.uniform(*x_range), rng.uniform(*y_range)])
    return shaped + centre, centre


def generate_scene(
    rng: np.random.Generator,
    *,
    label: int | None = None,
    size: tuple[int, int] | None = None,
    size_range: tuple[int, int] = DEFAULT_SIZE_RANGE,
    num_classes: int = len(SYNTHETIC_CLASSES),
    regime: str = "part",
) -> SyntheticScene:
    """Draw one scene from ``rng``.

    Args:
        rng: the only source of randomness (same state, same scene).
        label: class index; None draws one uniformly from the first ``num_classes`` classes.
        size: (W, H) of the image; None draws each side from ``size_range``.
        size_range: (smallest, largest) side in pixels, inclusive.
        num_classes: how many of :data:`SYNTHETIC_CLASSES` are in play (the first N).
        regime: one of :data:`REGIMES`: class evidence on the part alone (``"part"``) or over
            the whole object, which sits on a support (``"object"``).
    """
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose from {REGIMES}")
    if not 1 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise ValueError(f"num_classes must be 1..{len(SYNTHETIC_CLASSES)}, got {num_classes}")
    if label is None:
        label = int(rng.integers(num_classes))
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} out of range 0..{num_classes - 1}")
    if size is None:
        lo, hi = size_range
        size = (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)))
    w, h = size
    colour_name, shape = SYNTHETIC_CLASSES[label].split("_", 1)

    image = _background(rng, size)
    background_mean = image.reshape(-1, 3).mean(0)

    # target body, sized so that its part fits around it anywhere
    part_fraction = rng.uniform(*PART_AREA_FRACTION)
    unit_part = _unit_part_polygon(shape)
    for attempt in range(20):
        body_area = rng.uniform(*BODY_AREA_FRACTION) * w * h * (0.85**attempt)
        part_radius = np.sqrt(part_fraction * body_area / _polygon_area(unit_part))
        placed = _place_body(rng, size, body_area, margin=1.4 * part_radius + 1)
        if placed is not None:
            break
    else:  # pragma: no cover - the shrinking above always ends in a fit
        raise RuntimeError("could not place the target object")
    body_polygon, centre = placed
    body_mask = _rasterize(body_polygon, size)

    # the part: centred just beyond (or on) the body's outline, in a random direction
    theta = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.cos(theta), np.sin(theta)])
    reach = _boundary_distance(body_mask, centre, direction) + rng.uniform(-0.2, 0.3) * part_radius
    part_polygon = _transform(unit_part, part_radius, 1.0, rng.uniform(0, 2 * np.pi), centre + reach * direction)
    part_mask = _rasterize(part_polygon, size)
    object_mask = body_mask | part_mask

    support_mask = np.zeros((h, w), dtype=bool)
    if regime == "object":  # drawn first, so the object covers it where they meet
        support_mask = _support_mask(rng, size, object_mask) & ~object_mask
        support = _object_texture(rng, size, _contrasting_colour(rng, background_mean))
        image[support_mask] = support[support_mask]

    # distractors: bodies without a part, clear of the target (and its support) and of each other
    taken = cv2.dilate((object_mask | support_mask).astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    distractors = []
    for _ in range(int(rng.integers(0, MAX_DISTRACTORS + 1))):
        for _ in range(20):
            placed_d = _place_body(rng, size, rng.uniform(*DISTRACTOR_AREA_FRACTION) * w * h, margin=1)
            if placed_d is None:
                continue
            mask = _rasterize(placed_d[0], size)
            if mask.any() and not (mask & taken).any():
                distractors.append(mask)
                taken |= cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
                break

    for mask in [body_mask, *distractors] if regime == "part" else distractors:
        texture = _object_texture(rng, size, _contrasting_colour(rng, background_mean))
        image[mask] = texture[mask]
    if regime == "object":
        body = _class_body_texture(rng, size, colour_name, shape, centre)
        image[body_mask] = body[body_mask]
    part_colour = np.array(PART_COLOURS[colour_name], np.float32) * rng.uniform(0.85, 1.05)
    part_colour = part_colour + rng.uniform(-10, 10, 3)
    pattern, accent = PART_KINDS[shape]
    pattern_map = part_pattern(rng, pattern, size, part_polygon.mean(0))
    part_texture = two_tone(rng, part_colour, pattern_map, ACCENT_COLOURS[accent] if accent else None)
    part_texture = part_texture + (_smooth_noise(rng, size, 4)[..., None] - 0.5) * 30
    image[part_mask] = part_texture[part_mask]

    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 0.9))  # soft edges, as a camera gives
    image = image + rng.normal(0, rng.uniform(1, 5), image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)

    ys, xs = np.nonzero(object_mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    return SyntheticScene(
        image=image,
        label=int(label),
        box_xyxy=box,
        object_mask=object_mask,
        part_mask=part_mask,
        distractor_masks=np.stack(distractors) if distractors else np.zeros((0, h, w), dtype=bool),
        support_mask=support_mask,
    )


def _class_body_texture(
    rng: np.random.Generator, size: tuple[int, int], colour_name: str, kind: str, centre: Sequence[float]
) -> np.ndarray:
    """(H, W, 3) float32: an object-regime body, the class's colour with the class kind's pattern
    and accent (:data:`PART_KINDS`) at :data:`BODY_PATTERN_PERIOD_PX`, softly shaded."""
    grey = np.full(3, rng.uniform(60, 160), np.float32)
    share = rng.uniform(*BODY_CLASS_COLOUR_SHARE)
    base = np.array(PART_COLOURS[colour_name], np.float32) * rng.uniform(0.7, 1.05)
    base = share * base + (1 - share) * grey + rng.uniform(-10, 10, 3)
    pattern, accent = PART_KINDS[kind]
    pattern_map = part_pattern(rng, pattern, size, centre, period_px=BODY_PATTERN_PERIOD_PX)
    texture = two_tone(rng, base, pattern_map, ACCENT_COLOURS[accent] if accent else None)
    return texture + (_smooth_noise(rng, size, 4)[..., None] - 0.5) * rng.uniform(10, 40)


def _support_mask(rng: np.random.Generator, size: tuple[int, int], object_mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: a support (:data:`SUPPORT_KINDS`) touching ``object_mask`` and reaching well
    beyond it, below its centre in the image (what it sits on or in). May overlap the object."""
    w, h = size
    ys, xs = np.nonzero(object_mask)
    x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    mask = np.zeros((h, w), np.uint8)
    kind = rng.choice(SUPPORT_KINDS)
    if kind == "branch":  # a thick bar across the image through the object's lower half
        angle = rng.uniform(-0.45, 0.45)
        cy = y0 + bh * rng.uniform(0.55, 0.9)
        cx = x0 + bw * rng.uniform(0.3, 0.7)
        thickness = max(3, int(min(bw, bh) * rng.uniform(0.25, 0.45)))
        reach = 2.0 * max(w, h)
        dx, dy = np.cos(angle) * reach, np.sin(angle) * reach
        length = rng.uniform(0.8, 1.6) * bw  # one end may stop inside the image: a branch, not a border
        side = rng.choice((-1.0, 1.0))
        p0 = (cx - side * dx, cy - side * dy)
        p1 = (cx + side * np.cos(angle) * length, cy + side * np.sin(angle) * length)
        cv2.line(mask, (int(p0[0]), int(p0[1])), (int(p1[0]), int(p1[1])), 1, thickness, cv2.LINE_8)
    elif kind == "table":  # a top seen in perspective: the object stands on its back edge
        top = y1 - bh * rng.uniform(0.15, 0.4)
        bottom = min(h - 1.0, y1 + bh * rng.uniform(0.4, 1.0))
        left, right = x0 - bw * rng.uniform(0.3, 0.9), x1 + bw * rng.uniform(0.3, 0.9)
        spread = bw * rng.uniform(0.0, 0.3)
        quad = np.array([[left, top], [right, top], [right + spread, bottom], [left - spread, bottom]])
        cv2.fillPoly(mask, [np.round(quad).astype(np.int32)], 1)
    else:  # water: a pool the object sits in, around its lower half
        centre = (x0 + bw * rng.uniform(0.35, 0.65), y0 + bh * rng.uniform(0.7, 1.0))
        axes = (bw * rng.uniform(0.75, 1.2), bh * rng.uniform(0.45, 0.75))
        ellipse = _transform(_unit_body_polygon(rng), 1.0, 1.0, rng.uniform(-0.2, 0.2), (0.0, 0.0))
        ellipse = ellipse * np.array(axes) + np.array(centre)
        cv2.fillPoly(mask, [np.round(ellipse).astype(np.int32)], 1)
    return mask.astype(bool)


def scene_label(seed: int, stream: str, index: int, num_classes: int = len(SYNTHETIC_CLASSES)) -> int:
    """Class of scene ``index`` of a stream: every block of ``num_classes`` consecutive scenes holds
    each class once, in a shuffled order."""
    block, offset = divmod(index, num_classes)
    order = np.random.default_rng([seed, STREAMS[stream], _LABEL_KEY, block]).permutation(num_classes)
    return int(order[offset])


def make_scene(
    seed: int,
    stream: str,
    index: int,
    *,
    size_range: tuple[int, int] = DEFAULT_SIZE_RANGE,
    num_classes: int = len(SYNTHETIC_CLASSES),
    regime: str = "part",
) -> SyntheticScene:
    """Scene ``index`` of ``stream`` (a key of :data:`STREAMS`) for ``seed`` in ``regime`` (one of
    :data:`REGIMES`); the same arguments always give the same scene, on any machine with the same
    numpy and OpenCV. Both regimes share the labels of a seed; their scenes are drawn apart."""
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; choose from {sorted(STREAMS)}")
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose from {REGIMES}")
    key = [seed, STREAMS[stream], index] + ([_REGIME_KEY[regime]] if regime in _REGIME_KEY else [])
    rng = np.random.default_rng(key)
    label = scene_label(seed, stream, index, num_classes)
    return generate_scene(rng, label=label, size_range=size_range, num_classes=num_classes, regime=regime)


# ---------------------------------------------------------------- the data set on disk


@dataclass(frozen=True)
class SyntheticDataset:
    """Where :func:`write_wsol_dataset` put a data set.

    ``root`` is both the wsolevaluation metadata root (``root/<split>/*.txt``,
    ``root/class_names.txt``) and the data root (``root/images/<split>/``,
    ``root/masks/<split>/``).
    """

    root: Path
    counts: dict[str, int]

    def spec(self, split: str) -> str:
        """The :func:`pro2sam.datasets.open_dataset` spec of a split."""
        return f"wsol:{self.root}:{self.root}:{split}"


def write_wsol_dataset(
    root: str | Path,
    *,
    num_train: int,
    num_val: int,
    num_test: int,
    image_size: tuple[int, int] = DEFAULT_SIZE_RANGE,
    seed: int = 0,
    num_classes: int = len(SYNTHETIC_CLASSES),
    jpeg_quality: int = 95,
    command: str | None = None,
    regime: str = "part",
) -> SyntheticDataset:
    """Generate the splits and write them in ``clovaai/wsolevaluation``'s metadata layout.

    Layout under ``root`` (read unchanged by :func:`pro2sam.datasets.read_wsol_metadata` with
    ``metadata_root = data_root = root``; see :meth:`SyntheticDataset.spec`)::

        class_names.txt                   one class name per line, index order
        synthetic.json                    generator version, seed, counts, sizes, command
        <split>/image_ids.txt             images/<split>/000000.jpg ...
        <split>/class_labels.txt          path,label (0-based)
        <split>/image_sizes.txt           path,width,height
        <split>/localization.txt          val/test only: path,x0,y0,x1,y1 (x1, y1 one past the
                                          last object pixel, as CUB's x + w and wsolevaluation)
                                          and path,masks/<split>/000000.png, (the OpenImages
                                          form, no ignore mask)
        images/<split>/NNNNNN.jpg         RGB, JPEG
        masks/<split>/NNNNNN.png          val/test: 8-bit grey, 255 = object, 0 = rest

    ``train`` has image-level labels only (no ``localization.txt``), as WSOL training allows.

    Args:
        image_size: (smallest, largest) side in pixels; W and H are drawn independently per
            image. ``(s, s)`` gives s x s images.
        seed: with the split and index, determines every scene (:func:`make_scene`).
        num_classes: use the first N of :data:`SYNTHETIC_CLASSES`.
        regime: one of :data:`REGIMES` (recorded in ``synthetic.json``); the ground truth is the
            object's in both (never the support's).
        command: recorded in ``synthetic.json`` (default: this process's command line).
    """
    root = Path(root)
    counts = {"train": num_train, "val": num_val, "test": num_test}
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"split sizes must be >= 0, got {counts}")
    lo, hi = image_size
    if not 32 <= lo <= hi:
        raise ValueError(f"image_size must be (smallest, largest) with 32 <= smallest <= largest, got {image_size}")
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose from {REGIMES}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "class_names.txt").write_text("".join(f"{n}\n" for n in SYNTHETIC_CLASSES[:num_classes]))
    for split, count in counts.items():
        _write_split(
            root, split, count, seed=seed, size_range=(lo, hi), num_classes=num_classes, quality=jpeg_quality,
            regime=regime,
        )  # fmt: skip
    info = {
        "generator": "pro2sam.synthetic",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "regime": regime,
        "counts": counts,
        "image_size": [lo, hi],
        "class_names": list(SYNTHETIC_CLASSES[:num_classes]),
        "box_convention": "x0,y0,x1,y1 with x1,y1 one past the last object pixel (wsolevaluation's)",
        "command": command if command is not None else shlex.join(sys.argv),
    }
    (root / "synthetic.json").write_text(json.dumps(info, indent=2) + "\n")
    return SyntheticDataset(root=root, counts=counts)


def _write_split(
    root: Path,
    split: str,
    count: int,
    *,
    seed: int,
    size_range: tuple[int, int],
    num_classes: int,
    quality: int,
    regime: str,
) -> None:
    with_localization = split != "train"
    (root / split).mkdir(exist_ok=True)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    if with_localization:
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
    ids, labels, sizes, localization = [], [], [], []
    for i in range(count):
        scene = make_scene(seed, split, i, size_range=size_range, num_classes=num_classes, regime=regime)
        path = f"images/{split}/{i:06d}.jpg"
        Image.fromarray(scene.image).save(root / path, quality=quality)
        w, h = scene.size
        ids.append(f"{path}\n")
        labels.append(f"{path},{scene.label}\n")
        sizes.append(f"{path},{w},{h}\n")
        if with_localization:
            mask_path = f"masks/{split}/{i:06d}.png"
            Image.fromarray(scene.object_mask.astype(np.uint8) * 255).save(root / mask_path)
            x0, y0, x1, y1 = scene.box_xyxy  # inclusive; written in the evaluation's convention
            localization.append(f"{path},{x0},{y0},{x1 + 1},{y1 + 1}\n")
            localization.append(f"{path},{mask_path},\n")
    folder = root / split
    (folder / "image_ids.txt").write_text("".join(ids))
    (folder / "class_labels.txt").write_text("".join(labels))
    (folder / "image_sizes.txt").write_text("".join(sizes))
    if with_localization:
        (folder / "localization.txt").write_text("".join(localization))
    elif (folder / "localization.txt").exists():  # a rerun over an older layout
        (folder / "localization.txt").unlink()
