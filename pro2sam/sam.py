"""Segment Anything models: the variants Pro2SAM builds and the one builder for them.

Two families: segment-anything v1 (:class:`SamVariant`, built here from ``segment_anything``'s
modules) and SAM 2.1 (:class:`Sam2Variant`, built by the ``sam2`` package from its own configs,
image mode; ``pip install 'pro2sam[sam2]'``, see pyproject.toml). Both run stage 2 through
:mod:`pro2sam.segmenters`.

As ``segment_anything/build_sam.py`` does for the official three, the sizes of every SAM we build
are declared here, once (:data:`SAM_VARIANTS`), with SAM's pixel normalisation; :func:`build_sam`
is the way in for inference (weights read without running pickled code, official files checked by
SHA-256), :func:`sam_from_variant` for training one from scratch. For inference the image encoder's
attention runs through ``F.scaled_dot_product_attention`` (:class:`SdpaAttention`): the same
function, computed without segment_anything's explicit attention matrix where a fused kernel exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.image_encoder import Attention, get_rel_pos

from .checkpoints import OFFICIAL_SAM2_CHECKPOINTS, OFFICIAL_SAM_CHECKPOINTS, CheckpointError, load_state_dict

__all__ = [
    "DEFAULT_SAM_VARIANT",
    "REFERENCE_SAM_SIZE",
    "SAM_PIXEL_MEAN",
    "SAM_PIXEL_STD",
    "SAM_VARIANTS",
    "Sam2Variant",
    "SamVariant",
    "SdpaAttention",
    "build_sam",
    "sam_from_variant",
    "use_sdpa_attention",
]

# Segment Anything's pixel normalisation (ImageNet mean/std in 0..255), as in build_sam.py.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

# Side of the square image the authors resize to before SAM (METHOD.md §2, reference option).
REFERENCE_SAM_SIZE = 224

# The SAM of the method (METHOD.md §2: frozen ViT-H), used wherever no variant is named.
DEFAULT_SAM_VARIANT = "vit_h"


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
            :meth:`pro2sam.candidates.CandidateConfig.for_variant`); empty for the official
            variants.
        points_per_side: this variant's default prompt grid (N x N) where it differs from
            ``CandidateConfig``'s (SamAutomaticMaskGenerator's 32); None: that one.
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
    points_per_side: int | None = None


@dataclass(frozen=True)
class Sam2Variant:
    """One SAM 2 / 2.1 architecture, as the ``sam2`` package builds it.

    Attributes:
        config: its config in the ``sam2`` package (``sam2.build_sam.build_sam2``'s
            ``config_file``).
        filter_thresholds: as :attr:`SamVariant.filter_thresholds`; SAM 2's own generator
            (``SAM2AutomaticMaskGenerator``) keeps predicted IoUs above 0.8, not 0.88.
        hydra_overrides: extra overrides of the config (none for the official variants).
        points_per_side: as :attr:`SamVariant.points_per_side` (SAM 2's own generator: 32).
    """

    config: str
    filter_thresholds: tuple[tuple[str, float], ...] = (("pred_iou_thresh", 0.8),)
    hydra_overrides: tuple[str, ...] = ()
    points_per_side: int | None = None


# Every SAM we build. The official three match segment_anything/build_sam.py; "tiny" is a
# random-weight stand-in for tests and CPU benchmarks of the pipeline (no pretrained weights);
# "synthetic" is the small SAM trained on pro2sam.synthetic scenes and shipped with the package
# (pro2sam.shipped, scripts/train_sam_synthetic.py).
SAM_VARIANTS: dict[str, SamVariant | Sam2Variant] = {
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
        # synthetic val split (200 images, grid 16) together with the matching rule by
        # `benchmarks/bench_quality.py` (benchmarks/README.md: GT-known Loc 88.0 on val).
        filter_thresholds=(("pred_iou_thresh", 0.5), ("stability_score_thresh", 0.7)),
        points_per_side=16,  # the grid its thresholds were chosen at, and the demo's
    ),
    # SAM 2.1 (facebookresearch/sam2, image mode), the official configs of the sam2 package; the
    # official files' names are in pro2sam.checkpoints.OFFICIAL_SAM2_CHECKPOINTS.
    "sam2.1_hiera_tiny": Sam2Variant("configs/sam2.1/sam2.1_hiera_t.yaml"),
    "sam2.1_hiera_small": Sam2Variant("configs/sam2.1/sam2.1_hiera_s.yaml"),
    "sam2.1_hiera_base_plus": Sam2Variant("configs/sam2.1/sam2.1_hiera_b+.yaml"),
    "sam2.1_hiera_large": Sam2Variant("configs/sam2.1/sam2.1_hiera_l.yaml"),
}


def is_sam2(variant: str) -> bool:
    """Whether ``variant`` is a SAM 2 / 2.1 variant (built by the ``sam2`` package)."""
    return isinstance(SAM_VARIANTS.get(variant), Sam2Variant)


def sam_from_variant(v: SamVariant) -> Sam:
    """The SAM of ``v``'s sizes with PyTorch's default initialisation (the global random state,
    the default device; under ``torch.device("meta")`` nothing is allocated). For training from
    scratch; :func:`build_sam` is the way in for inference."""
    if not isinstance(v, SamVariant):
        raise TypeError(f"sam_from_variant builds segment-anything v1 variants, not {v!r}")
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


class SdpaAttention(Attention):
    """segment_anything's image-encoder attention (global or windowed, with decomposed relative
    positions) through ``F.scaled_dot_product_attention``.

    The relative-position terms ``q . R_h[kh] + q . R_w[kw]`` become the kernel's additive mask,
    (B, heads, N, N) for N = H * W tokens, so the softmax and the product with the values run
    fused (flash / memory-efficient kernels); the explicit path also holds the logits and their
    softmax. Same parameters and outputs as :class:`segment_anything.modeling.image_encoder.Attention`
    up to float rounding (the sums run in another order).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) tokens -> (B, H, W, C)."""
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
        bias = self._rel_pos_bias(q, h, w) if self.use_rel_pos else None
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale 1/sqrt(head_dim), as SAM's
        return self.proj(x.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))

    def _rel_pos_bias(self, q: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """segment_anything's ``add_decomposed_rel_pos`` terms as a (B, heads, N, N) mask."""
        r_q = q.reshape(-1, h, w, q.shape[-1])
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(h, h, self.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(w, w, self.rel_pos_w))
        return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(*q.shape[:2], h * w, h * w)


