"""Mask matching on planted candidate sets whose right answer is known."""

from dataclasses import replace

import numpy as np
import pytest

from pro2sam.matching import MatchConfig, boxed_mask, coarse_fallback, mask_box, match_masks, min_component_area


def rect_mask(shape, x0, y0, x1, y1):
    """Bool mask with the inclusive rectangle [x0..x1] x [y0..y1] set."""
    m = np.zeros(shape, dtype=bool)
    m[y0 : y1 + 1, x0 : x1 + 1] = True
    return m


def coarse_with_object(x0, y0, x1, y1, high=0.9, low=0.05):
    """14x14 coarse map, high on the inclusive cell rectangle, low elsewhere."""
    m = np.full((14, 14), low, dtype=np.float32)
    m[y0 : y1 + 1, x0 : x1 + 1] = high
    return m


def test_the_candidate_covering_the_coarse_foreground_wins():
    coarse = coarse_with_object(4, 4, 9, 9)  # cells 4..9 of 14 on a 224 image = pixels 64..159
    right = rect_mask((224, 224), 64, 64, 159, 159)
    too_small = rect_mask((224, 224), 90, 90, 120, 120)
    elsewhere = rect_mask((224, 224), 0, 170, 60, 223)
    match = match_masks(coarse, np.stack([too_small, right, elsewhere]), np.array([0.99, 0.9, 0.95]))
    assert match.index == 1
    assert match.match_score > match.scores[0] > match.scores[2]


def test_iou_score_equals_hand_computed_value_on_the_coarse_grid():
    coarse = coarse_with_object(0, 0, 3, 3)  # 16 foreground cells
    # a mask covering exactly cells 0..1 x 0..3 of a 14x14 grid, given at 14x14 resolution
    cand = rect_mask((14, 14), 0, 0, 1, 3)
    match = match_masks(coarse, cand[None], np.array([0.9]), MatchConfig(min_component_area=0))
    assert match.match_score == pytest.approx(8 / 16)


def test_dice_and_soft_iou_are_selectable():
    coarse = coarse_with_object(0, 0, 3, 3, high=0.5, low=0.0)
    cand = rect_mask((14, 14), 0, 0, 1, 3)[None]
    dice = match_masks(coarse, cand, np.array([0.9]), MatchConfig(similarity="dice", min_component_area=0))
    soft = match_masks(coarse, cand, np.array([0.9]), MatchConfig(similarity="soft-iou", min_component_area=0))
    assert dice.match_score == pytest.approx(2 * 8 / (8 + 16))
    # fuzzy Jaccard: sum(min) / sum(max) = (8 * 0.5) / (8 * 1 + 8 * 0.5)
    assert soft.match_score == pytest.approx(4 / 12)
    with pytest.raises(ValueError, match="unknown similarity"):
        MatchConfig(similarity="cosine")


def test_full_frame_candidate_is_rejected_even_when_it_scores_best():
    coarse = np.full((14, 14), 0.9, dtype=np.float32)  # the map says "everything"
    full = np.ones((224, 224), dtype=bool)
    part = rect_mask((224, 224), 20, 20, 200, 200)
    match = match_masks(coarse, np.stack([full, part]), np.array([0.99, 0.5]))
    assert match.index == 1
    assert match.rejected[0] == "box spans the whole frame"
    assert np.isnan(match.scores[0])


def test_mask_without_a_component_of_the_minimum_area_is_rejected():
    coarse = coarse_with_object(0, 0, 13, 13)
    speckle = np.zeros((224, 224), dtype=bool)
    speckle[::8, ::8] = True  # many single pixels, no component of 10 px
    match = match_masks(coarse, speckle[None], np.array([0.99]))
    assert match.index is None
    assert match.rejected[0] == "no component of the minimum area"


def test_minimum_area_scales_with_resolution():
    assert min_component_area((224, 224), 10) == 10
    assert min_component_area((448, 448), 10) == 40
    assert min_component_area((56, 56), 10) == 1


def test_ties_go_to_the_higher_predicted_iou():
    coarse = coarse_with_object(2, 2, 6, 6)
    a = rect_mask((224, 224), 32, 32, 111, 111)
    match = match_masks(coarse, np.stack([a, a.copy()]), np.array([0.90, 0.97]))
    assert match.scores[0] == match.scores[1]
    assert match.index == 1


