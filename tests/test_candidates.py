"""Grid-prompted SAM candidates (METHOD.md §2) against segment_anything's own generator.

The tiny SAM has random weights, so these tests check that we filter exactly as the official
code does, not that the masks are good.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator

from pro2sam.candidates import CandidateConfig, GridCandidateGenerator
from pro2sam.sam import build_sam

# Thresholds low enough that the random tiny SAM keeps candidates, high enough to filter some;
# an offset of 0.1 because its logits are of order 1.
FILTERS = dict(points_per_side=8, pred_iou_thresh=0.5, stability_score_thresh=0.3, stability_score_offset=0.1)

# Our decoder reorders SAM's float32 sums (pro2sam/grid_decoder.py). The tiny SAM's IoU head sums
# at most 256 terms of order 1, so predicted IoUs (order 1) move by ~1e-6 between CPUs: 100x margin.
PRED_IOU_ATOL = 1e-4
# Rounding can put a pixel whose upscaled logit ties a threshold (0 or +-offset; here some lie
# 3e-7 from one) on either side. Each such pixel moves a stability score by at most 1/area of the
# mask; allow two per mask.
TIED_PIXELS = 2


def synthetic_image(h, w, seed):
    """Colour gradients with a few flat discs: regions a SAM can split."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    image = np.stack([xx / w * 255, yy / h * 255, np.full((h, w), 128.0)], axis=-1)
    for _ in range(4):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(10, 60)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    return image.astype(np.uint8)


IMAGES = [(180, 240, 0), (240, 180, 1), (200, 200, 2)]


def mask_iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def by_prompt(c):
    """{(grid point x, y, multimask index): candidate position}."""
    return {(*np.round(c.point_coords[i], 6), int(c.multimask_index[i])): i for i in range(len(c))}


@pytest.mark.parametrize("h,w,seed", IMAGES)
def test_exact_path_equals_the_official_generator(tiny_sam, h, w, seed):
    image = synthetic_image(h, w, seed)
    official = SamAutomaticMaskGenerator(tiny_sam, box_nms_thresh=0.7, output_mode="binary_mask", **FILTERS)
    expected = official.generate(image)
    ours = GridCandidateGenerator(tiny_sam, CandidateConfig(mode="exact", **FILTERS)).generate(image)

    assert len(expected) > 0
    assert len(ours) == len(expected)
    # Both come out in NMS order (decreasing predicted IoU).
    for i, ann in enumerate(expected):
        assert np.allclose(ours.point_coords[i], ann["point_coords"][0])
        assert ours.pred_ious[i] == pytest.approx(ann["predicted_iou"], abs=PRED_IOU_ATOL)
        assert ours.stability_scores[i] == pytest.approx(ann["stability_score"], abs=TIED_PIXELS / ann["area"])
        assert ours.masks[i].shape == (h, w)
        assert mask_iou(ours.masks[i], ann["segmentation"]) >= 0.99
        x, y, bw, bh = ann["bbox"]
        assert np.abs(ours.boxes_xyxy[i] - [x, y, x + bw, y + bh]).max() <= 1


def test_exact_path_equals_the_official_generator_with_filters_off(tiny_sam):
    """Every mask of every point reaches NMS, empty masks included (their boxes never overlap)."""
    image = synthetic_image(180, 240, 0)
    off = dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    expected = SamAutomaticMaskGenerator(tiny_sam, **off).generate(image)
    ours = GridCandidateGenerator(tiny_sam, CandidateConfig(mode="exact", **off)).generate(image)
    assert len(ours) == len(expected) > 20
    assert all(mask_iou(m, a["segmentation"]) >= 0.99 for m, a in zip(ours.masks, expected))
    np.testing.assert_allclose(ours.pred_ious, [a["predicted_iou"] for a in expected], atol=PRED_IOU_ATOL)


