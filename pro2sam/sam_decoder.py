"""Decoding many point prompts against one SAM image embedding.

Initial version: calls SAM's own prompt encoder and mask decoder. To be replaced by a version that
computes the work shared by every prompt of an image once (same outputs within float tolerance).
"""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam

__all__ = ["GridDecoder"]


class GridDecoder:
    """Decode batches of single-point prompts for one image.

    Args:
        sam: a Segment Anything model (any size), in eval mode.
    """

    def __init__(self, sam: Sam):
        self.sam = sam
        self._embedding: torch.Tensor | None = None

    @torch.inference_mode()
    def set_image_embedding(self, image_embedding: torch.Tensor) -> None:
        """Remember one image's embedding, (1, C, h, w) from ``sam.image_encoder``."""
        self._embedding = image_embedding

    @torch.inference_mode()
    def decode(
        self,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        *,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompts of P points each.

        Args:
            point_coords: (B, P, 2) float, (x, y) in SAM's input frame (longest side resized to
                ``sam.image_encoder.img_size``).
            point_labels: (B, P) int, 1 foreground / 0 background.
            multimask_output: three masks per prompt (True) or one.

        Returns:
            low_res_logits: (B, M, 4h, 4w) mask logits over the padded input frame, M = 3 or 1.
            iou_predictions: (B, M) SAM's predicted IoU.
        """
        if self._embedding is None:
            raise RuntimeError("call set_image_embedding() before decode()")
        sparse, dense = self.sam.prompt_encoder(points=(point_coords, point_labels), boxes=None, masks=None)
        low_res, iou = self.sam.mask_decoder(
            image_embeddings=self._embedding,
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
        return low_res, iou
