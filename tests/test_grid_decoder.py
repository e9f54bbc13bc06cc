"""GridDecoder's fast path gives SAM's own decoder outputs, within float rounding."""

import math
from functools import partial

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from pro2sam.grid_decoder import GridDecoder


def build_sam(*, dim=256, heads=8, depth=2, mlp_dim=2048, embedding_hw=(16, 16), seed=0) -> Sam:
    """A SAM with a tiny image encoder and (by default) a real-size prompt encoder and decoder,
    with random weights drawn wider than PyTorch's defaults so that attention is far from uniform,
    LayerNorm affine terms are far from identity and prompts give different masks."""
    torch.manual_seed(seed)
    h, w = embedding_hw
    encoder = ImageEncoderViT(
        img_size=16 * max(h, w),
        patch_size=16,
        embed_dim=32,
        depth=1,
        num_heads=2,
        mlp_ratio=2,
        out_chans=dim,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=False,
        window_size=0,
        global_attn_indexes=(),
    )
    prompt_encoder = PromptEncoder(
        embed_dim=dim, image_embedding_size=(h, w), input_image_size=(16 * h, 16 * w), mask_in_chans=16
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=depth, embedding_dim=dim, mlp_dim=mlp_dim, num_heads=heads),
        transformer_dim=dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    sam = Sam(encoder, prompt_encoder, decoder).eval().requires_grad_(False)
    for name, p in list(prompt_encoder.named_parameters()) + list(decoder.named_parameters()):
        if p.ndim >= 2:
            p.normal_(0, 2.0 / p.shape[-1] ** 0.5)
        elif "norm" in name and name.endswith("weight"):
            p.uniform_(0.5, 1.5)
        else:
            p.normal_(0, 0.3)
    return sam


@pytest.fixture(scope="module")
def sam():
    return build_sam()


@pytest.fixture(scope="module")
def image_embedding(sam):
    size = sam.image_encoder.img_size
    with torch.no_grad():
        return sam.image_encoder(torch.randn(1, 3, size, size))


def random_prompts(sam, batch, points, *, seed=1, padding=False):
    """(B, P, 2) coordinates in SAM's input frame and (B, P) labels, 1 or 0, or -1 for padding
    points at the end of some prompts (as SamPredictor pads prompts with fewer points)."""
    g = torch.Generator().manual_seed(seed)
    h, w = sam.prompt_encoder.input_image_size
    coords = torch.rand(batch, points, 2, generator=g) * torch.tensor([w, h])
    labels = torch.randint(0, 2, (batch, points), generator=g)
    labels[:, 0] = 1
    if padding:
        for i in range(batch):
            keep = 1 + i % points
            labels[i, keep:] = -1
            coords[i, keep:] = 0.0
    return coords, labels


def reference_decode(sam, embedding, coords, labels, multimask_output):
    """SamPredictor.predict_torch's decoding, verbatim."""
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        return sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )


def rounding_atol(sam, reference):
    """Absolute tolerance between two float32 evaluations of ``sam``'s decoder whose sums run in
    different orders: another batch size or another CPU picks other kernel blockings, and the fast
    path reorders the algebra.

    Reordering a sum of n float32 terms moves it by about sqrt(n) * eps of the magnitude summed
    (the rounding errors add like a random walk). n is the decoder's widest sum: the transformer
    MLP's hidden width or the attention over image tokens. The factor 16 covers the dozen sums
    stacked in the decoder and intermediate values several times the output's magnitude (the IoU
    head reads tokens ~3x its output). With this file's default decoder that is 1.6e-2 on logits
    up to ~180 and 5.6e-4 on IoUs up to ~7, where CPUs differ by up to 4e-4 and 2e-5; a wrong
    derivation is off by whole units.
    """
    h, w = sam.prompt_encoder.image_embedding_size
    n = max(sam.mask_decoder.transformer.layers[0].mlp.lin1.out_features, h * w)
    return 16 * math.sqrt(n) * torch.finfo(torch.float32).eps * max(1.0, reference.abs().max().item())


def assert_same_outputs(sam, got, reference):
    for name, x, ref in zip(("logits", "iou"), got, reference):
        assert x.shape == ref.shape, name
        torch.testing.assert_close(x, ref, rtol=0, atol=rounding_atol(sam, ref), msg=lambda m: f"{name}: {m}")


def assert_fast_path_matches_sams_decoder(sam, embedding, coords, labels, multimask_output):
    """Decode with GridDecoder's fast path, check against SAM's own decoder; return the outputs."""
    fast = GridDecoder(sam)
    fast.set_image_embedding(embedding)
    outputs = fast.decode(coords, labels, multimask_output=multimask_output)
    assert_same_outputs(sam, outputs, reference_decode(sam, embedding, coords, labels, multimask_output))
    return outputs


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("multimask_output", [True, False])
def test_single_point_prompts_match_sams_decoder(sam, image_embedding, batch, multimask_output):
    coords, labels = random_prompts(sam, batch, 1)
    outputs = assert_fast_path_matches_sams_decoder(sam, image_embedding, coords, labels, multimask_output)
    assert outputs[0].shape == (batch, 3 if multimask_output else 1, 64, 64)


@pytest.mark.parametrize("multimask_output", [True, False])
def test_multi_point_prompts_with_padding_match_sams_decoder(sam, image_embedding, multimask_output):
    coords, labels = random_prompts(sam, 7, 3, padding=True)
    assert (labels == -1).any() and (labels == 0).any()
    assert_fast_path_matches_sams_decoder(sam, image_embedding, coords, labels, multimask_output)