def test_empty_gallery_returns_no_choice():
    match = match_masks(coarse_with_object(2, 2, 6, 6), np.zeros((0, 64, 64), bool), np.zeros(0))
    assert match.index is None and len(match.scores) == 0


def test_fallback_box_is_the_largest_coarse_component_in_image_pixels():
    coarse = np.zeros((14, 14), dtype=np.float32)
    coarse[2:4, 2:4] = 1.0  # small blob
    coarse[7:12, 6:13] = 1.0  # large blob: cells x 6..12, y 7..11
    mask, box = coarse_fallback(coarse, (280, 140), threshold=0.5)  # H=280, W=140: 20 px rows, 10 px cols
    x0, y0, x1, y1 = box
    assert mask.shape == (280, 140)
    assert abs(x0 - 60) <= 6 and abs(x1 - 129) <= 6
    assert abs(y0 - 140) <= 12 and abs(y1 - 239) <= 12
    assert not mask[:80, :80].any()  # the small blob is not part of the fallback


def test_fallback_on_a_constant_map_is_the_whole_image():
    mask, box = coarse_fallback(np.full((14, 14), 0.3, np.float32), (50, 70))
    assert box == (0, 0, 69, 49) and mask.all()


def test_mask_box_ignores_specks_below_the_minimum_area():
    m = rect_mask((224, 224), 50, 60, 150, 170)
    m[5, 5] = True  # one-pixel speck far away
    assert mask_box(m) == (50, 60, 150, 170)
    two = m | rect_mask((224, 224), 180, 10, 200, 30)  # second real component joins the union
    assert mask_box(two) == (50, 10, 200, 170)
    assert mask_box(np.zeros((10, 10), bool)) is None


def test_boxed_mask_keeps_the_components_its_box_holds_and_leaves_out_the_specks():
    body, piece = rect_mask((224, 224), 50, 60, 150, 170), rect_mask((224, 224), 180, 10, 200, 30)
    speck = rect_mask((224, 224), 5, 5, 6, 6)  # 4 px, under the 10-pixel minimum
    kept, box = boxed_mask(body | piece | speck)
    assert np.array_equal(kept, body | piece) and box == (50, 10, 200, 170)
    ys, xs = np.nonzero(kept)
    assert box == (xs.min(), ys.min(), xs.max(), ys.max())
    only_specks = speck | rect_mask((224, 224), 100, 100, 101, 101)  # nothing reaches it: all kept
    assert np.array_equal(boxed_mask(only_specks)[0], only_specks)
    assert boxed_mask(only_specks)[1] == (5, 5, 101, 101)
    assert boxed_mask(np.zeros((10, 10), bool)) is None


# ---------------------------------------------------------------- part-to-object completion


def part_and_object():
    """A 96x96-pixel body (cells 3..8) with a 32x32 part at its corner (cells 7..8); the coarse
    map fires on the part only, as a classifier's map does. Candidates: part, body, a distractor
    as large as the body elsewhere, and the body plus most of the frame (body and background)."""
    coarse = coarse_with_object(7, 7, 8, 8)  # pixels 112..143
    body = rect_mask((224, 224), 48, 48, 143, 143)
    part = rect_mask((224, 224), 112, 112, 143, 143)
    distractor = rect_mask((224, 224), 150, 10, 215, 100)
    body_and_background = rect_mask((224, 224), 0, 0, 200, 223)
    return coarse, np.stack([part, body, distractor, body_and_background]), np.array([0.95, 0.9, 0.9, 0.8])


def test_plain_matching_takes_the_part_the_map_fires_on():
    coarse, candidates, ious = part_and_object()
    match = match_masks(coarse, candidates, ious, MatchConfig(part_to_object=False))
    assert match.index == 0 and not match.completed


def test_the_authors_rule_is_the_default_and_part_to_object_is_left_to_tune():
    # Part-to-object loses where the map covers the object (benchmarks/README.md, "Which rule by
    # default"): the package defaults to plain IoU and pro2sam tune turns completion on.
    coarse, candidates, ious = part_and_object()
    assert not MatchConfig().part_to_object
    assert match_masks(coarse, candidates, ious).index == 0


def test_part_to_object_takes_the_body_that_contains_the_best_matching_part():
    coarse, candidates, ious = part_and_object()
    # IoU with the map: part 1.0; body 1024/9216 = 0.111; background-and-body 1024/45024 = 0.023.
    match = match_masks(coarse, candidates, ious, MatchConfig(part_to_object=True, agreement=0.1))
    assert match.index == 1 and match.best_match == 0 and match.completed
    assert match.match_score == pytest.approx(1024 / 9216)