@pytest.mark.parametrize("h,w,seed", IMAGES)
def test_fast_path_keeps_nearly_the_exact_candidates(tiny_sam, h, w, seed):
    image = synthetic_image(h, w, seed)
    generator = GridCandidateGenerator(tiny_sam, CandidateConfig(mode="exact", **FILTERS))
    exact = generator.generate(image)
    fast = GridCandidateGenerator(tiny_sam, CandidateConfig(mode="fast", **FILTERS)).generate(image)
    assert fast.masks.shape[1:] == (-(-h * 256 // max(h, w)) // 4, -(-w * 256 // max(h, w)) // 4)

    exact_keys, fast_keys = by_prompt(exact), by_prompt(fast)
    shared = exact_keys.keys() & fast_keys.keys()
    agreement = len(shared) / len(exact_keys.keys() | fast_keys.keys())
    assert agreement >= 0.6, f"fast and exact share {agreement:.2f} of their candidates"
    assert abs(len(fast) - len(exact)) <= max(2, 0.25 * len(exact))
    # A fast mask seen at full resolution is the exact mask of the same prompt.
    ious = [mask_iou(fast.full_resolution_mask(fast_keys[k]), exact.masks[exact_keys[k]]) for k in shared]
    assert min(ious) >= 0.99


@pytest.mark.parametrize("h,w,seed", IMAGES)
def test_fast_path_picks_the_same_final_mask_as_the_exact_path(tiny_sam, h, w, seed):
    """End to end through matching, with filters off (dozens of candidates, the hard case).

    The coarse map is planted from the largest exact candidate under half the image, at 14x14,
    standing for a trained GTFormer's map. Measured on these images: the same final mask
    (IoU 1.0) on all three.
    """
    import cv2

    from pro2sam.matching import match_masks

    image = synthetic_image(h, w, seed)
    off = dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    exact = GridCandidateGenerator(tiny_sam, CandidateConfig(mode="exact", **off)).generate(image)
    fast = GridCandidateGenerator(tiny_sam, CandidateConfig(mode="fast", **off)).generate(image)
    areas = exact.masks.reshape(len(exact), -1).mean(1)
    planted = exact.masks[int(np.argmax(np.where(areas < 0.5, areas, 0)))]
    coarse = 0.05 + 0.9 * cv2.resize(planted.astype(np.float32), (14, 14), interpolation=cv2.INTER_AREA)

    chosen = []
    for candidates in (exact, fast):
        match = match_masks(coarse, candidates.masks, candidates.pred_ious)
        assert match.match_score > 0.5  # the planted object is found, not a tie among misses
        chosen.append(candidates.full_resolution_mask(match.index))
    assert mask_iou(*chosen) >= 0.99


def test_full_resolution_mask_is_sams_postprocessed_mask(tiny_sam):
    image = synthetic_image(180, 240, 0)
    config = CandidateConfig(mode="fast", points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    fast = GridCandidateGenerator(tiny_sam, config).generate(image)

    from segment_anything import SamPredictor

    predictor = SamPredictor(tiny_sam)
    predictor.set_image(image)
    assert len(fast) > 0
    for i in range(len(fast)):
        logits, _, _ = predictor.predict(fast.point_coords[i : i + 1], np.array([1]), multimask_output=True, return_logits=True)
        sams = logits[fast.multimask_index[i]] - tiny_sam.mask_threshold
        # The same pixels, except where SAM's logit ties the threshold within float32 rounding of
        # our reordered decoder (~1e-6 of the logits' scale on any CPU; 1e-4 leaves 100x).
        tied = np.abs(sams) <= 1e-4 * np.abs(sams).max()
        assert np.array_equal(fast.full_resolution_mask(i)[~tied], (sams > 0)[~tied])


@pytest.mark.parametrize("input_size, out_size", [((192, 256), (480, 640)), ((256, 171), (300, 200)), ((100, 256), (97, 250))])
def test_full_resolution_boxes_found_at_the_edges_are_those_of_the_upsampled_masks(input_size, out_size):
    from segment_anything.utils.amg import batched_mask_to_box

    from pro2sam.candidates import _full_resolution_boxes, _upscale_logits

    generator = torch.Generator().manual_seed(0)
    kh, kw = -(-input_size[0] // 4) + 1, -(-input_size[1] // 4) + 1
    # Smooth blobs of every size, some touching the image's edges; then three odd masks.
    blobs = torch.randn(60, 1, kh // 4 + 1, kw // 4 + 1, generator=generator)
    logits = torch.nn.functional.interpolate(blobs, (kh, kw), mode="bilinear")[:, 0] * 3
    logits += 0.3 * torch.randn(60, kh, kw, generator=generator) - 3 * torch.rand(60, 1, 1, generator=generator)
    logits[0] = -1.0  # empty
    logits[1] = -1.0
    logits[1, -1, -1] = 0.5  # only the padding cell past the image's corner
    logits[2] = -1.0
    logits[2, 3, 4] = 0.01  # one faint cell: it fades out once upsampled
    upsampled = _upscale_logits(logits[:, None], 4, input_size, out_size)[:, 0] > 0

    boxes, found = _full_resolution_boxes(logits, 4, input_size, out_size, 0.0)

    assert found[0] and boxes[0].tolist() == [0, 0, 0, 0]
    assert found.sum() >= 50  # the edge search settles nearly every mask
    # Round-off may tie a pixel to the threshold: allow it for one mask in a hundred.
    assert (boxes != batched_mask_to_box(upsampled))[found].any(1).sum() <= len(logits) // 100


def test_pruning_keeps_only_points_inside_the_dilated_coarse_foreground(tiny_sam):
    coarse = np.full((14, 14), 0.1, dtype=np.float32)
    coarse[5:8, 6:9] = 0.9  # 3x3 foreground cells; dilated by one cell: rows 4..8, cols 5..9
    config = CandidateConfig(points_per_side=14, prune_with_coarse_map=True, prune_threshold=0.5, prune_dilation=1)
    generator = GridCandidateGenerator(tiny_sam, config)
    # A 14x14 grid on a 140x280 image puts exactly one point in each coarse cell.
    points = generator.grid_points((140, 280), coarse)
    rows, cols = (points[:, 1] // 10).astype(int), (points[:, 0] // 20).astype(int)
    assert len(points) == 5 * 5
    assert rows.min() == 4 and rows.max() == 8 and cols.min() == 5 and cols.max() == 9

    candidates = generator.generate(synthetic_image(140, 280, 3), coarse_map=coarse)
    assert candidates.num_grid_points == 25
    assert all(any(np.allclose(p, q) for q in points) for p in candidates.point_coords)


def test_pruning_is_on_by_default_and_can_be_turned_off(tiny_sam):
    # On by default since it cost no GT-known Loc on the synthetic val split (bench_quality.py).
    assert CandidateConfig().prune_with_coarse_map is True
    coarse = np.zeros((14, 14), dtype=np.float32)
    coarse[0, 0] = 1.0
    image = synthetic_image(64, 64, 4)
    pruned = GridCandidateGenerator(tiny_sam, CandidateConfig(points_per_side=4)).generate(image, coarse_map=coarse)
    assert pruned.num_grid_points < 16
    every = CandidateConfig(points_per_side=4, prune_with_coarse_map=False)
    assert GridCandidateGenerator(tiny_sam, every).generate(image, coarse_map=coarse).num_grid_points == 16


def test_reference_option_resizes_to_224_and_reports_the_original_frame(tiny_sam):
    image = synthetic_image(120, 300, 5)
    config = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, reference_resize_224=True)
    exact = GridCandidateGenerator(tiny_sam, CandidateConfig(mode="exact", **config)).generate(image)
    fast = GridCandidateGenerator(tiny_sam, CandidateConfig(mode="fast", **config)).generate(image)
    assert exact.masks.shape[1:] == (120, 300)
    assert fast.masks.shape[1:] == (64, 64)  # SAM saw a square image
    assert fast.full_resolution_mask(0).shape == (120, 300)
    assert exact.point_coords.max(0)[0] < 300 and exact.point_coords.max(0)[1] < 120


def test_stage_timings_are_recorded(tiny_sam):
    candidates = GridCandidateGenerator(tiny_sam, CandidateConfig(points_per_side=4)).generate(synthetic_image(64, 96, 6))
    assert set(candidates.timings) == {"embed", "decode", "filter"}
    assert all(t >= 0 for t in candidates.timings.values())


def test_tiny_checkpoint_round_trips(tiny_sam, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(tiny_sam.state_dict(), path)
    loaded = build_sam("tiny", path)
    image = synthetic_image(96, 128, 7)
    config = CandidateConfig(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    a = GridCandidateGenerator(tiny_sam, config).generate(image)
    b = GridCandidateGenerator(loaded, config).generate(image)
    assert np.array_equal(a.masks, b.masks)
    assert np.array_equal(a.pred_ious, b.pred_ious)


def test_a_cpu_decodes_a_pass_in_pieces_with_the_same_candidates(tiny_sam, monkeypatch):
    import pro2sam.candidates as candidates

    image = synthetic_image(180, 240, 0)
    config = CandidateConfig(mode="fast", **FILTERS)
    whole = GridCandidateGenerator(tiny_sam, config)
    assert whole.decoder.batch_size == whole.prompts_per_pass == config.points_per_batch  # a small model fits
    assert whole.decoder.tail_cells == candidates.CPU_TAIL_CELLS
    monkeypatch.setattr(candidates, "CPU_PASS_BYTES", 3 * whole.decoder.bytes_per_prompt(4))
    monkeypatch.setattr(candidates, "CPU_TAIL_CELLS", 5)
    pieces = GridCandidateGenerator(tiny_sam, config)
    assert (pieces.decoder.batch_size, pieces.prompts_per_pass, pieces.decoder.tail_cells) == (3, 256, 5)
    a, b = whole.generate(image), pieces.generate(image)
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(a.pred_ious, b.pred_ious, atol=PRED_IOU_ATOL)
    assert all(mask_iou(x, y) >= 0.99 for x, y in zip(a.masks, b.masks))


def test_a_small_memory_budget_decodes_in_smaller_passes_with_the_same_candidates(tiny_sam):
    image = synthetic_image(180, 240, 0)
    config = CandidateConfig(mode="fast", **FILTERS)
    roomy = GridCandidateGenerator(tiny_sam, config)
    tight = GridCandidateGenerator(tiny_sam, replace(config, memory_budget_mb=1))
    assert tight.prompts_per_pass < roomy.prompts_per_pass == config.points_per_batch
    assert tight.decoder.batch_size <= tight.prompts_per_pass
    a, b = roomy.generate(image), tight.generate(image)
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(a.pred_ious, b.pred_ious, atol=PRED_IOU_ATOL)
    assert all(mask_iou(x, y) >= 0.99 for x, y in zip(a.masks, b.masks))


def test_a_generator_that_adopts_an_encoded_image_gives_its_own_candidates_without_encoding(tiny_sam):
    """pro2sam tune: one encoding, several filter / pruning settings decoded from it."""
    image = synthetic_image(180, 240, 0)
    first = GridCandidateGenerator(tiny_sam, CandidateConfig(mode="fast", **FILTERS))
    other = GridCandidateGenerator(tiny_sam, CandidateConfig(mode="fast", pred_iou_thresh=0.0, stability_score_thresh=0.0))
    first.set_image(image)
    calls = []
    handle = tiny_sam.image_encoder.register_forward_hook(lambda m, args, out: calls.append(1))
    try:
        other.adopt_image(first)
        adopted = other.generate(None)
    finally:
        handle.remove()
    alone = other.generate(image)
    assert calls == [] and len(adopted) == len(alone) > 0
    np.testing.assert_array_equal(adopted.masks, alone.masks)
    with pytest.raises(ValueError, match="encode alike"):
        GridCandidateGenerator(tiny_sam, CandidateConfig(reference_resize_224=True)).adopt_image(first)


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_relaxing_the_filters_when_none_passes_gives_the_unfiltered_candidates(tiny_sam, mode):
    """An image where no mask passes SAM's filters: with relaxing on, its candidates are those of
    the filters switched off; with it off (the reference), none."""
    image = synthetic_image(180, 240, 0)
    impossible = dict(points_per_side=8, pred_iou_thresh=1.0, stability_score_thresh=1.0, mode=mode)
    strict = GridCandidateGenerator(tiny_sam, CandidateConfig(**impossible)).generate(image)
    relaxed = GridCandidateGenerator(tiny_sam, CandidateConfig(**impossible, relax_filters_when_empty=True)).generate(image)
    off = GridCandidateGenerator(
        tiny_sam, CandidateConfig(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, mode=mode)
    ).generate(image)
    assert len(strict) == 0 and len(relaxed) == len(off) > 0
    np.testing.assert_array_equal(relaxed.masks, off.masks)
    np.testing.assert_array_equal(relaxed.pred_ious, off.pred_ious)


def test_relaxing_the_filters_changes_nothing_where_a_mask_passes_them(tiny_sam):
    image = synthetic_image(180, 240, 0)
    plain = GridCandidateGenerator(tiny_sam, CandidateConfig(mode="fast", **FILTERS)).generate(image)
    relaxed = GridCandidateGenerator(tiny_sam, CandidateConfig(mode="fast", relax_filters_when_empty=True, **FILTERS)).generate(image)
    off = GridCandidateGenerator(
        tiny_sam, CandidateConfig(mode="fast", **{**FILTERS, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0})
    ).generate(image)
    assert 0 < len(relaxed) == len(plain) < len(off)
    np.testing.assert_array_equal(relaxed.masks, plain.masks)


def test_a_batch_of_images_gives_each_images_own_candidates(tiny_sam):
    """One image-encoder call for the batch; every image as if generated alone."""
    images = [synthetic_image(h, w, seed) for h, w, seed in IMAGES]
    generator = GridCandidateGenerator(tiny_sam, CandidateConfig(mode="fast", **FILTERS))
    calls = []
    handle = tiny_sam.image_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        batch = list(generator.generate_batch(images))
    finally:
        handle.remove()
    assert calls == [len(images)]
    for image, got in zip(images, batch):
        alone = generator.generate(image)
        assert got.image_size == image.shape[:2] and len(got) == len(alone) > 0
        np.testing.assert_allclose(got.pred_ious, alone.pred_ious, atol=PRED_IOU_ATOL)
        assert all(mask_iou(x, y) >= 0.99 for x, y in zip(got.masks, alone.masks))


def test_bfloat16_moves_masks_only_at_their_edges(tiny_sam):
    """Filters and NMS off, so that each prompt's three masks are compared one to one."""
    image = synthetic_image(180, 240, 0)
    every_mask = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    fp32 = GridCandidateGenerator(tiny_sam, CandidateConfig(**every_mask)).generate(image)
    bf16 = GridCandidateGenerator(tiny_sam, CandidateConfig(dtype="bfloat16", **every_mask)).generate(image)
    a, b = by_prompt(fp32), by_prompt(bf16)
    shared = sorted(a.keys() & b.keys())
    assert len(shared) >= 0.9 * 48
    # bfloat16 keeps 8 bits of mantissa: predicted IoUs (order 1) move by ~1e-2, and the pixels
    # whose logit is within that of the threshold may flip
    assert max(abs(fp32.pred_ious[a[k]] - bf16.pred_ious[b[k]]) for k in shared) < 0.05
    assert np.median([mask_iou(fp32.masks[a[k]], bf16.masks[b[k]]) for k in shared]) >= 0.95


@pytest.mark.parametrize("dtype, encoder_dtype", [("bfloat16-encoder", torch.bfloat16), ("float16-encoder", torch.float16)])
def test_an_encoder_dtype_runs_the_encoder_in_it_and_decodes_in_float32(tiny_sam, dtype, encoder_dtype):
    """dtype="bfloat16-encoder" / "float16-encoder": the image encoder under that autocast, its
    embedding decoded in float32, so the decoder's work is that of float32 on a slightly
    different embedding; "bfloat16" runs both under autocast."""
    image = synthetic_image(180, 240, 0)
    every_mask = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = (output[0] if isinstance(output, tuple) else output).dtype
        return hook

    handles = [tiny_sam.image_encoder.patch_embed.register_forward_hook(record("encoder")),
               tiny_sam.mask_decoder.iou_prediction_head.register_forward_hook(record("decoder"))]  # fmt: skip
    try:
        mixed = GridCandidateGenerator(tiny_sam, CandidateConfig(dtype=dtype, **every_mask))
        got = mixed.generate(image)
        assert seen == {"encoder": encoder_dtype, "decoder": torch.float32}
        both = GridCandidateGenerator(tiny_sam, CandidateConfig(dtype="bfloat16", **every_mask))
        both.generate(image)
        assert seen == {"encoder": torch.bfloat16, "decoder": torch.bfloat16}
    finally:
        for h in handles:
            h.remove()
    # the same as decoding the encoder's embedding by hand in float32
    fp32 = GridCandidateGenerator(tiny_sam, CandidateConfig(**every_mask))
    fp32.set_image(image)
    with torch.inference_mode(), torch.autocast("cpu", dtype=encoder_dtype):
        embedding = fp32.segmenter.encode([fp32._prepare(image)[0]])[0]
    fp32._set_embedding(embedding)
    by_hand = fp32.generate(None)
    np.testing.assert_allclose(got.pred_ious, by_hand.pred_ious, atol=1e-5)
    assert all(np.array_equal(x, y) for x, y in zip(got.masks, by_hand.masks))


def test_an_encoder_that_overflows_float16_is_refused_in_words(tiny_sam, monkeypatch):
    generator = GridCandidateGenerator(tiny_sam, CandidateConfig(dtype="float16-encoder"))
    encode = generator.segmenter.encode

    def overflowing(pixels):
        out = encode(pixels)
        out[0].embedding[0, 0, 0, 0] = float("inf")
        return out

    monkeypatch.setattr(generator.segmenter, "encode", overflowing)
    with pytest.raises(FloatingPointError, match="overflowed float16.*bfloat16-encoder"):
        generator.generate(synthetic_image(96, 128, 0))


@pytest.mark.parametrize("filters", [None, (0.88, 0.95), (0.0, 0.0)], ids=["shipped-sam", "official-relaxed", "off"])
def test_fast_path_keeps_the_exact_candidates_of_a_trained_sam(filters):
    """The shipped SAM leaves many masks near its stability threshold and many small overlapping
    boxes (with the filters off, dozens, where a low-res box is off by a cell per side: NMS
    decided 11 of 12 images otherwise before every box was taken at full resolution): the fast
    path keeps the exact path's candidates, with the same boxes."""
    from pro2sam import shipped
    from pro2sam.synthetic import make_scene

    sam = build_sam(shipped.SAM_VARIANT, shipped.sam_checkpoint())
    thresholds = {} if filters is None else dict(pred_iou_thresh=filters[0], stability_score_thresh=filters[1])
    config = CandidateConfig.for_variant(shipped.SAM_VARIANT, points_per_side=16, prune_with_coarse_map=False,
                                         relax_filters_when_empty=True, **thresholds)
    for index in range(3):
        image = make_scene(shipped.SYNTHETIC_SEED, "test", index).image
        exact = GridCandidateGenerator(sam, replace(config, mode="exact")).generate(image)
        fast = GridCandidateGenerator(sam, config).generate(image)
        exact_keys, fast_keys = by_prompt(exact), by_prompt(fast)
        assert fast_keys.keys() == exact_keys.keys() and len(exact) > 0
        # boxes from the full-resolution lines: the upsampled masks' boxes up to float rounding
        for key, i in fast_keys.items():
            assert np.abs(fast.boxes_xyxy[i] - exact.boxes_xyxy[exact_keys[key]]).max() <= 1
