"""GTFormer's training loss (METHOD.md section 1): cross-entropy plus the area and norm terms of
the coarse map and of each global map. Used by :mod:`pro2sam.train.gtformer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..gtformer import GTFormerOutput

__all__ = ["AREA_LOSSES", "norm_blur_kernel", "area_loss", "norm_loss", "gtformer_loss"]


def norm_blur_kernel(kernlen: int = 3, nsig: float = 6.0, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """(kernlen, kernlen) blur of L_norm: the authors' ``get_kernel(kernlen, nsig)``, sum 1.

    Normal-CDF mass of ``kernlen`` equal bins spanning ``[-nsig - i/2, nsig + i/2]`` with
    ``i = (2 nsig + 1) / kernlen``; the kernel is ``sqrt(outer(c, c))`` normalised. At the
    defaults the bins are so wide that the weights are about 0.805 (centre), 0.046 (edge) and
    0.0026 (corner): nearly an identity with a thin halo, not a wide Gaussian (METHOD.md §1).
    """
    interval = (2 * nsig + 1) / kernlen
    x = torch.linspace(-nsig - interval / 2, nsig + interval / 2, kernlen + 1, dtype=torch.float64)
    c = torch.diff(torch.special.ndtr(x))
    kernel = torch.sqrt(torch.outer(c, c))
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


AREA_LOSSES = ("batch", "image")


def area_loss(maps: torch.Tensor, tau: float, *, per: str = "batch") -> torch.Tensor:
    """L_area per map: ``per="batch"`` is the authors' |mean over batch and pixels of M - tau|;
    ``per="image"`` **[ours]** is the mean over images of |mean over pixels of M_i - tau|.

    The batch form is met by a map that is all ones on a tau share of the images and all zeros on
    the rest; a backbone that already tells the classes apart (ours, pretrained on
    :mod:`pro2sam.synthetic_pretrain`) finds that solution: its map became a class code (two
    classes of ten all ones, the others all zeros) instead of a foreground map. The image form asks
    every image for a tau share of foreground.

    Args:
        maps: (B, K, h, w).
        tau: target foreground share.
        per: "batch" or "image".

    Returns:
        (K,) one loss per map.
    """
    if per == "batch":
        return (maps.mean(dim=(0, 2, 3)) - tau).abs()
    if per == "image":
        return (maps.mean(dim=(2, 3)) - tau).abs().mean(dim=0)
    raise ValueError(f"area loss per {per!r}: choose from {AREA_LOSSES}")


def norm_loss(maps: torch.Tensor) -> torch.Tensor:
    """L_norm = mean of G(M) (1 - G(M)) per map, G the fixed 3x3 blur :func:`norm_blur_kernel`
    with zero padding 1.

    Pushes the (barely) blurred map towards 0 or 1. Args: maps (B, K, h, w). Returns (K,).
    """
    b, k, h, w = maps.shape
    kernel = norm_blur_kernel(dtype=maps.dtype, device=maps.device).view(1, 1, 3, 3)
    blurred = F.conv2d(maps.reshape(b * k, 1, h, w), kernel, padding=1).view(b, k, h, w)
    return (blurred * (1 - blurred)).mean(dim=(0, 2, 3))


def gtformer_loss(
    output: GTFormerOutput,
    targets: torch.Tensor,
    *,
    tau: float = 0.25,
    area_weight: float = 1.0,
    global_weight: float = 0.5,
    area_per: str = "batch",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GTFormer's training loss (11 terms).

    ``L = CE + area_weight * (L_area(M_b) + L_norm(M_b)) + global_weight * sum_k (L_area(M_k) + L_norm(M_k))``

    Args:
        output: the model's output (logits, coarse map M_b, global maps M_k).
        targets: (B,) int64 class indices.
        tau: target mean foreground fraction (0.25 for CUB-like data, 0.35 for ImageNet-like).
        area_weight: weight of the coarse map's two terms.
        global_weight: weight of each global map's two terms.
        area_per: "batch" (the authors') or "image" (**[ours]**), see :func:`area_loss`.

    Returns:
        total: scalar loss (float32).
        terms: the unweighted terms, scalar tensors: ``ce``, ``area_coarse``, ``norm_coarse``,
            ``area_global{k}`` and ``norm_global{k}`` for k in 0..3.
    """
    coarse = output.coarse_map.float().unsqueeze(1)
    global_maps = output.global_maps.float()
    ce = F.cross_entropy(output.logits.float(), targets)
    area_coarse, norm_coarse = area_loss(coarse, tau, per=area_per)[0], norm_loss(coarse)[0]
    area_global, norm_global = area_loss(global_maps, tau, per=area_per), norm_loss(global_maps)
    total = ce + area_weight * (area_coarse + norm_coarse) + global_weight * (area_global + norm_global).sum()
    terms = {"ce": ce, "area_coarse": area_coarse, "norm_coarse": norm_coarse}
    for k in range(global_maps.shape[1]):
        terms[f"area_global{k}"] = area_global[k]
        terms[f"norm_global{k}"] = norm_global[k]
    return total, terms