def test_part_to_object_does_not_climb_to_a_container_that_disagrees_with_the_map():
    coarse, candidates, ious = part_and_object()
    strict = match_masks(coarse, candidates, ious, MatchConfig(part_to_object=True, agreement=0.2))
    assert strict.index == 0 and not strict.completed  # the body's 0.111 < 0.2 x 1.0
    loose = match_masks(coarse, candidates, ious, MatchConfig(part_to_object=True, agreement=0.02))
    assert loose.index == 3  # with almost no agreement asked, it climbs to body-and-background


def test_part_to_object_needs_containment_and_growth():
    coarse, candidates, ious = part_and_object()
    shifted_body = rect_mask((224, 224), 48, 48, 127, 127)  # holds a quarter of the part only
    match = match_masks(coarse, np.stack([candidates[0], shifted_body]), ious[:2], MatchConfig(part_to_object=True, agreement=0.05))
    assert match.index == 0
    slightly_larger = rect_mask((224, 224), 108, 108, 143, 143)  # contains the part, grows it by 1.27x
    match = match_masks(coarse, np.stack([candidates[0], slightly_larger]), ious[:2], MatchConfig(part_to_object=True, agreement=0.05))
    assert match.index == 0
    with pytest.raises(ValueError, match="min_growth"):
        MatchConfig(min_growth=0.5)


def test_full_resolution_decides_between_candidates_close_at_low_resolution():
    """At 28x28 both candidates cover the 4x4-cell object and spill by one row or column of
    cells (a tie); at full resolution the first spills by two columns. The one better at full
    resolution wins, with its mask."""
    from pro2sam.matching import match_at_full_resolution

    coarse = coarse_with_object(4, 4, 7, 7)
    low = np.stack([rect_mask((28, 28), 8, 8, 17, 15), rect_mask((28, 28), 8, 8, 15, 17)])
    full = {0: rect_mask((224, 224), 64, 64, 159, 127), 1: rect_mask((224, 224), 64, 64, 127, 143)}
    pred_ious = np.array([0.9, 0.8])
    plain = MatchConfig(part_to_object=False)  # the authors' rule, where full resolution decides
    at_low = match_masks(coarse, low, pred_ious, plain)
    assert at_low.index == 0 and at_low.scores[1] == at_low.match_score  # a tie, broken by pred_iou

    match, mask = match_at_full_resolution(coarse, low, pred_ious, full.__getitem__, plain)
    scored_full = match_masks(coarse, np.stack([full[0], full[1]]), pred_ious, plain)
    assert match.index == scored_full.index == 1
    assert match.match_score == scored_full.match_score
    assert np.array_equal(mask, full[1])


def test_full_resolution_is_asked_only_for_candidates_that_could_win():
    from pro2sam.matching import match_at_full_resolution

    coarse = coarse_with_object(4, 4, 9, 9)
    masks = np.stack([rect_mask((224, 224), 64, 64, 159, 159), rect_mask((224, 224), 0, 170, 60, 223)])
    asked = []

    def full(i):
        asked.append(i)
        return masks[i]

    match, mask = match_at_full_resolution(coarse, masks, np.array([0.9, 0.95]), full, MatchConfig(part_to_object=False))
    assert match.index == 0 and asked == [0] and np.array_equal(mask, masks[0])


def test_a_cache_kept_with_the_candidates_gives_every_rule_the_match_it_would_have_alone():
    """pro2sam tune matches each image's candidates under many rules: what the rules share is
    derived once (the cache), and each rule still gets its own answer."""
    from pro2sam.matching import match_masks

    rng = np.random.default_rng(3)
    masks = np.zeros((12, 56, 56), dtype=bool)
    for i, (y, x, r) in enumerate(zip(rng.integers(8, 48, 12), rng.integers(8, 48, 12), rng.integers(2, 20, 12))):
        yy, xx = np.mgrid[:56, :56]
        masks[i] = (yy - y) ** 2 + (xx - x) ** 2 <= r**2
    masks[3] = masks[2] | masks[4]  # a container of two others, for completion
    coarse = rng.random((14, 14)).astype(np.float32)
    pred_ious = rng.random(12)
    rules = [MatchConfig(), MatchConfig(part_to_object=True, containment=0.2, agreement=0.0),
             MatchConfig(similarity="dice"), MatchConfig(part_to_object=True, containment=0.9),
             MatchConfig(min_component_area=400.0), MatchConfig(container_to_object=True, object_mass=0.1)]
    cache: dict = {}
    for rule in rules:
        alone = match_masks(coarse, masks, pred_ious, rule)
        cached = match_masks(coarse, masks, pred_ious, rule, cache=cache)
        assert (cached.index, cached.best_match) == (alone.index, alone.best_match)
        np.testing.assert_array_equal(cached.scores, alone.scores)
        assert list(cached.rejected) == list(alone.rejected)
    assert len(cache) == 2  # one entry per set of rejection rules


