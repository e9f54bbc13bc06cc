"""The one renderer of overlays and coarse maps, used by the gallery and the evaluation report."""

import numpy as np
import pytest

from pro2sam.rle import encode_mask
from pro2sam.visualize import BOX_RGB, GT_BOX_RGB, GTFORMER_BOX_RGB, render_coarse_map, render_overlay


def test_render_overlay_tints_the_mask_and_draws_the_box():
    mask = np.zeros((48, 64), bool)
    mask[10:30, 20:50] = True
    image = np.full((48, 64, 3), 90, np.uint8)
    row = {"mask_rle": encode_mask(mask), "box_xyxy": [20, 10, 49, 29]}
    thumb = render_overlay(image, row, thumb_size=64)
    assert thumb.shape == (48, 64, 3)
    assert tuple(thumb[20, 35]) != (90, 90, 90)  # inside the mask: tinted
    assert tuple(thumb[40, 5]) == (90, 90, 90)  # background untouched
    assert tuple(thumb[10, 35]) == (255, 230, 0)  # the box's top edge


def test_render_coarse_map_is_hot_where_the_map_is_high():
    coarse = np.zeros((14, 14), np.float32)
    coarse[:7, :7] = 1.0  # top-left quadrant of the image
    image = np.full((48, 64, 3), 90, np.uint8)
    heat = render_coarse_map(image, coarse.ravel().tolist(), (64, 48))
    assert heat.shape == (48, 64, 3) and heat.dtype == np.uint8
    red, green, blue = (int(v) for v in heat[5, 5])
    assert red > 2 * blue  # JET at 1: red
    red, green, blue = (int(v) for v in heat[42, 58])
    assert blue > 2 * red  # JET at 0: blue


def test_render_coarse_map_refuses_a_map_that_is_not_square():
    with pytest.raises(ValueError, match="square"):
        render_coarse_map(np.zeros((8, 8, 3), np.uint8), [0.5] * 15, (8, 8))


def test_render_overlay_draws_the_ground_truth_and_gtformer_boxes_under_pro2sams():
    image = np.full((48, 64, 3), 90, np.uint8)
    row = {"box_xyxy": [20, 10, 49, 29]}
    picture = render_overlay(image, row, gt_boxes=np.array([[2.0, 2.0, 60.0, 44.0]]), gtformer_box=[20, 10, 40, 40])
    assert tuple(picture[2, 30]) == GT_BOX_RGB
    assert tuple(picture[40, 30]) == GTFORMER_BOX_RGB  # its bottom edge, below Pro2SAM's box
    assert tuple(picture[10, 45]) == BOX_RGB  # Pro2SAM's top edge, drawn over GTFormer's


def test_render_overlay_enlarges_small_images_by_a_whole_factor_and_never_shrinks_without_a_thumb_size():
    image = np.full((48, 64, 3), 90, np.uint8)
    assert render_overlay(image, {}, thumb_size=None, min_size=256).shape == (192, 256, 3)
    big = np.zeros((300, 500, 3), np.uint8)
    assert render_overlay(big, {}, thumb_size=None, min_size=256).shape == (300, 500, 3)
    assert render_overlay(big, {}).shape == (154, 256, 3)  # the gallery's thumbnail
