"""SAM 2.1 through the stage-2 seam, against SAM 2's own ``SAM2AutomaticMaskGenerator``.

A random-weight SAM 2.1 hiera tiny (seed 0): the official architecture, its tensors those of the
1024 px build, run at a 256 px input (``image_size`` is a config value: Hiera interpolates its
positional embeddings and every feature size follows from it), sixteen times fewer pixels to
encode; the official 1024 px build reads the checkpoints. Its logits stay within about +-0.6 and
its predicted IoUs near 0.5, so the default filters (0.8 / 0.95 with offset 1.0) keep nothing
and its masks' boxes mostly cover the frame (NMS keeps one). The thresholds here are lowered so
that masks exist, and NMS is off where every mask is compared: these tests check that we decode,
filter and upsample as SAM 2's code does, not that masks are good.
"""

import numpy as np
import pytest
import torch
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from test_candidates import mask_iou, synthetic_image

from pro2sam.candidates import CandidateConfig, GridCandidateGenerator
from pro2sam.checkpoints import CheckpointError
from pro2sam.sam import build_sam, build_sam2_model

# Every mask of a 4x4 grid (48) reaches the end: predicted-IoU and stability filters off, NMS off;
# an offset of 0.05 because the random logits are of order 0.5 (the default 1.0 gives 0 always).
EVERY_MASK = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, stability_score_offset=0.05,
                  box_nms_thresh=1.0)  # fmt: skip
# Our decoder reorders SAM 2's float32 sums: predicted IoUs move by ~1e-7; 1e-4 leaves room.
PRED_IOU_ATOL = 1e-4
# SAM input side of the tests' model, a multiple of 32 (Hiera's strides reach 32; its first
# windows are 8 tokens of stride 4).
IMAGE_SIZE = 256


@pytest.fixture(scope="module")
def sam2_tiny():
    return build_sam2_model("sam2.1_hiera_tiny", seed=0, hydra_overrides=(f"++model.image_size={IMAGE_SIZE}",))