@pytest.mark.parametrize("part_to_object", [False, True])
def test_no_candidates_or_only_empty_ones_choose_nothing_on_the_fast_path(part_to_object):
    """A grid pruned to nothing, or masks empty at low resolution, leave nothing to choose: the
    caller falls back to the coarse map (a crash here turned every such image into an error row)."""
    from pro2sam.matching import match_at_full_resolution

    config = MatchConfig(part_to_object=part_to_object)
    coarse = np.full((14, 14), 0.5, np.float32)

    def never(i):
        raise AssertionError("nothing should be upsampled")

    for masks in (np.zeros((0, 32, 32), bool), np.zeros((3, 32, 32), bool)):
        match, mask = match_at_full_resolution(coarse, masks, np.ones(len(masks)), never, config)
        assert match.index is None and mask is None


# ---------------------------------------------------------------- completion on a fixed grid


def test_majority_grid_marks_the_cells_that_hold_at_least_half_their_pixels():
    from pro2sam.matching import _majority

    rng = np.random.default_rng(5)
    for h, w, size in ((224, 224, 56), (157, 230, 64), (30, 41, 32), (10, 10, 3)):
        mask = rng.random((h, w)) < 0.4
        got = _majority(mask, size)
        assert got.shape == (size, size)
        for r in range(size):  # cells split the frame as adaptive pooling does: floor / ceil bounds
            r0, r1 = (r * h) // size, -(-((r + 1) * h) // size)
            for c in range(size):
                c0, c1 = (c * w) // size, -(-((c + 1) * w) // size)
                cell = mask[r0:r1, c0:c1]
                assert got[r, c] == (2 * cell.sum() >= cell.size), (h, w, size, r, c)


def part_and_bodies():
    """The map fires on a 32x32 class part (cells 7..8 of 14). Two bodies as SAM masks neighbouring
    regions: ``seamed`` holds the part but a one-pixel ring along the part's edge (the two masks'
    edges do not quite meet); ``beside`` stops where the part starts (it holds none of it)."""
    coarse = coarse_with_object(7, 7, 8, 8)
    part = rect_mask((224, 224), 112, 112, 143, 143)
    square = rect_mask((224, 224), 48, 48, 143, 143)
    seamed = square & ~(part & ~rect_mask((224, 224), 113, 113, 142, 142))
    beside = square & ~rect_mask((224, 224), 111, 111, 143, 143)
    return coarse, part, seamed, beside


def test_completion_on_a_coarse_grid_forgives_a_seam_and_invents_no_container():
    coarse, part, seamed, beside = part_and_bodies()
    ious = np.array([0.95, 0.9])
    pixel = MatchConfig(part_to_object=True, agreement=0.02, containment=0.95)
    grid = MatchConfig(part_to_object=True, agreement=0.02, containment=0.95, completion_size=14)
    # pixel by pixel the seamed body holds 30x30 of the part's 32x32 pixels (0.88 < 0.95)
    assert match_masks(coarse, np.stack([part, seamed]), ious, pixel).index == 0
    # on 16-pixel cells it holds each of the part's four cells (225 of their 256 pixels each)
    match = match_masks(coarse, np.stack([part, seamed]), ious, grid)
    assert match.index == 1 and match.best_match == 0
    # a body that holds none of the part holds none of its cells either
    assert match_masks(coarse, np.stack([part, beside]), ious, grid).index == 0
    assert match_masks(coarse, np.stack([part, beside]), ious, replace(grid, containment=0.2)).index == 0


def test_completion_grid_is_checked_and_left_to_tune():
    assert MatchConfig().completion_size is None
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="completion_size"):
            MatchConfig(completion_size=bad)