def test_official_mode_is_sams_decoder(sam, image_embedding):
    coords, labels = random_prompts(sam, 5, 2)
    official = GridDecoder(sam, fast=False)
    official.set_image_embedding(image_embedding)
    got = official.decode(coords, labels)
    want = reference_decode(sam, image_embedding, coords, labels, True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_chunked_decoding_equals_one_batch(sam, image_embedding):
    coords, labels = random_prompts(sam, 11, 1)
    chunked, whole = GridDecoder(sam, batch_size=4), GridDecoder(sam, batch_size=64)
    for decoder in (chunked, whole):
        decoder.set_image_embedding(image_embedding)
    # Other batch sizes run the same sums in another order: 1e-4 apart on logits of ~180 on some CPUs.
    assert_same_outputs(sam, chunked.decode(coords, labels), whole.decode(coords, labels))


def test_a_new_image_embedding_replaces_the_old_one(sam, image_embedding):
    coords, labels = random_prompts(sam, 3, 1)
    decoder = GridDecoder(sam)
    decoder.set_image_embedding(torch.randn_like(image_embedding))
    decoder.decode(coords, labels)
    decoder.set_image_embedding(image_embedding)
    assert_same_outputs(sam, decoder.decode(coords, labels), reference_decode(sam, image_embedding, coords, labels, True))


@pytest.mark.parametrize("multimask_output", [True, False])
def test_other_decoder_shapes_match_sams_decoder(multimask_output):
    # deeper, narrower, fewer heads, non-square embedding: nothing is tied to vit_b's sizes
    sam = build_sam(dim=64, heads=4, depth=3, mlp_dim=128, embedding_hw=(6, 10), seed=3)
    embedding = torch.randn(1, 64, 6, 10)
    coords, labels = random_prompts(sam, 9, 2, padding=True)
    assert_fast_path_matches_sams_decoder(sam, embedding, coords, labels, multimask_output)


def test_random_weights_are_a_discriminating_check(sam, image_embedding):
    # if prompts barely changed the masks, equal outputs would say little about the prompt path
    coords, labels = random_prompts(sam, 16, 1)
    logits, iou = reference_decode(sam, image_embedding, coords, labels, True)
    assert logits.std(dim=0).mean() > 0.2 * logits.std()
    assert iou.std(dim=0).mean() > 0.05 * iou.abs().mean()


def test_decode_before_set_image_embedding_raises(sam):
    coords, labels = random_prompts(sam, 1, 1)
    with pytest.raises(RuntimeError, match="set_image_embedding"):
        GridDecoder(sam).decode(coords, labels)


def test_decoding_under_bf16_autocast_runs_and_stays_close(sam, image_embedding):
    coords, labels = random_prompts(sam, 8, 1)
    reference = reference_decode(sam, image_embedding, coords, labels, True)
    decoder = GridDecoder(sam)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoder.set_image_embedding(image_embedding)
        logits, iou = decoder.decode(coords, labels)
    assert logits.shape == reference[0].shape
    # bf16 keeps 8 bits of mantissa; with this test's deliberately large weights the worst logit
    # is off by ~7% of the scale, while the masks (logit signs) stay the same almost everywhere;
    # other CPUs change only the order of float32 accumulations, far below bf16's 2**-8 steps
    assert (logits.float() - reference[0]).abs().max() < 0.1 * reference[0].abs().max()
    assert ((logits.float() > 0) == (reference[0] > 0)).float().mean() > 0.98


def test_a_region_gives_the_same_logits_as_the_whole_grid_cropped(sam, image_embedding):
    coords, labels = random_prompts(sam, 5, 1)
    decoder = GridDecoder(sam)
    decoder.set_image_embedding(image_embedding)
    whole, iou = decoder.decode(coords, labels)
    cropped, cropped_iou = decoder.decode(coords, labels, region=(9, 13))
    assert cropped.shape == (5, 3, 36, 52)
    assert_same_outputs(sam, (cropped, cropped_iou), (whole[..., :36, :52], iou))


@pytest.mark.parametrize("tail_cells", [1, 7, 117, 300, 10_000])
def test_the_tail_in_cache_sized_pieces_gives_the_whole_batchs_logits(sam, image_embedding, tail_cells):
    # region 9 x 13 = 117 cells: pieces of part of a cell row, of one prompt's region, of two
    # prompts' regions, and of the whole batch
    coords, labels = random_prompts(sam, 5, 1)
    pieces, whole = GridDecoder(sam, tail_cells=tail_cells), GridDecoder(sam)
    for decoder in (pieces, whole):
        decoder.set_image_embedding(image_embedding)
    got = pieces.decode(coords, labels, region=(9, 13))
    assert got[0].shape == (5, 3, 36, 52)
    assert_same_outputs(sam, got, whole.decode(coords, labels, region=(9, 13)))


def test_a_tail_piece_must_hold_a_cell(sam):
    with pytest.raises(ValueError, match="tail_cells"):
        GridDecoder(sam, tail_cells=0)


def test_decoding_masks_above_an_iou_keeps_exactly_the_prompts_with_such_a_mask(sam, image_embedding):
    coords, labels = random_prompts(sam, 16, 1)
    decoder = GridDecoder(sam, batch_size=5)
    decoder.set_image_embedding(image_embedding)
    logits, iou = decoder.decode(coords, labels)
    threshold = iou.max(1).values.median().item()
    kept_logits, kept_iou, index = decoder.decode_masks_above(coords, labels, threshold)
    expected = torch.nonzero((iou > threshold).any(1)).flatten()
    assert 0 < len(index) < 16 and torch.equal(index, expected)
    assert_same_outputs(sam, (kept_logits, kept_iou), (logits[index], iou[index]))