def sam2_generator(model, **options) -> SAM2AutomaticMaskGenerator:
    """SAM 2's own generator of ``model``; its predictor's backbone feature sizes are fixed for
    1024 px (``SAM2ImagePredictor._bb_feat_sizes``, facebookresearch/sam2 issue 138), so they are
    set to ``model``'s: strides 4, 8 and 16 of its ``image_size``."""
    generator = SAM2AutomaticMaskGenerator(model, **options)
    generator.predictor._bb_feat_sizes = [(model.image_size // s,) * 2 for s in (4, 8, 16)]
    return generator


def by_point(records):
    """{(x, y): [(predicted IoU, mask, stability), ...]} of SAM2AutomaticMaskGenerator's records."""
    out = {}
    for r in records:
        out.setdefault(tuple(np.round(r["point_coords"][0], 6)), []).append((r["predicted_iou"], r["segmentation"],
                                                                             r["stability_score"]))
    return out


def test_exact_path_gives_sam2s_own_masks_for_every_prompt(sam2_tiny):
    image = synthetic_image(120, 160, 0)
    expected = by_point(sam2_generator(sam2_tiny, **EVERY_MASK).generate(image))
    exact = GridCandidateGenerator(sam2_tiny, CandidateConfig(mode="exact", **EVERY_MASK)).generate(image)
    fast = GridCandidateGenerator(sam2_tiny, CandidateConfig(mode="fast", **EVERY_MASK)).generate(image)

    assert len(exact) == sum(len(v) for v in expected.values()) == 48
    assert fast.masks.shape[1:] == (IMAGE_SIZE // 4,) * 2  # SAM 2's low-res grid covers the whole (square-resized) image
    for candidates in (exact, fast):
        for i in range(len(candidates)):
            # the reference's mask of the same point with this predicted IoU (three per point)
            iou, mask, stability = min(expected[tuple(np.round(candidates.point_coords[i], 6))],
                                       key=lambda e: abs(e[0] - candidates.pred_ious[i]))
            assert candidates.pred_ious[i] == pytest.approx(iou, abs=PRED_IOU_ATOL)
            assert mask_iou(candidates.full_resolution_mask(i), mask) >= 0.99
            if candidates is exact:
                assert candidates.stability_scores[i] == pytest.approx(stability, abs=2 / max(1, mask.sum()))


def test_exact_path_keeps_what_sam2s_generator_keeps_with_its_filters_on(sam2_tiny):
    image = synthetic_image(140, 100, 1)
    filters = dict(points_per_side=4, pred_iou_thresh=0.5, stability_score_thresh=0.2, stability_score_offset=0.05)
    expected = sam2_generator(sam2_tiny, **filters).generate(image)
    ours = GridCandidateGenerator(sam2_tiny, CandidateConfig(mode="exact", **filters)).generate(image)
    assert len(ours) == len(expected) > 0
    for i, ann in enumerate(expected):  # both in NMS order
        assert np.allclose(ours.point_coords[i], ann["point_coords"][0])
        assert ours.pred_ious[i] == pytest.approx(ann["predicted_iou"], abs=PRED_IOU_ATOL)
        assert mask_iou(ours.masks[i], ann["segmentation"]) >= 0.99
        x, y, bw, bh = ann["bbox"]
        assert np.abs(ours.boxes_xyxy[i] - [x, y, x + bw, y + bh]).max() <= 1


def test_sam2_checkpoint_round_trips_in_the_official_layout_and_another_architecture_is_refused(sam2_tiny, tmp_path):
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": sam2_tiny.state_dict()}, path)  # the official files keep the weights under "model"
    loaded = build_sam("sam2.1_hiera_tiny", path)  # the official build, at 1024 px: strictly the same tensors
    assert loaded.image_size == 1024
    assert all(torch.equal(a, b) for a, b in zip(sam2_tiny.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(CheckpointError, match="does not fit the sam2.1_hiera_small architecture"):
        build_sam("sam2.1_hiera_small", path)


def test_label_runs_end_to_end_with_a_sam2_checkpoint_file(sam2_tiny, tiny_checkpoints, tmp_path):
    """``pro2sam label --sam sam2.1_hiera_tiny --sam-checkpoint FILE`` on two small scenes: a row
    per image, each with a box inside it, and the SAM 2 weights' SHA-256 recorded."""
    import subprocess
    import sys

    from helpers import output_rows, write_scenes

    from pro2sam.output import LabelsOutput
    from pro2sam.storage import sha256_file

    gt_dir, _ = tiny_checkpoints
    sam_path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": sam2_tiny.state_dict()}, sam_path)
    write_scenes(tmp_path / "images", 2)
    output = tmp_path / "labels"
    proc = subprocess.run(
        [sys.executable, "-m", "pro2sam", "label", "--input", str(tmp_path / "images"), "--output", str(output),
         "--gtformer", str(gt_dir), "--sam", "sam2.1_hiera_tiny", "--sam-checkpoint", str(sam_path),
         "--points-per-side", "2", "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--actors", "1"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = output_rows(output)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for r in rows:
        x0, y0, x1, y1 = r["box_xyxy"]
        assert 0 <= x0 <= x1 < r["width"] and 0 <= y0 <= y1 < r["height"]
    models = set(LabelsOutput(str(output)).read_table(["sam_model"]).column("sam_model").to_pylist())
    assert models == {f"sam2.1_hiera_tiny:{sha256_file(sam_path)}"}


def test_sam2_prompts_none_of_whose_masks_pass_the_iou_filter_decode_to_nothing(sam2_tiny):
    """With the predicted-IoU filter above every mask, no mask is upscaled (and none is made)."""
    from pro2sam.grid_decoder import GridDecoder

    torch.manual_seed(0)
    side = IMAGE_SIZE // 16  # the image embedding's; the high-res features are 4x and 2x finer
    embedding = torch.randn(1, 256, side, side)
    high_res = [torch.randn(1, 32, 4 * side, 4 * side), torch.randn(1, 64, 2 * side, 2 * side)]
    coords, labels = torch.rand(5, 1, 2) * IMAGE_SIZE, torch.ones(5, 1, dtype=torch.int)
    for fast in (True, False):
        decoder = GridDecoder(sam2_tiny, fast=fast)
        decoder.set_image_embedding(embedding, high_res)
        logits, iou, kept = decoder.decode_masks_above(coords, labels, 1.0, region=(10, 12))
        assert logits.shape == (0, 3, 40, 48) and iou.shape == (0, 3) and len(kept) == 0
        logits, iou, kept = decoder.decode_masks_above(coords, labels, 0.0, region=(10, 12))
        assert logits.shape == (5, 3, 40, 48) and kept.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("tail_cells", [7, 130, 250])
def test_sam2s_tail_in_cache_sized_pieces_gives_the_whole_batchs_logits(sam2_tiny, tail_cells):
    """The high-resolution features are added per sub-pixel: each piece takes its own cells' terms."""
    from pro2sam.grid_decoder import GridDecoder

    torch.manual_seed(0)
    side = IMAGE_SIZE // 16
    embedding = torch.randn(1, 256, side, side)
    high_res = [torch.randn(1, 32, 4 * side, 4 * side), torch.randn(1, 64, 2 * side, 2 * side)]
    coords, labels = torch.rand(5, 1, 2) * IMAGE_SIZE, torch.ones(5, 1, dtype=torch.int)
    pieces, whole = GridDecoder(sam2_tiny, tail_cells=tail_cells), GridDecoder(sam2_tiny)
    for decoder in (pieces, whole):
        decoder.set_image_embedding(embedding, high_res)
    got, got_iou = pieces.decode(coords, labels, region=(10, 12))
    want, want_iou = whole.decode(coords, labels, region=(10, 12))
    assert got.shape == want.shape == (5, 3, 40, 48)
    torch.testing.assert_close(got_iou, want_iou, rtol=0, atol=PRED_IOU_ATOL)
    # logits of order 1: the same sums, at most reordered
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
