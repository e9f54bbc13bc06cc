"""Decoding many point prompts against one SAM image embedding.

SAM's mask decoder (``segment_anything.modeling.MaskDecoder``) copies the image embedding once per
prompt and then runs every image-side projection, attention output and LayerNorm on all
``N = h * w`` image tokens of every copy: ~3.6 GFLOP per prompt for the real decoder (N = 4096,
C = 256). Yet with point prompts only, the image side starts identical for every prompt, and what
the prompts add to it is small: each image->token attention adds ``A @ U`` where ``A`` (N x H*T)
are attention weights over the T prompt tokens and ``U`` (H*T x C) are per-head values pushed
through ``out_proj``. So the image tokens of a prompt stay, exactly, of the form

    keys = a * S + u + E @ Psi

with ``S`` (N, C) and ``u`` (C) shared by every prompt of the image (computed once in
``set_image_embedding``), ``a`` (N) a per-token scale (the product of the LayerNorm ``1 / std``s),
and a low-rank per-prompt part: coefficients ``E`` (N, K) on ``K = depth * (H*T + 1)`` basis
rows ``Psi`` (K, C) (H*T per image->token attention, one per LayerNorm for the then ``u``).
``keys`` is never formed. Every linear map of it is ``a * (S W) + u W + E (Psi W)`` with ``S W``
shared; attention logits and outputs are contracted with the few prompt tokens before
touching N; the LayerNorm statistics (``norm4``) follow from shared Gram terms, a block-structured
cross term and ``E (Psi Psi^T) E^T``. The first output ConvTranspose is a per-pixel linear map, so
it is applied to the same representation. What is left per prompt and per pixel is the
unavoidable non-linear tail: LayerNorm2d, GELU, the second ConvTranspose and the hypernetwork
product, computed only for the mask tokens asked for.

All of it is algebra, no approximation: outputs equal ``sam.mask_decoder``'s up to float
rounding (checked in ``tests/test_grid_decoder.py``). ``fast=False`` runs the official decoder.

SAM 2's mask decoder (``sam2.modeling.sam.mask_decoder.MaskDecoder``, image mode) is the same
two-way transformer with one more output token in front (the object score token, whose output is
not used here) and two per-pixel additions in the upscaling: the image's high-resolution
features, ``feat_s1`` after the first ConvTranspose and ``feat_s0`` after the second. Both are
shared by every prompt of the image, so they are added to the per-pixel tail as they are
(:meth:`GridDecoder.set_image_embedding` takes them with the embedding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.transformer import Attention

__all__ = ["GridDecoder"]


def _parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(prompt encoder, mask decoder) of a segment_anything ``Sam`` or a SAM 2 ``SAM2Base``."""
    if hasattr(model, "sam_mask_decoder"):
        return model.sam_prompt_encoder, model.sam_mask_decoder
    return model.prompt_encoder, model.mask_decoder


@dataclass
class _TokenToImageShared:
    """One image's share of a token->image attention: keys and values of ``a * S + u``."""

    k_src: torch.Tensor  # (N, d) S @ Wk^T
    k_const: torch.Tensor  # (N, d) (image_pe + u) @ Wk^T + bk
    v_src: torch.Tensor  # (N, d) S @ Wv^T
    v_const: torch.Tensor  # (d,)  u @ Wv^T + bv


@dataclass
class _NormShared:
    """One image's share of a ``norm4`` LayerNorm (all vectors centred over channels)."""

    src_sq: torch.Tensor  # (N,) |S_c|^2
    src_u: torch.Tensor  # (N,) S_c . u_c
    u_sq: torch.Tensor  # () |u_c|^2
    u_c: torch.Tensor  # (C,)
    cross: list[torch.Tensor]  # per basis block: (N, d) S_c @ F_c^T (attention) or (N,) S_c . c_c


@dataclass
class _LayerShared:
    token_to_image: _TokenToImageShared
    q_src: torch.Tensor  # (N, d) image->token queries: S @ Wq^T
    q_const: torch.Tensor  # (N, d) (image_pe + u) @ Wq^T + bq
    norm: _NormShared