def use_sdpa_attention(sam: Sam) -> Sam:
    """Run ``sam``'s image-encoder attention through :class:`SdpaAttention`, in place (parameters
    untouched); returns ``sam``."""
    for block in sam.image_encoder.blocks:
        if type(block.attn) is Attention:
            block.attn.__class__ = SdpaAttention
    return sam


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
    variant: str = DEFAULT_SAM_VARIANT,
    checkpoint: str | os.PathLike | None = None,
    *,
    verify: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
    sdpa: bool = True,
) -> Sam:
    """Build a Segment Anything model in eval mode, reading weights without running pickled code.

    Args:
        variant: a key of :data:`SAM_VARIANTS`: "vit_h", "vit_l", "vit_b" (the official
            architectures), "tiny" (256 px input, a few hundred thousand parameters) or
            "synthetic" (256 px input, 1.2 M parameters; the shipped weights are
            :func:`pro2sam.shipped.sam_checkpoint`); or a SAM 2.1 variant,
            "sam2.1_hiera_tiny" / "_small" / "_base_plus" / "_large" (a ``sam2`` ``SAM2Base``,
            see :func:`build_sam2_model`). Default: :data:`DEFAULT_SAM_VARIANT`.
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
        sdpa: the image encoder's attention through :class:`SdpaAttention` (the same outputs up
            to float rounding, faster and lighter); False keeps segment_anything's own code (what
            ``SamAutomaticMaskGenerator`` users run).

    Raises:
        ValueError: unknown variant.
        CheckpointError: the file is missing, truncated, corrupt, not the official file (when
            ``verify``), or does not fit the architecture.
    """
    if variant not in SAM_VARIANTS:
        raise ValueError(f"unknown SAM variant {variant!r}; choose from {sorted(SAM_VARIANTS)}")
    spec = SAM_VARIANTS[variant]
    device = torch.device(device)
    if isinstance(spec, Sam2Variant):
        return build_sam2_model(variant, checkpoint, verify=verify, device=device, seed=seed)

    if checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device(device):
                sam = sam_from_variant(spec)
                if variant == "tiny":
                    _make_random_masks_coherent(sam)
        return _inference_model(sam.to(device), sdpa)

    if variant in OFFICIAL_SAM_CHECKPOINTS:
        filename, sha256 = OFFICIAL_SAM_CHECKPOINTS[variant]
        what = f"the official SAM {variant} checkpoint {filename}"
        state = load_state_dict(checkpoint, expected_sha256=sha256 if verify else None, what=what)
    else:
        what = f"SAM {variant} checkpoint"
        state = load_state_dict(checkpoint, what=what)

    # Weights replace the parameters, so skip the random initialisation (seconds for ViT-H).
    with torch.device("meta"):
        sam = sam_from_variant(spec)
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
    return _inference_model(sam.to(device), sdpa)