def test_the_fast_path_decides_completion_on_the_grid_as_the_exact_path_does():
    """match_at_full_resolution resizes the same full-resolution masks to the grid as the exact
    path does, whatever the low-resolution masks say, and a cache serves every grid its own bits."""
    from pro2sam.matching import match_at_full_resolution

    coarse, part, seamed, _ = part_and_bodies()
    full = np.stack([part, seamed, rect_mask((224, 224), 0, 0, 40, 40)])
    low = full[:, ::8, ::8]  # any low-resolution view: completion is decided on the full masks
    ious = np.array([0.95, 0.9, 0.5])
    cache: dict = {}
    for size in (None, 112, 28, 14, 7):
        rule = MatchConfig(part_to_object=True, agreement=0.02, containment=0.95, completion_size=size)
        exact = match_masks(coarse, full, ious, rule)
        fast, mask = match_at_full_resolution(coarse, low, ious, full.__getitem__, rule, cache=cache)
        assert (fast.index, fast.best_match) == (exact.index, exact.best_match), size
        assert np.array_equal(mask, full[exact.index])
    assert match_masks(coarse, full, ious, MatchConfig(part_to_object=True, agreement=0.02, containment=0.95, completion_size=14)).index == 1


# ---------------------------------------------------------------- container-to-object


def object_on_support():
    """A 64x64-pixel object (cells 4..7) sitting on a 128x32 support below it (cells 4..11 x
    8..9). The map covers the object (0.9) and, blurred as a 14x14 map is, lights the support
    dimly (0.3, still above the 0.2 binarisation). Candidates: the container (object + support,
    what SAM's grid also emits), the object, a 32x32 part of it, and the object without that
    part (the body)."""
    coarse = np.full((14, 14), 0.05, dtype=np.float32)
    coarse[8:10, 4:12] = 0.3
    coarse[4:8, 4:8] = 0.9
    obj = rect_mask((224, 224), 64, 64, 127, 127)
    support = rect_mask((224, 224), 64, 128, 191, 159)
    part = rect_mask((224, 224), 96, 64, 127, 95)
    return coarse, np.stack([obj | support, obj, part, obj & ~part]), np.array([0.9, 0.85, 0.95, 0.8])


def test_plain_matching_takes_the_container_the_blurred_map_favours():
    coarse, candidates, ious = object_on_support()
    # On the 14x14 grid the binarised map is the container's 32 cells; the object holds 16 of them.
    match = match_masks(coarse, candidates, ious)
    assert match.index == 0 and match.match_score == pytest.approx(1.0)
    assert match.scores[1] == pytest.approx(0.5)


def test_container_to_object_sheds_the_dimly_lit_support_and_stops_at_the_object():
    coarse, candidates, ious = object_on_support()
    match = match_masks(coarse, candidates, ious, MatchConfig(container_to_object=True))
    # The object keeps about 3/4 of the container's mass (>= 0.4) and the support it sheds is lit
    # about a third as brightly (<= 0.7). From the object nothing qualifies: the part keeps about
    # a fifth of the mass, and the body would shed a part lit as brightly as itself.
    assert match.index == 1 and match.best_match == 0 and match.completed
    assert match.match_score == pytest.approx(0.5)


def test_container_to_object_needs_the_mass_kept_and_the_shed_area_dim():
    coarse, candidates, ious = object_on_support()
    assert match_masks(coarse, candidates, ious, MatchConfig(container_to_object=True, object_mass=0.9)).index == 0
    assert match_masks(coarse, candidates, ious, MatchConfig(container_to_object=True, support_contrast=0.2)).index == 0
    brighter = coarse.copy()
    brighter[8:10, 4:12] = 0.9  # the map lights the support as much as the object: nothing to shed
    assert match_masks(brighter, candidates, ious, MatchConfig(container_to_object=True)).index == 0
    # A candidate that mostly lies outside the container is not inside it.
    shifted = np.roll(candidates[1], 112, axis=1)
    assert match_masks(coarse, np.stack([candidates[0], shifted]), ious[:2], MatchConfig(container_to_object=True)).index == 0


