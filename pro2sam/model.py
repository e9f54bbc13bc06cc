"""Pro2SAM end to end: GTFormer coarse map -> grid-prompted SAM candidates -> mask matching.

This is the library's one way in for inference; it knows nothing of Ray or storage.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .candidates import CandidateConfig, Candidates, GridCandidateGenerator
from .checkpoints import OFFICIAL_SAM_CHECKPOINTS
from .gtformer import DEFAULT_SETTINGS, GTFormerSettings, load_gtformer
from .images import to_rgb_array
from .matching import MatchConfig, absorb_lit_parts, boxed_mask, coarse_fallback, match_at_full_resolution, match_masks
from .sam import DEFAULT_SAM_VARIANT, build_sam
from .storage import sha256_file

__all__ = ["Pro2SAM", "Pro2SAMResult", "ImageShapeError"]


class ImageShapeError(ValueError):
    """An image SAM cannot take: resized to SAM's input, its short side is under one pixel."""


@dataclass
class Pro2SAMResult:
    """One image's localisation.

    Attributes:
        box_xyxy: (x0, y0, x1, y1) inclusive pixel indices in the original image (after EXIF
            orientation).
        mask: (H, W) bool, the chosen mask at original resolution: the chosen candidate's
            components of at least the minimum area (:func:`pro2sam.matching.boxed_mask`), so
            that ``box_xyxy`` is exactly the tight box of its pixels.
        box_source: "sam" (a SAM candidate was chosen) or "coarse_fallback" (none survived
            matching; box and mask come from the GTFormer coarse map).
        topk_classes / topk_scores: GTFormer's k most probable classes and their softmax scores.
        topk_names: class names of topk_classes when the checkpoint carries them, else None.
        match_score: similarity of the chosen mask to the coarse map (nan for the fallback).
        pred_iou / stability_score: SAM's predicted IoU and stability score of the chosen mask
            (nan for the fallback).
        coarse_map: (h, w) float32 GTFormer coarse foreground map M_b in (0, 1), whole image
            (14x14 for 224 input).
        num_candidates: SAM candidates left after filtering, before matching.
        label: the image-level label given with the image, if any (carried, not used).
    """

    box_xyxy: tuple[int, int, int, int]
    mask: np.ndarray
    box_source: str
    topk_classes: list[int]
    topk_scores: list[float]
    topk_names: list[str] | None
    match_score: float
    pred_iou: float
    stability_score: float
    coarse_map: np.ndarray
    num_candidates: int
    label: Any = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the original image."""
        return self.mask.shape


def _sam_weights_id(variant: str, checkpoint: str | os.PathLike | None, verified: bool) -> str:
    """SHA-256 of the SAM weights (known without re-hashing when the official file was verified)."""
    if checkpoint is None:
        return "random-init"
    if verified and variant in OFFICIAL_SAM_CHECKPOINTS:
        return OFFICIAL_SAM_CHECKPOINTS[variant][1]
    return sha256_file(checkpoint)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Pro2SAM:
    """GTFormer and SAM held together, with the candidate and matching settings.

    Args:
        gtformer: a GTFormer (see :mod:`pro2sam.gtformer`) in eval mode.
        sam: a ``segment_anything`` Sam model or a SAM 2.1 ``SAM2Base`` (see
            :func:`pro2sam.sam.build_sam`).
        class_names: names of GTFormer's classes, index-aligned, or None.
        mean, std: GTFormer's input normalisation (RGB, on [0, 1] pixels).
        input_size: GTFormer's square input side; images are plain-resized to it (no crop).
        candidates: SAM grid and filtering settings.
        matching: mask matching settings.
        top_k: how many classes each result reports.
        device: where both models run; default CUDA if available.
        model_ids: identifiers of the loaded weights (for example checkpoint hashes), reported
            with results.
    """

    def __init__(
        self,
        gtformer: torch.nn.Module,
        sam: torch.nn.Module,
        *,
        class_names: Sequence[str] | None = None,
        mean: Sequence[float] = DEFAULT_SETTINGS.mean,
        std: Sequence[float] = DEFAULT_SETTINGS.std,
        input_size: int = DEFAULT_SETTINGS.img_size,
        candidates: CandidateConfig | None = None,
        matching: MatchConfig | None = None,
        top_k: int = 5,
        device: str | torch.device | None = None,
        model_ids: dict[str, str] | None = None,
    ):
        self.device = torch.device(device) if device is not None else _default_device()
        self.gtformer = gtformer.eval().to(self.device)
        self.sam = sam.eval().to(self.device)
        self.class_names = list(class_names) if class_names is not None else None
        self.input_size = input_size
        self.candidate_config = candidates or CandidateConfig()
        self.match_config = matching or MatchConfig()
        self.top_k = top_k
        self.model_ids = dict(model_ids or {})
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.generator = GridCandidateGenerator(self.sam, self.candidate_config)

    @classmethod
    def from_checkpoints(
        cls,
        gtformer: str | os.PathLike,
        sam: str = DEFAULT_SAM_VARIANT,
        sam_checkpoint: str | os.PathLike | None = None,
        *,
        verify: bool = True,
        device: str | torch.device | None = None,
        candidates: CandidateConfig | None = None,
        matching: MatchConfig | None = None,
        top_k: int = 5,
    ) -> Pro2SAM:
        """Load GTFormer (our exported checkpoint) and SAM (an official or tiny checkpoint).

        Args:
            gtformer: a GTFormer export: a directory with ``model.safetensors`` and
                ``config.json`` (or the ``.safetensors`` file beside its ``config.json``).
            sam: SAM variant: "vit_h", "vit_l", "vit_b", "synthetic" or "tiny".
            sam_checkpoint: the SAM weights file. Official variants are checked against the
                SHA-256 of the official release unless ``verify=False``.
            candidates: grid and filter settings; None: ``CandidateConfig``'s defaults with the
                variant's own filter thresholds and grid (:meth:`CandidateConfig.resolve`).
        """
        gt_model, gt_config = load_gtformer(gtformer)
        sam_model = build_sam(sam, sam_checkpoint, verify=verify)
        candidates = CandidateConfig.resolve(sam, candidates)
        settings = GTFormerSettings.from_config(gt_config)
        ids = {"gtformer": str(gt_config.get("sha256", "")), "sam": f"{sam}:{_sam_weights_id(sam, sam_checkpoint, verify)}"}
        return cls(
            gt_model,
            sam_model,
            class_names=gt_config.get("class_names"),
            mean=settings.mean,
            std=settings.std,
            input_size=settings.img_size,
            candidates=candidates,
            matching=matching,
            top_k=top_k,
            device=device,
            model_ids=ids,
        )

    def with_settings(self, *, candidates: CandidateConfig | None = None, matching: MatchConfig | None = None) -> Pro2SAM:
        """A Pro2SAM sharing these models with other candidate or matching settings."""
        other = object.__new__(Pro2SAM)
        other.__dict__.update(self.__dict__)
        other.candidate_config = candidates or self.candidate_config
        other.match_config = matching or self.match_config
        other.generator = GridCandidateGenerator(self.sam, other.candidate_config)
        return other

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(H, W, 3) uint8 RGB images -> (B, 3, S, S) normalised float, plain-resized to S."""
        size = (self.input_size, self.input_size)
        batch = np.stack([np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR)) for img in images])
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
        return ((x - self._mean) / self._std).to(self.device)

    @torch.inference_mode()
    def classify(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """GTFormer on a batch of RGB images.

        Returns:
            probs: (B, C) float32 class probabilities.
            coarse_maps: (B, h, w) float32 coarse foreground maps M_b in (0, 1).
        """
        out = self.gtformer(self.preprocess(images))
        probs = out.logits.float().softmax(-1)
        return probs.cpu().numpy(), out.coarse_map.float().cpu().numpy()

    def predict(
        self,
        images: Sequence[np.ndarray | Image.Image | str | os.PathLike],
        labels: Sequence[Any] | None = None,
        *,
        batch_size: int = 16,
    ) -> list[Pro2SAMResult]:
        """Localise the object of each image.

        Args:
            images: RGB arrays (H, W, 3) uint8, gray or RGBA arrays, PIL images or file paths.
            labels: optional image-level labels, one per image, carried into the results.
            batch_size: GTFormer batch size.

        Returns:
            One :class:`Pro2SAMResult` per image, in order.
        """
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"got {len(images)} images but {len(labels)} labels")
        results: list[Pro2SAMResult] = []
        for start in range(0, len(images), batch_size):
            chunk = [to_rgb_array(img) for img in images[start : start + batch_size]]
            probs, coarse_maps = self.classify(chunk)
            chunk_labels = labels[start : start + batch_size] if labels is not None else None
            results += self.localize_batch(chunk, probs, coarse_maps, labels=chunk_labels)
        return results

    def localize(self, image: np.ndarray, probs: np.ndarray, coarse_map: np.ndarray, *, label: Any = None) -> Pro2SAMResult:
        """SAM candidates and matching for one image whose GTFormer outputs are known.

        Args:
            image: (H, W, 3) uint8 RGB.
            probs: (C,) class probabilities from :meth:`classify`.
            coarse_map: (h, w) coarse map from :meth:`classify`.
        """
        self._check_shape(image)
        candidates = self.generator.generate(image, coarse_map=coarse_map)
        return self.choose(image, probs, coarse_map, candidates, label=label)

    def localize_batch(
        self,
        images: Sequence[np.ndarray],
        probs: Sequence[np.ndarray],
        coarse_maps: Sequence[np.ndarray],
        *,
        labels: Sequence[Any] | None = None,
    ) -> list[Pro2SAMResult]:
        """:meth:`localize` of several images, as a GPU likes it: SAM encodes them together
        (:meth:`GridCandidateGenerator.generate_batch`), and each image's matching and
        upsampling (CPU work) runs in a worker thread while SAM decodes the next image.

        Args:
            images: (H_i, W_i, 3) uint8 RGB images.
            probs, coarse_maps: :meth:`classify`'s outputs for them, one per image.
            labels: image-level labels carried into the results, one per image, or None.

        Raises:
            ImageShapeError: an image SAM cannot take (checked before any work); any other
                error of any image ends the batch (the labeling job then retries image by image).
        """
        if not len(images) == len(probs) == len(coarse_maps):
            raise ValueError(f"got {len(images)} images, {len(probs)} probs and {len(coarse_maps)} coarse maps")
        labels = [None] * len(images) if labels is None else labels
        for image in images:
            self._check_shape(image)
        candidates = self.generator.generate_batch(images, coarse_maps)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pro2sam-choose") as matching:
            chosen = [
                matching.submit(self.choose, image, p, coarse, found, label=label)
                for image, p, coarse, label, found in zip(images, probs, coarse_maps, labels, candidates)
            ]
            return [c.result() for c in chosen]

    def _check_shape(self, image: np.ndarray) -> None:
        h, w = image.shape[:2]
        side = self.generator.segmenter.input_size
        if self.generator.segmenter.too_elongated(h, w):
            raise ImageShapeError(
                f"image is {w}x{h}: too elongated for SAM, whose {side}-pixel input would leave its short side "
                "under one pixel"
            )

    def choose(
        self, image: np.ndarray, probs: np.ndarray, coarse_map: np.ndarray, candidates: Candidates, *, label: Any = None
    ) -> Pro2SAMResult:
        """Stage 3 for one image whose candidates are known (:meth:`localize` without stage 2):
        matching with this model's :class:`MatchConfig`, the fallback, the result. Lets one set of
        candidates be matched under several settings."""
        k = min(self.top_k, len(probs))
        top = np.argsort(-probs, kind="stable")[:k]
        names = [self.class_names[i] for i in top] if self.class_names else None
        if candidates.mode == "fast":  # decided as on full-resolution masks
            match, mask = match_at_full_resolution(
                coarse_map, candidates.masks, candidates.pred_ious, candidates.full_resolution_mask, self.match_config,
                cache=candidates.match_cache,
            )
        else:
            match = match_masks(coarse_map, candidates.masks, candidates.pred_ious, self.match_config)
            mask = candidates.masks[match.index] if match.index is not None else None
        # The mask is stored without the specks its box leaves out, so that the two agree.
        boxed = None if mask is None else boxed_mask(mask, self.match_config.min_component_area)
        if boxed is None:  # nothing survived, or the winner vanished at full resolution
            mask, box = coarse_fallback(coarse_map, image.shape[:2], self.match_config.fallback_threshold)
            source, score, pred_iou, stability = "coarse_fallback", float("nan"), float("nan"), float("nan")
        else:
            mask, box = boxed
            source, score = "sam", match.match_score
            if self.match_config.absorb_parts:  # the lit parts SAM split from the chosen mask
                kept = [int(i) for i in np.flatnonzero(match.rejected == "") if i != match.index]
                if candidates.mode == "fast" and kept:  # the decision on the full-resolution masks
                    kept = [i for i in kept if candidates.masks[i].any()]
                mask, box, _ = absorb_lit_parts(mask, box, coarse_map, candidates.full_resolution_mask, kept, self.match_config)
            pred_iou = float(candidates.pred_ious[match.index])
            stability = float(candidates.stability_scores[match.index])
        return Pro2SAMResult(
            box_xyxy=tuple(int(v) for v in box),
            mask=mask,
            box_source=source,
            topk_classes=[int(i) for i in top],
            topk_scores=[float(probs[i]) for i in top],
            topk_names=names,
            match_score=score,
            pred_iou=pred_iou,
            stability_score=stability,
            coarse_map=np.asarray(coarse_map, dtype=np.float32),
            num_candidates=len(candidates.pred_ious),
            label=label,
            timings=dict(getattr(candidates, "timings", {}) or {}),
        )