def _inference_model(sam: Sam, sdpa: bool) -> Sam:
    return (use_sdpa_attention(sam) if sdpa else sam).eval()


def _import_sam2():
    try:
        from sam2.build_sam import build_sam2
    except ImportError as e:
        raise ImportError(
            f"SAM 2.1 variants need the sam2 package ({e}); install it with: SAM2_BUILD_CUDA=0 pip install "
            "--no-build-isolation 'sam2==1.1.0' (or pip install 'pro2sam[sam2]')"
        ) from None
    return build_sam2


def build_sam2_model(
    variant: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    verify: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
    hydra_overrides: tuple[str, ...] = (),
):
    """A SAM 2.1 model (``sam2.modeling.sam2_base.SAM2Base``) in eval mode, built by the ``sam2``
    package from the variant's own config (``sam2.build_sam.build_sam2``, its default
    post-processing settings), weights read without running pickled code.

    Args:
        variant: a :class:`Sam2Variant` key of :data:`SAM_VARIANTS`.
        checkpoint: the official ``.pt`` (its tensors under ``"model"``), a plain state dict or a
            ``.safetensors`` file; loaded strictly (every tensor of the architecture, no other).
            None gives **random weights** drawn with ``seed`` (tests and speed benchmarks only).
        verify: check an official file's SHA-256 where one is known
            (:data:`pro2sam.checkpoints.OFFICIAL_SAM2_CHECKPOINTS`; none is yet).
        hydra_overrides: more overrides of the config (e.g. ``"++model.image_size=512"``).

    Raises:
        ImportError: the ``sam2`` package is not installed.
        CheckpointError: the file is missing, corrupt, or does not fit the architecture.
    """
    spec = SAM_VARIANTS[variant]
    if not isinstance(spec, Sam2Variant):
        raise ValueError(f"{variant!r} is not a SAM 2 variant")
    build_sam2 = _import_sam2()
    overrides = [*spec.hydra_overrides, *hydra_overrides]
    device = torch.device(device)

    def build():
        return build_sam2(spec.config, None, device="cpu", mode="eval", hydra_overrides_extra=overrides)

    if checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build()
        return model.to(device).eval()

    filename, sha256 = OFFICIAL_SAM2_CHECKPOINTS.get(variant, (None, None))
    what = f"the official SAM 2.1 {variant} checkpoint {filename}" if filename else f"SAM 2 {variant} checkpoint"
    state = load_state_dict(checkpoint, expected_sha256=sha256 if verify else None, what=what)
    with torch.random.fork_rng(devices=[]):  # the weights replace the draws: leave the global state alone
        model = build()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{what} {checkpoint} does not fit the {variant} architecture: {e}") from None
    return model.to(device).eval()