@dataclass
class _ImageShared:
    layers: list[_LayerShared]
    final: _TokenToImageShared
    up_src: torch.Tensor  # (N, 4 * C/4) first ConvTranspose of S, per pixel, (ki, kj, c) order
    up_const: torch.Tensor  # (4 * C/4,) of u, with the bias


class GridDecoder:
    """Decode batches of point prompts for one image.

    Args:
        sam: a Segment Anything model (any size), in eval mode, or a SAM 2 ``SAM2Base`` (image
            mode). Only its prompt encoder and mask decoder are used.
        fast: compute the per-image work once and the per-prompt work in low rank (True), or call
            SAM's own prompt encoder and mask decoder (False, for comparison).
        batch_size: prompts decoded together; bounds memory (about ``batch_size *``
            :meth:`bytes_per_prompt` of activations).
        tail_cells: the per-pixel tail (the upscaling and the hypernetwork product) runs on at
            most this many embedding cells at a time (one prompt's cells, or several prompts'
            whole regions where they fit), so that its intermediates stay in a CPU's cache:
            on a CPU it is memory-bound, and on one thread 1,024 cells decode a 64x64 grid
            about twice as fast as the whole batch at once (``benchmarks/README.md``). None:
            the whole batch at once (a GPU's choice). Results do not depend on it.
        compile: run the fast per-prompt pass through ``torch.compile`` (its first calls
            compile: a cold start of seconds to minutes; batch sizes that differ from the first
            compile once more, with a dynamic batch).
    """

    def __init__(
        self, sam, *, fast: bool = True, batch_size: int = 64, tail_cells: int | None = None, compile: bool = False
    ):
        if tail_cells is not None and tail_cells < 1:
            raise ValueError(f"tail_cells must be positive or None, not {tail_cells}")
        self.sam = sam
        self.prompt_encoder, self.mask_decoder = _parts(sam)
        # SAM 2: the object score token comes first among the output tokens
        self._first = 1 if getattr(self.mask_decoder, "pred_obj_scores", False) else 0
        self._high_res_decoder = bool(getattr(self.mask_decoder, "use_high_res_features", False))
        self.fast = fast
        self.batch_size = batch_size
        self.tail_cells = tail_cells
        self._embedding: torch.Tensor | None = None
        self._high_res: list[torch.Tensor] | None = None
        self._shared: _ImageShared | None = None
        self._decode_chunk = torch.compile(self._decode_fast) if compile and fast else self._decode_fast

    @property
    def _dtype(self) -> torch.dtype:
        return self.mask_decoder.iou_token.weight.dtype

    def bytes_per_prompt(self, itemsize: int = 4) -> int:
        """Peak activation bytes one prompt adds to a batch, at ``itemsize`` bytes per value (an
        upper estimate, for choosing ``batch_size``): fast, the low-rank coefficients (2K per
        image token) and the upscaling tail (the first ConvTranspose's 4 * C/4 and the second's
        16 * C/8 values per image token, each with its LayerNorm/GELU copy); official, SAM's
        per-prompt copies of the image embedding."""
        dec = self.mask_decoder
        h, w = self.prompt_encoder.image_embedding_size
        c = dec.transformer_dim
        if not self.fast:
            return 12 * h * w * c * itemsize
        tokens = self._first + 1 + dec.num_mask_tokens + 2  # output tokens + a point and its padding point
        k = sum(layer.cross_attn_image_to_token.num_heads * tokens + 1 for layer in dec.transformer.layers)
        return h * w * (2 * k + 2 * c + 4 * c + 48) * itemsize

    @torch.inference_mode()
    def set_image_embedding(
        self, image_embedding: torch.Tensor, high_res_features: list[torch.Tensor] | None = None
    ) -> None:
        """Remember one image's embedding, (1, C, h, w) from ``sam.image_encoder``, and (fast)
        compute everything that is the same for all of its prompts.

        Args:
            image_embedding: (1, C, h, w).
            high_res_features: SAM 2 only, and needed there: ``[feat_s0, feat_s1]``, (1, C/8, 4h,
                4w) and (1, C/4, 2h, 2w), the image's high-resolution features already projected
                by the mask decoder's ``conv_s0`` / ``conv_s1`` (as ``SAM2ImagePredictor``
                keeps them).
        """
        if self._high_res_decoder != (high_res_features is not None):
            raise ValueError(
                "this mask decoder needs the image's high-resolution features" if self._high_res_decoder
                else "this mask decoder takes no high-resolution features"
            )
        self._embedding = image_embedding.to(self._dtype)
        self._high_res = None if high_res_features is None else [f.to(self._dtype) for f in high_res_features]
        self._image_pe = self.prompt_encoder.get_dense_pe().to(self._dtype)
        self._shared = self._precompute(self._embedding) if self.fast else None
        self._up_src_region = {}
        self._high_res_region = {}

    @property
    def high_res_features(self) -> list[torch.Tensor] | None:
        """The high-resolution features of :meth:`set_image_embedding` (SAM 2), else None."""
        return getattr(self, "_high_res", None)

    @property
    def image_embedding(self) -> torch.Tensor | None:
        """The embedding of :meth:`set_image_embedding`, (1, C, h, w), or None before one."""
        return getattr(self, "_embedding", None)

    @torch.inference_mode()
    def decode(
        self,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        *,
        multimask_output: bool = True,
        region: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompts of P points each.

        Args:
            point_coords: (B, P, 2) float, (x, y) in SAM's input frame (longest side resized to
                ``sam.image_encoder.img_size``).
            point_labels: (B, P) int, 1 foreground / 0 background / -1 padding.
            multimask_output: three masks per prompt (True) or one.
            region: (rows, cols): mask logits only over the top-left rows x cols cells of the
                (h, w) embedding grid (the image; the rest is SAM's padding). The upscaling is
                per embedding cell, so these logits are those of the whole grid, cropped.

        Returns:
            low_res_logits: (B, M, 4 * rows, 4 * cols) mask logits (rows, cols = h, w without a
                region) over the padded input frame, M = 3 or 1.
            iou_predictions: (B, M) SAM's predicted IoU.
        """
        logits, iou, _ = self._decode(point_coords, point_labels, multimask_output, region, None)
        return logits, iou

    @torch.inference_mode()
    def decode_masks_above(
        self,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        iou_threshold: float,
        *,
        region: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`decode` (three masks per prompt) of the prompts that have at least one mask
        whose predicted IoU is above ``iou_threshold``; the others' masks are never upscaled
        (the IoU head reads the output tokens only).

        Returns:
            low_res_logits: (B', 3, 4 * rows, 4 * cols) of the B' prompts kept.
            iou_predictions: (B', 3).
            prompt_index: (B',) int64 positions of the kept prompts in the input.
        """
        return self._decode(point_coords, point_labels, True, region, iou_threshold)

    def _decode(self, point_coords, point_labels, multimask_output, region, iou_threshold):
        if self._embedding is None:
            raise RuntimeError("call set_image_embedding() before decode()")
        h, w = self._embedding.shape[-2:]
        region = (h, w) if region is None else (min(region[0], h), min(region[1], w))
        sparse, _ = self.prompt_encoder(points=(point_coords, point_labels), boxes=None, masks=None)
        sparse = sparse.to(self._dtype)
        logits, iou, index = [], [], []
        for start in range(0, sparse.shape[0], self.batch_size):
            chunk = sparse[start : start + self.batch_size]
            if self.fast:
                out = self._decode_chunk(chunk, multimask_output, region, iou_threshold)
            else:
                out = self._decode_official(chunk, multimask_output, region, iou_threshold)
            logits.append(out[0])
            iou.append(out[1])
            index.append(out[2] + start)
        return torch.cat(logits), torch.cat(iou), torch.cat(index)

    def _decode_official(self, sparse: torch.Tensor, multimask_output: bool, region, iou_threshold):
        dec = self.mask_decoder
        dense = self.prompt_encoder.no_mask_embed.weight.to(self._dtype).reshape(1, -1, 1, 1)
        dense = dense.expand(sparse.shape[0], -1, *self._embedding.shape[-2:])
        if self._first or self._high_res_decoder:  # SAM 2's decoder, as SAM2ImagePredictor calls it
            masks, iou_pred, _, _ = dec(
                image_embeddings=self._embedding,
                image_pe=self._image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
                repeat_image=True,
                high_res_features=self._high_res,
            )
        else:
            masks, iou_pred = dec(
                image_embeddings=self._embedding,
                image_pe=self._image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
        keep = _prompts_above(iou_pred, iou_threshold)
        return masks[keep, :, : 4 * region[0], : 4 * region[1]], iou_pred[keep], keep

    # ---------------------------------------------------------------- per image (shared) work

    def _precompute(self, image_embedding: torch.Tensor) -> _ImageShared:
        """Follow the shared part ``a * S + u`` of the image tokens through the decoder, and the
        fixed basis each image->token attention adds (rows of ``out_proj``, then each LayerNorm's
        centring and scale), keeping what the per-prompt pass needs."""
        dec = self.mask_decoder
        no_mask = self.prompt_encoder.no_mask_embed.weight.to(self._dtype)
        src = (image_embedding[0] + no_mask.reshape(-1, 1, 1)).flatten(1).T  # (N, C)
        pe = self._image_pe[0].flatten(1).T  # (N, C)
        u = torch.zeros_like(src[0])
        blocks: list[torch.Tensor] = []  # per basis block: (d, C) attention rows or (C,) constant

        def token_to_image(attn: Attention) -> _TokenToImageShared:
            return _TokenToImageShared(
                k_src=src @ attn.k_proj.weight.T,
                k_const=attn.k_proj(pe + u),
                v_src=src @ attn.v_proj.weight.T,
                v_const=attn.v_proj(u),
            )

        layers = []
        for layer in dec.transformer.layers:
            t2i = token_to_image(layer.cross_attn_token_to_image)
            i2t = layer.cross_attn_image_to_token
            q_src, q_const = src @ i2t.q_proj.weight.T, i2t.q_proj(pe + u)
            blocks.append(i2t.out_proj.weight.T)
            u = u + i2t.out_proj.bias
            # norm4: statistics of the centred parts, then every part goes through (x - mean) * w
            src_c = src - src.mean(-1, keepdim=True)
            u_c = u - u.mean()
            blocks_c = [b - b.mean(-1, keepdim=True) for b in blocks]
            norm = _NormShared(
                src_sq=(src_c * src_c).sum(-1),
                src_u=src_c @ u_c,
                u_sq=u_c @ u_c,
                u_c=u_c,
                cross=[src_c @ b.mT if b.ndim == 2 else src_c @ b for b in blocks_c],
            )
            layers.append(_LayerShared(t2i, q_src, q_const, norm))
            w, bias = layer.norm4.weight, layer.norm4.bias
            src = src_c * w
            blocks = [b * w for b in blocks_c] + [u_c * w]
            u = bias
        final = token_to_image(dec.transformer.final_attn_token_to_image)
        up_w, up_b = self._upscale_1_weight()
        return _ImageShared(layers, final, src @ up_w, u @ up_w + up_b)

    def _upscale_1_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ConvTranspose2d (kernel 2, stride 2) as a per-pixel (C, 4 * C/4) matrix."""
        conv = self.mask_decoder.output_upscaling[0]
        w = conv.weight.permute(0, 2, 3, 1).flatten(1)  # (C_in, ki * kj * C_out)
        return w, conv.bias.repeat(4)

    # ---------------------------------------------------------------- per prompt work

    def _decode_fast(self, sparse: torch.Tensor, multimask_output: bool, region, iou_threshold):
        dec = self.mask_decoder
        tr = dec.transformer
        shared = self._shared
        b = sparse.shape[0]
        n = shared.up_src.shape[0]
        output_tokens = [dec.iou_token.weight, dec.mask_tokens.weight]
        if self._first:
            output_tokens.insert(0, dec.obj_score_token.weight)
        output_tokens = torch.cat(output_tokens, dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
        t = tokens.shape[1]

        # Per-prompt state of the image tokens, keys = a * S + u + coef^T @ basis. coef is stored
        # transposed, (B, K, N), in one buffer: each image->token attention appends H*T rows, each
        # LayerNorm one.
        heads = [layer.cross_attn_image_to_token.num_heads for layer in tr.layers]
        buffer = sparse.new_empty(b, sum(h * t + 1 for h in heads), n)
        k = 0
        a = None  # (B, N); None: all ones
        basis = sparse.new_empty(b, 0, sparse.shape[-1])  # (B, K, C)
        values: list[torch.Tensor | None] = []  # per basis block: (B, T, H, dh), None (constant)

        queries, query_pe = tokens, tokens
        for layer, sh in zip(tr.layers, shared.layers):
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + query_pe
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            attn_out = _token_to_image(
                layer.cross_attn_token_to_image, sh.token_to_image, queries + query_pe, a, buffer[:, :k], basis
            )
            queries = layer.norm2(queries + attn_out)
            queries = layer.norm3(queries + layer.mlp(queries))

            attn = layer.cross_attn_image_to_token
            rows = buffer[:, k : k + attn.num_heads * t]
            new_basis, v = _image_to_token(attn, sh, queries + query_pe, queries, a, buffer[:, :k], basis, out=rows)
            k += attn.num_heads * t
            basis = torch.cat([basis, new_basis], dim=1)
            values.append(v)
            a, basis = _layer_norm(layer.norm4, sh.norm, a, buffer[:, : k + 1], basis, values)
            values.append(None)
            k += 1
        coef = buffer[:, :k]

        attn_out = _token_to_image(tr.final_attn_token_to_image, shared.final, queries + query_pe, a, coef, basis)
        hs = tr.norm_final_attn(queries + attn_out)

        sel = slice(1, None) if multimask_output else slice(0, 1)
        first = self._first
        iou_pred = dec.iou_prediction_head(hs[:, first])[:, sel]
        keep = _prompts_above(iou_pred, iou_threshold)
        if len(keep) < b:  # masks only for the prompts kept
            a, coef, basis, hs, iou_pred = a[keep], coef[keep], basis[keep], hs[keep], iou_pred[keep]
        mask_ids = range(dec.num_mask_tokens)[sel]
        hyper_in = torch.stack([dec.output_hypernetworks_mlps[i](hs[:, first + 1 + i]) for i in mask_ids], dim=1)
        masks = self._upscale_and_predict(a, coef, basis, hyper_in, region)
        return masks, iou_pred, keep

    def _upscale_and_predict(self, a, coef, basis, hyper_in, region):
        """``hyper_in @ output_upscaling(keys)`` with keys in low rank, channels last, over the
        top-left ``region`` = (rows, cols) of the embedding grid (both ConvTransposes have
        kernel = stride = 2, and LayerNorm2d and GELU act per pixel, so every embedding cell
        upscales on its own).

        Returns (B, M, 4 * rows, 4 * cols)."""
        up = self.mask_decoder.output_upscaling
        h, w = self._embedding.shape[-2:]
        rows, cols = region
        b = coef.shape[0]
        if (rows, cols) != (h, w):
            a = a.view(b, h, w)[:, :rows, :cols].reshape(b, rows * cols)
            coef = coef.unflatten(-1, (h, w))[..., :rows, :cols].flatten(-2)
        n = rows * cols
        up_src = self._up_src(region)
        up_w, _ = self._upscale_1_weight()
        conv = up[3]
        second_w = conv.weight.permute(0, 2, 3, 1).flatten(1)  # (C/4, 4 * C/8)
        if self._high_res is not None:
            # SAM 2 adds feat_s1 after the first ConvTranspose and feat_s0 after the second: both
            # shared by every prompt, so folded into the constant and the bias once per region
            first_const, second_bias = self._high_res_terms(region)
        else:
            first_const, second_bias = self._shared.up_const, conv.bias.repeat(4)
        # the first ConvTranspose is per pixel linear, so it maps S, u and the basis separately
        basis_up = basis @ up_w  # (B, K, 4 * C/4)
        m = hyper_in.shape[1]
        if self.tail_cells is None or self.tail_cells >= b * n:
            masks = self._tail(a, coef, basis_up, hyper_in, up_src, first_const, second_bias, second_w)
        else:  # in pieces of at most tail_cells cells: whole prompts where they fit, else part of one
            prompts, cells = max(1, self.tail_cells // n), min(n, self.tail_cells)
            masks = None  # allocated on the first piece, in its dtype (autocast may change it)
            for p in range(0, b, prompts):
                q = slice(p, p + prompts)
                for c in range(0, n, cells):
                    px = slice(c, c + cells)
                    const = first_const if first_const.dim() == 1 else first_const[px]
                    bias = second_bias if second_bias.dim() == 1 else second_bias[4 * c : 4 * (c + cells)]
                    piece = self._tail(a[q, px], coef[q, :, px], basis_up[q], hyper_in[q], up_src[px], const, bias, second_w)
                    if masks is None:
                        masks = piece.new_empty(b, n * 16, m)
                    masks[q, 16 * c : 16 * (c + cells)] = piece
        masks = masks.view(b, rows, cols, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return masks.reshape(b, m, 4 * rows, 4 * cols)

    def _tail(self, a, coef, basis_up, hyper_in, up_src, first_const, second_bias, second_w) -> torch.Tensor:
        """The per-pixel tail over n cells of B prompts: (B, n * 16, M) logits, each cell's 16
        pixels in (sub-pixel (ki1, kj1), sub-sub-pixel (ki2, kj2)) order."""
        up = self.mask_decoder.output_upscaling
        b, n = a.shape
        c4, c8 = up[1].weight.shape[0], up[3].weight.shape[1]
        x = torch.addcmul(first_const, up_src, a.unsqueeze(-1))
        x = torch.baddbmm(x, coef.transpose(1, 2), basis_up)  # (B, n, 4 * C/4); not in place: autocast may change dtypes
        x = x.view(b, n, 4, c4)  # pixel (i, j), sub-pixel (ki1, kj1), channel
        x = up[2](F.layer_norm(x, (c4,), up[1].weight, up[1].bias, up[1].eps))
        if second_bias.dim() == 1:
            x = torch.addmm(second_bias, x.view(-1, c4), second_w)
        else:  # a bias per sub-pixel: (n * 4, 4 * C/8), the same for every prompt
            x = torch.baddbmm(second_bias, x.view(b, n * 4, c4), second_w.expand(b, -1, -1)).view(-1, second_w.shape[1])
        x = up[4](x)  # (B * n * 4, 4 * C/8): pixel, sub-pixel, sub-sub-pixel (ki2, kj2), channel
        return x.view(b, n * 16, c8) @ hyper_in.transpose(1, 2)

    def _up_src(self, region: tuple[int, int]) -> torch.Tensor:
        """The shared first-ConvTranspose term over the region's cells, (rows * cols, 4 * C/4)."""
        if region not in self._up_src_region:
            h, w = self._embedding.shape[-2:]
            up_src = self._shared.up_src
            self._up_src_region[region] = up_src.view(h, w, -1)[: region[0], : region[1]].reshape(-1, up_src.shape[-1])
        return self._up_src_region[region]


    def _high_res_terms(self, region: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM 2's high-resolution features over the region's cells in the tail's layout, with
        what every prompt adds with them: feat_s1 plus the first ConvTranspose's constant, as
        (rows * cols, 4 * C/4) (pixel, sub-pixel (ki1, kj1), channel), and feat_s0 plus the second
        ConvTranspose's bias, as (rows * cols * 4, 4 * C/8) (pixel, sub-pixel, sub-sub-pixel
        (ki2, kj2), channel)."""
        if region not in self._high_res_region:
            rows, cols = region
            feat_s0, feat_s1 = self._high_res
            s1 = feat_s1[0, :, : 2 * rows, : 2 * cols]  # (C/4, 2 rows, 2 cols): [c, 2i + ki, 2j + kj]
            s1 = s1.reshape(-1, rows, 2, cols, 2).permute(1, 3, 2, 4, 0).reshape(rows * cols, -1)
            s0 = feat_s0[0, :, : 4 * rows, : 4 * cols]  # [c, 4i + 2 ki1 + ki2, 4j + 2 kj1 + kj2]
            s0 = s0.reshape(-1, rows, 2, 2, cols, 2, 2).permute(1, 4, 2, 5, 3, 6, 0).reshape(rows * cols * 4, -1)
            bias = self.mask_decoder.output_upscaling[3].bias.repeat(4)
            self._high_res_region[region] = ((s1 + self._shared.up_const).contiguous(), (s0 + bias).contiguous())
        return self._high_res_region[region]


def _prompts_above(iou_pred: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """(B,) int64 positions of the prompts with some predicted IoU above ``threshold`` (all for None)."""
    if threshold is None:
        return torch.arange(iou_pred.shape[0], device=iou_pred.device)
    return torch.nonzero((iou_pred > threshold).any(1)).flatten()


def _heads(x: torch.Tensor, attn: Attention) -> torch.Tensor:
    """(..., d) -> (..., H, d / H), SAM's head split."""
    return x.unflatten(-1, (attn.num_heads, -1))


def _shared_logits(x: torch.Tensor, src: torch.Tensor, const: torch.Tensor, a, attn: Attention) -> torch.Tensor:
    """Per head ``x . (a * src + const)`` for x (B, T, d) and src, const (N, d): (H, B, T, N)."""
    b, t, _ = x.shape
    x = _heads(x, attn).permute(2, 0, 1, 3).flatten(1, 2)  # (H, B*T, dh)
    out = x @ _heads(src, attn).permute(1, 2, 0)  # (H, B*T, N)
    if a is not None:
        out.view(attn.num_heads, b, t, -1).mul_(a[None, :, None, :])
    return out.baddbmm_(x, _heads(const, attn).permute(1, 2, 0)).view(attn.num_heads, b, t, -1)


def _token_to_image(attn, sh: _TokenToImageShared, q_in, a, coef, basis):
    """``attn(q=q_in, k=keys + image_pe, v=keys)`` for keys = a * S + u + coef^T @ basis.

    q_in: (B, T, C); a: (B, N) or None; coef: (B, K, N); basis: (B, K, C). Returns (B, T, C)."""
    b, t, _ = q_in.shape
    nh = attn.num_heads
    q = attn.q_proj(q_in)
    q = q / math.sqrt(q.shape[-1] // nh)
    logits = _shared_logits(q, sh.k_src, sh.k_const, a, attn).permute(1, 0, 2, 3)  # (B, H, T, N)
    if coef.shape[1]:
        # (q Wk) Psi^T coef: contracted with the T queries before touching the N image tokens
        qk = torch.einsum("bkhe,bthe->bhtk", _heads(basis @ attn.k_proj.weight.T, attn), _heads(q, attn))
        logits = torch.baddbmm(logits.reshape(b, nh * t, -1), qk.flatten(1, 2), coef).view(b, nh, t, -1)
    probs = logits.softmax(-1)  # (B, H, T, N) or a permuted view

    weighted = probs.permute(1, 0, 2, 3) if a is None else probs.permute(1, 0, 2, 3) * a[None, :, None, :]
    out = weighted.reshape(nh, b * t, -1) @ _heads(sh.v_src, attn).transpose(0, 1)  # (H, B*T, dh)
    out = out.view(nh, b, t, -1).permute(1, 2, 0, 3) + _heads(sh.v_const, attn)  # (B, T, H, dh)
    if coef.shape[1]:
        # softmax rows sum to one, so the constant part of the values is just added
        p_coef = probs.reshape(b, nh * t, -1) @ coef.transpose(1, 2)  # (B, H*T, K)
        v_basis = _heads(basis @ attn.v_proj.weight.T, attn)  # (B, K, H, dh)
        out = out + torch.einsum("bhtk,bkhe->bthe", p_coef.view(b, nh, t, -1), v_basis)
    return attn.out_proj(out.flatten(2))


def _image_to_token(attn, sh: _LayerShared, k_in, v_in, a, coef, basis, out):
    """``attn(q=keys + image_pe, k=k_in, v=v_in)`` for keys = a * S + u + coef^T @ basis, in low
    rank and without out_proj's bias (which the shared pass adds to u).

    Writes the new coefficients, the attention weights (B, H*T, N), to ``out``; returns the new
    basis rows (B, H*T, C) (per-head values through out_proj) and the values (B, T, H, dh)."""
    b, t, _ = k_in.shape
    nh = attn.num_heads
    k = attn.k_proj(k_in)
    k = k / math.sqrt(k.shape[-1] // nh)
    v = _heads(attn.v_proj(v_in), attn)
    logits = _shared_logits(k, sh.q_src, sh.q_const, a, attn).permute(1, 0, 2, 3)  # (B, H, T, N)
    if coef.shape[1]:
        qk = torch.einsum("bjhe,bthe->bhtj", _heads(basis @ attn.q_proj.weight.T, attn), _heads(k, attn))
        logits = torch.baddbmm(logits.reshape(b, nh * t, -1), qk.flatten(1, 2), coef).view(b, nh, t, -1)
    out.view(b, nh, t, -1).copy_(logits.softmax(2))  # softmax over the T prompt tokens
    out_w = attn.out_proj.weight.T.unflatten(0, (nh, -1))  # (H, dh, C)
    new_basis = torch.einsum("bthe,hec->bhtc", v, out_w).flatten(1, 2)
    return new_basis, v


def _layer_norm(norm, sh: _NormShared, a, coef, basis, values):
    """LayerNorm over channels of keys = a * S + u + coef^T @ basis.

    The squared norm of the centred keys is expanded into shared terms, a cross term with S (via
    the shared ``S_c @ F_c^T`` and each block's per-head values, never (N, C) per prompt) and the
    quadratic form of ``coef`` with the Gram matrix of the basis. The old u becomes one more basis
    row, whose coefficient (the last row of ``coef``, (B, K + 1, N), written here) is 1 / std.
    Scales coef in place; returns the new (a, basis)."""
    dtype = basis.dtype
    stats_dtype = torch.promote_types(dtype, torch.float32)  # low precision: statistics in float32
    k = coef.shape[1] - 1
    c = basis.shape[-1]
    old = coef[:, :k].to(stats_dtype)
    basis_c = (basis - basis.mean(-1, keepdim=True)).to(stats_dtype)
    u_c = sh.u_c.to(stats_dtype)
    scale = 1.0 if a is None else a.to(stats_dtype)

    two_scale = torch.full((1, 1), 2.0, dtype=stats_dtype, device=coef.device) if a is None else 2 * scale

    # weight[k, n] such that |keys_c[n]|^2 = shared terms + sum_k coef[k, n] * weight[k, n]
    weight = torch.baddbmm((2 * basis_c @ u_c).unsqueeze(-1), basis_c @ basis_c.transpose(1, 2), old)
    row = 0
    for cross, v in zip(sh.cross, values):
        cross = cross.to(stats_dtype)
        if v is None:  # constant block: S_c . c_c
            weight[:, row].addcmul_(two_scale, cross)
            row += 1
        else:  # attention block: S_c @ (values @ F)_c^T, per head
            cross = torch.einsum("nhe,bthe->bhtn", cross.unflatten(-1, v.shape[-2:]), v.to(stats_dtype))
            rows = cross.shape[1] * cross.shape[2]
            weight[:, row : row + rows].addcmul_(cross.flatten(1, 2), two_scale.unsqueeze(1))
            row += rows
    sq = scale * scale * sh.src_sq + 2 * scale * sh.src_u + sh.u_sq + (weight * old).sum(1)
    rstd = torch.rsqrt(sq / c + norm.eps)  # (B, N)

    a = rstd if a is None else a * rstd
    coef[:, :k].mul_(rstd.unsqueeze(1))
    coef[:, k] = rstd
    basis = torch.cat([basis_c, u_c.expand(basis.shape[0], 1, -1)], dim=1) * norm.weight.to(stats_dtype)
    return a.to(dtype), basis.to(dtype)