def test_container_to_object_and_part_to_object_are_one_or_the_other():
    with pytest.raises(ValueError, match="one of them"):
        MatchConfig(part_to_object=True, container_to_object=True)
    for bad in ({"object_mass": 1.5}, {"support_contrast": -0.1}, {"support_contrast": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MatchConfig(container_to_object=True, **bad)
    coarse, candidates, ious = object_on_support()
    brighter = coarse.copy()
    brighter[8:10, 4:12] = 0.9  # the support lit as the object: only a contrast past 1 sheds it
    assert match_masks(brighter, candidates, ious, MatchConfig(container_to_object=True, support_contrast=1.5)).index == 1
    assert match_masks(brighter, candidates, ious, MatchConfig(container_to_object=True, support_contrast=float("inf"))).index == 1


def test_the_fast_path_sheds_the_container_as_the_exact_path_does():
    """Container-to-object compares pixels, so the fast path decides it on the full-resolution
    masks, each upsampled once for every rule matched with the same cache."""
    from pro2sam.matching import match_at_full_resolution

    coarse, full, ious = object_on_support()
    low = full[:, ::4, ::4]  # SAM's low-resolution grid, 56x56
    asked = []

    def upsample(i):
        asked.append(i)
        return full[i]

    cache: dict = {}
    rule = MatchConfig(container_to_object=True)
    match, mask = match_at_full_resolution(coarse, low, ious, upsample, rule, cache=cache)
    exact = match_masks(coarse, full, ious, rule)
    assert match.index == exact.index == 1 and np.array_equal(mask, full[1])
    again, _ = match_at_full_resolution(coarse, low, ious, upsample, replace(rule, object_mass=0.9), cache=cache)
    assert again.index == 0
    assert sorted(asked[:4]) == [0, 1, 2, 3] and len(asked) == 6  # all four once, then only each winner


# ---------------------------------------------------------------- part absorption


def body_and_lit_part():
    """A 64x64-pixel object (x, y 64..127) whose class part, an 18x18 square at its top-right
    corner (x 112..129, y 62..79), sticks out of the body by two pixels; SAM's grid split them:
    candidates are the body without the part, the part, and a lit 20x20 distractor far away
    (x, y 180..199). The map lights the body (0.6), the part (0.9, cells x 7..8, y 3..4) and the
    distractor (0.9)."""
    coarse = np.full((14, 14), 0.05, dtype=np.float32)
    coarse[4:8, 4:8] = 0.6
    coarse[3:5, 7:9] = 0.9
    coarse[11:13, 11:13] = 0.9
    obj = rect_mask((224, 224), 64, 64, 127, 127)
    part = rect_mask((224, 224), 112, 62, 129, 79)
    distractor = rect_mask((224, 224), 180, 180, 199, 199)
    return coarse, np.stack([obj & ~part, part, distractor]), np.array([0.9, 0.85, 0.8])


def test_absorption_adds_the_lit_part_and_the_box_becomes_the_new_mask_s():
    from pro2sam.matching import absorb_lit_parts

    coarse, candidates, ious = body_and_lit_part()
    assert match_masks(coarse, candidates, ious).index == 0  # plain matching takes the body
    body, box = boxed_mask(candidates[0])
    assert box == (64, 64, 127, 127)
    mask, new_box, absorbed = absorb_lit_parts(body, box, coarse, lambda i: candidates[i], [1, 2], MatchConfig(absorb_parts=True))
    # the part grows the box from 64x64 to 66x66 pixels (x 64..129, y 62..127), 1.06 times: under 1.1;
    # the distractor would grow it about 4.5 times
    assert absorbed == [1] and new_box == (64, 62, 129, 127)
    assert np.array_equal(mask, candidates[0] | candidates[1])


@pytest.mark.parametrize("change", [{"absorb_contrast": 2.0}, {"absorb_box_growth": 1.05}, {"absorb_area": 0.05}])
def test_absorption_needs_a_lit_small_part_that_barely_grows_the_box(change):
    from pro2sam.matching import absorb_lit_parts

    coarse, candidates, _ = body_and_lit_part()
    body, box = boxed_mask(candidates[0])
    # the part is lit about 1.4 times the body's mean (not 2), grows the box 1.06 times (over 1.05),
    # and is 324 pixels, 8.6 % of the body's 3,772 (over 5 %)
    config = MatchConfig(absorb_parts=True, **change)
    mask, new_box, absorbed = absorb_lit_parts(body, box, coarse, lambda i: candidates[i], [1, 2], config)
    assert absorbed == [] and new_box == box and mask is body
    for bad in ({"absorb_contrast": -1.0}, {"absorb_box_growth": 0.9}, {"absorb_area": 0.0}, {"absorb_area": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MatchConfig(absorb_parts=True, **bad)
