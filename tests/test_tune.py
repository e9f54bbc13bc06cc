"""pro2sam tune: settings chosen on a boxed held-out split (a team's manifest or COCO file, or a
WSOL split), written to a settings file that label / evaluate / predict / demo take with
--settings, and whose SHA-256 every label row carries."""

from __future__ import annotations

import csv
import hashlib
import json
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pro2sam import shipped
from pro2sam.apps.cli import _labeling, main, parse_args
from pro2sam.candidates import CandidateConfig
from pro2sam.datasets import open_dataset
from pro2sam.matching import MatchConfig
from pro2sam.synthetic import write_wsol_dataset
from pro2sam.tuning import (
    CONTAINER_TO_OBJECT, GRIDS, OBJECTIVE, OBJECTIVES, PART_TO_OBJECT, PLAIN_IOU, SETTINGS_FORMAT, SettingsError, choose, load_settings, table_row, with_fallback_threshold,
)

# Small enough for 2 CPU cores: the shipped models on 5 small scenes, a 4x4 grid of SAM prompts.
MODELS = ["--gtformer", "shipped", "--sam", "synthetic", "--points-per-side", "4", "--actors", "1", "--cpus-per-actor", "1"]


@pytest.fixture
def keep_signal_handlers():
    """The CLI installs SIGINT/SIGTERM handlers for its jobs; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A synthetic WSOL data set (pro2sam synthetic): 5 val and 3 test scenes with boxes."""
    return write_wsol_dataset(tmp_path_factory.mktemp("tune") / "data", num_train=0, num_val=5, num_test=3, image_size=(96, 128), seed=3)


def boxed_manifest(dataset, path: Path) -> Path:
    """The split as a team would write it: uri, label, x0, y0, x1, y1, one row per box; the first
    image gets a second box (the whole image), so one image has two rows."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["uri", "label", "x0", "y0", "x1", "y1"])
        for i, s in enumerate(dataset.samples):
            for box in s.boxes:
                out.writerow([s.uri, dataset.class_names[s.label], *(f"{v:g}" for v in box)])
            if i == 0:
                out.writerow([s.uri, dataset.class_names[s.label], 0, 0, s.width, s.height])
    return path


def coco_file(dataset, path: Path, images_root: Path) -> Path:
    """The split as COCO instances JSON, file names relative to ``images_root``."""
    categories = [{"id": 10 + i, "name": n} for i, n in enumerate(dataset.class_names)]
    images, annotations = [], []
    for i, s in enumerate(dataset.samples):
        images.append({"id": i + 1, "file_name": str(Path(s.uri).relative_to(images_root)), "width": s.width, "height": s.height})
        for x0, y0, x1, y1 in s.boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 10 + s.label,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})  # fmt: skip
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture(scope="module")
def tuned_on_manifest(synthetic, tmp_path_factory, ray_local):
    """``pro2sam tune`` on a boxed CSV manifest of the synthetic val split: (settings file, manifest)."""
    folder = tmp_path_factory.mktemp("tuned")
    manifest = boxed_manifest(open_dataset(synthetic.spec("val")), folder / "heldout.csv")
    settings = folder / "settings.json"
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert main(["tune", "--heldout", str(manifest), "--output", str(settings), *MODELS]) == 0
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    return settings, manifest


def check_settings_file(path: Path, images: int, boxes: int, spec: str, objective: str = OBJECTIVE) -> dict:
    document = json.loads(path.read_text())
    assert document["format"] == SETTINGS_FORMAT
    assert document["heldout"]["spec"] == spec
    assert (document["heldout"]["images"], document["heldout"]["boxes"]) == (images, boxes)
    assert document["code_version"]["pro2sam"] and {"git_sha", "git_dirty"} <= set(document["code_version"])
    table = document["table"]
    candidates, matchings, fallbacks, absorbs = GRIDS["small"].size(CandidateConfig.for_variant("synthetic", points_per_side=4), MatchConfig())
    assert len(table) == candidates * matchings + absorbs + fallbacks - 1
    assert [r["stage"] for r in table].count("absorb") == absorbs > 0
    assert {(r["absorb_contrast"], r["absorb_box_growth"]) for r in table if r["stage"] == "absorb"} == set(GRIDS["small"].absorb)
    assert all(0.0 <= row[key] <= 100.0 for row in table for key in ("gt_known_loc", "BoxAccV2_single_box"))
    # the choice is the best held-out row of the table by the objective, and the file's settings are that row's
    column = {"gt_known_loc": "gt_known_loc", "box_acc_v2": "BoxAccV2_single_box"}[objective]
    assert document["objective"].startswith(f"{objective}: {column}")
    chosen = document["chosen"]
    assert chosen == choose(table, objective) and table[chosen].get("chosen") is True
    assert table[chosen][column] == max(row[column] for row in table)
    settings = document["settings"]
    for key in ("pred_iou_thresh", "stability_score_thresh", "prune_with_coarse_map"):
        assert settings["candidates"][key] == table[chosen][key]
    assert settings["matching"]["fallback_threshold"] == table[chosen]["fallback_threshold"]
    assert settings["matching"]["part_to_object"] == (table[chosen]["matching"] == PART_TO_OBJECT)
    assert settings["matching"]["container_to_object"] == (table[chosen]["matching"] == CONTAINER_TO_OBJECT)
    assert settings["matching"]["absorb_parts"] == (table[chosen]["absorb_contrast"] is not None)
    assert settings["candidates"]["points_per_side"] == 4
    assert document["confidence"]["fitted_on"]
    return document


def test_tune_on_a_boxed_csv_manifest_writes_the_table_and_chooses_its_best_row(tuned_on_manifest):
    settings, manifest = tuned_on_manifest
    check_settings_file(settings, images=5, boxes=6, spec=str(manifest))
    assert load_settings(str(settings)).sha256 == hashlib.sha256(settings.read_bytes()).hexdigest()


def test_tune_on_a_coco_json_with_an_images_root(synthetic, tmp_path, ray_local, keep_signal_handlers):
    val = open_dataset(synthetic.spec("val"))
    root = Path(synthetic.spec("val").split(":")[2])  # the data root the images lie under
    coco = coco_file(val, tmp_path / "instances_val.json", root)  # not in the images' folder
    settings = tmp_path / "settings.json"
    argv = ["tune", "--heldout", f"coco:{coco}", "--images-root", str(root), "--output", str(settings), *MODELS,
            "--objective", "box_acc_v2"]  # fmt: skip
    assert main(argv) == 0
    document = check_settings_file(settings, images=5, boxes=5, spec=f"coco:{coco}", objective="box_acc_v2")
    assert document["heldout"]["images_root"] == str(root)


def test_label_with_settings_applies_them_and_every_row_carries_the_files_sha256(
    tuned_on_manifest, synthetic, tmp_path, ray_local, keep_signal_handlers
):
    settings, _ = tuned_on_manifest
    document = json.loads(settings.read_text())
    images = str(Path(open_dataset(synthetic.spec("test")).samples[0].uri).parent)
    argv = ["label", "--input", images, "--output", str(tmp_path / "labels"), "--settings", str(settings), *MODELS]
    # the file's settings become the options' defaults; an option given explicitly still wins
    labeling = _labeling(parse_args([*argv, "--agreement", "0.5"]))
    chosen = document["settings"]
    assert labeling.candidates.pred_iou_thresh == chosen["candidates"]["pred_iou_thresh"]
    assert labeling.candidates.stability_score_thresh == chosen["candidates"]["stability_score_thresh"]
    assert labeling.candidates.prune_with_coarse_map == chosen["candidates"]["prune_with_coarse_map"]
    assert labeling.matching == MatchConfig(**{**chosen["matching"], "agreement": 0.5})
    assert main(argv) == 0
    from pro2sam import read_labels

    rows = read_labels(str(tmp_path / "labels"), columns=["status", "settings_sha256", "confidence"])
    assert len(rows) == 3 and set(rows["status"]) == {"ok"}
    assert set(rows["settings_sha256"]) == {hashlib.sha256(settings.read_bytes()).hexdigest()}
    assert rows["confidence"].between(0, 1).all()  # the calibration the file carries


@pytest.mark.parametrize(
    "content, why",
    [
        (None, "not found"),
        (b"{not json", "not JSON"),
        (json.dumps({"format": "something else"}).encode(), "not a pro2sam settings file"),
        (json.dumps({"format": SETTINGS_FORMAT, "settings": {"candidates": {}, "matching": {"agreement": 2.0}}}).encode(), "agreement"),
        (json.dumps({"format": SETTINGS_FORMAT, "settings": {"candidates": {"grid": 3}, "matching": {}}}).encode(), "unknown settings grid"),
    ],
)
def test_a_bad_settings_file_is_refused_in_one_line(tmp_path, capsys, content, why):
    path = tmp_path / "settings.json"
    if content is not None:
        path.write_bytes(content)
    argv = ["label", "--input", str(tmp_path), "--output", str(tmp_path / "out"), "--settings", str(path), *MODELS]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"pro2sam label: error: settings file {path}") and why in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SettingsError):
        load_settings(str(path))


def test_ties_go_to_the_base_settings_then_to_plain_iou():
    def row(score, changes, matching):
        return {OBJECTIVE: score, "changes_from_base": changes, "matching": matching}

    assert choose([row(80, 2, PLAIN_IOU), row(90, 3, "part-to-object"), row(90, 1, "part-to-object")]) == 2
    assert choose([row(90, 1, "part-to-object"), row(90, 1, PLAIN_IOU)]) == 1
    assert choose([row(90, 0, "part-to-object"), row(90, 1, PLAIN_IOU)]) == 0


def test_equal_scores_go_to_the_better_masks_before_the_fewest_changes():
    def row(score, miou, changes):
        return {OBJECTIVE: score, "mIoU": miou, "changes_from_base": changes, "matching": PLAIN_IOU}

    assert choose([row(90, 80.0, 0), row(90, 81.0, 2), row(91, 70.0, 3)]) == 2
    assert choose([row(90, 80.0, 0), row(90, 81.0, 2), row(89, 95.0, 0)]) == 1
    assert choose([row(90, None, 1), row(90, None, 0)]) == 1  # no held-out masks: the fewest changes


def test_the_objective_picks_the_column_the_choice_maximises():
    def row(gt_known, box_acc, miou):
        return {"gt_known_loc": gt_known, "BoxAccV2_single_box": box_acc, "mIoU": miou, "changes_from_base": 0, "matching": PLAIN_IOU}

    table = [row(99.0, 95.0, 80.0), row(98.5, 97.0, 90.0), row(98.0, 97.5, 85.0)]
    assert (choose(table), choose(table, "gt_known_loc"), choose(table, "box_acc_v2"), choose(table, "miou")) == (0, 0, 2, 1)
    # a row without the score (no held-out masks) is never preferred
    assert choose([row(99.0, 95.0, None), row(90.0, 90.0, 10.0)], "miou") == 1
    with pytest.raises(ValueError, match="objective 'boxacc'"):
        choose(table, "boxacc")
    assert set(OBJECTIVES) == {"gt_known_loc", "box_acc_v2", "miou"}


def test_tune_by_miou_on_held_out_boxes_without_masks_is_refused_in_one_line(synthetic, tmp_path, capsys):
    manifest = boxed_manifest(open_dataset(synthetic.spec("val")), tmp_path / "heldout.csv")
    argv = ["tune", "--heldout", str(manifest), "--output", str(tmp_path / "settings.json"), *MODELS, "--objective", "miou"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--objective miou" in err and "has no masks" in err
    assert not (tmp_path / "settings.json").exists()


def test_the_grid_always_holds_the_base_settings_once():
    base_c, base_m = CandidateConfig(pred_iou_thresh=0.88, stability_score_thresh=0.95), MatchConfig()
    grid = GRIDS["small"]
    candidates, matchings = grid.candidate_configs(base_c), grid.match_configs(base_m)
    assert candidates[0] == base_c and len(set(candidates)) == len(candidates)
    assert matchings[0] == base_m and MatchConfig(part_to_object=False) in matchings
    assert len(set(matchings)) == len(matchings)
    # every part-to-object pair is tried pixel by pixel and on each completion grid
    for grid in GRIDS.values():
        completing = [m for m in grid.match_configs(base_m) if m.part_to_object]
        assert {m.completion_size for m in completing} == set(grid.completion_sizes) and None in grid.completion_sizes
        assert len(completing) == len(grid.part_to_object) * len(grid.completion_sizes)
        # and every container-to-object pair once, with the base's containment
        shedding = [m for m in grid.match_configs(base_m) if m.container_to_object]
        assert {(m.object_mass, m.support_contrast) for m in shedding} == set(grid.container_to_object)
        assert len(shedding) == len(grid.container_to_object) > 0
        assert all(m.containment == base_m.containment and not m.part_to_object for m in shedding)
    assert len(GRIDS["full"].completion_sizes) > 1
    # from a base with part-to-object on, plain IoU and container-to-object turn it off
    climbing = MatchConfig(part_to_object=True, containment=0.2)
    rules = GRIDS["small"].match_configs(climbing)
    assert replace(climbing, part_to_object=False) in rules and all(not (m.part_to_object and m.container_to_object) for m in rules)


def test_a_rule_s_thresholds_count_as_changes_only_where_the_rule_is_on():
    base_c, base_m = CandidateConfig(), MatchConfig()

    def changes(matching):
        row = table_row(base_c, matching, {OBJECTIVE: 90.0}, base_candidates=base_c, base_matching=base_m, stage="sam+matching")
        return row["changes_from_base"], row["matching"], row["object_mass"]

    assert changes(MatchConfig(object_mass=0.1, containment=0.3)) == (0, PLAIN_IOU, None)
    assert changes(MatchConfig(container_to_object=True)) == (1, CONTAINER_TO_OBJECT, MatchConfig().object_mass)
    assert changes(MatchConfig(container_to_object=True, object_mass=0.1, support_contrast=1.0)) == (3, CONTAINER_TO_OBJECT, 0.1)
    assert changes(MatchConfig(part_to_object=True, object_mass=0.1)) == (1, PART_TO_OBJECT, None)
    assert changes(MatchConfig(absorb_contrast=1.0, absorb_box_growth=1.25)) == (0, PLAIN_IOU, None)
    assert changes(MatchConfig(absorb_parts=True, absorb_contrast=1.0, absorb_box_growth=1.25)) == (3, PLAIN_IOU, None)


def test_a_tie_between_completion_grids_goes_to_pixel_by_pixel():
    base_c, base_m = CandidateConfig(), MatchConfig()
    rows = [
        table_row(base_c, MatchConfig(part_to_object=True, containment=0.2, completion_size=size), {OBJECTIVE: 90.0},
                  base_candidates=base_c, base_matching=base_m, stage="sam+matching")
        for size in (32, None)
    ]  # fmt: skip
    assert [r["completion_size"] for r in rows] == [32, None]
    assert choose(rows) == 1
    assert table_row(base_c, MatchConfig(completion_size=32), {OBJECTIVE: 90.0}, base_candidates=base_c, base_matching=base_m,
                     stage="sam+matching")["changes_from_base"] == 0  # fmt: skip  (plain IoU does not use the grid)


def test_the_grid_tries_each_candidate_setting_with_the_filters_relaxed_when_none_passes():
    base = CandidateConfig(pred_iou_thresh=0.88, stability_score_thresh=0.95)
    configs = GRIDS["small"].candidate_configs(base)
    strict = [c for c in configs if not c.relax_filters_when_empty]
    relaxed = [c for c in configs if c.relax_filters_when_empty]
    assert configs[0] == base and len(strict) == len(relaxed) == len(configs) // 2
    assert {replace(c, relax_filters_when_empty=False) for c in relaxed} == set(strict)


def test_another_fallback_threshold_changes_only_the_fallback_boxes():
    coarse = np.zeros((14, 14), np.float32)
    coarse[4:10, 4:10] = 0.5
    coarse[6:8, 6:8] = 1.0
    fallback = {"box_source": "coarse_fallback", "coarse_map": coarse.ravel().tolist(), "width": 140, "height": 140,
                "box_xyxy": [0, 0, 139, 139]}  # fmt: skip
    sam = {"box_source": "sam", "box_xyxy": [1, 2, 3, 4]}
    loose, tight = with_fallback_threshold([fallback, sam], 0.3), with_fallback_threshold([fallback, sam], 0.7)
    assert loose[1] == tight[1] == sam
    (lx0, ly0, lx1, ly1), (tx0, ty0, tx1, ty1) = loose[0]["box_xyxy"], tight[0]["box_xyxy"]
    assert lx0 < tx0 and lx1 > tx1 and ly0 < ty0 and ly1 > ty1  # a higher threshold, a smaller box
    assert loose[0]["mask_area"] > tight[0]["mask_area"] > 0


def test_a_coco_file_gives_one_sample_per_image_with_every_box(tmp_path):
    (tmp_path / "img").mkdir()
    data = {
        "images": [{"id": 7, "file_name": "img/a.png", "width": 40, "height": 30}, {"id": 8, "file_name": "img/b.png"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 2, 10, 5]},
            {"id": 2, "image_id": 7, "category_id": 5, "bbox": [0, 0, 20, 20]},
        ],
        "categories": [{"id": 5, "name": "dog"}, {"id": 3, "name": "cat"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(data))
    ds = open_dataset(f"coco:{tmp_path / 'instances.json'}")
    assert ds.class_names == ["cat", "dog"]
    a, b = ds.samples
    assert a.uri == str(tmp_path / "img" / "a.png") and a.label == 1  # the largest box's category
    np.testing.assert_array_equal(a.boxes, [[1, 2, 11, 7], [0, 0, 20, 20]])
    assert b.boxes is None
    elsewhere = open_dataset(f"coco:{tmp_path / 'instances.json'}", images_root="/data/photos")
    assert elsewhere.samples[0].uri == "/data/photos/img/a.png"


def test_label_files_without_the_settings_column_still_read(tmp_path):
    from pro2sam import read_labels
    from pro2sam.labels import LABEL_SCHEMA

    older = pa.schema([f for f in LABEL_SCHEMA if f.name != "settings_sha256"])
    row = {name: None for name in older.names} | {"image_id": "a", "uri": "/x.png", "status": "ok", "run_id": "r"}
    pq.write_table(pa.Table.from_pylist([row], schema=older), tmp_path / "part-old-00000.parquet")
    df = read_labels(str(tmp_path / "part-old-00000.parquet"))
    assert "settings_sha256" in df.columns and df["settings_sha256"].isna().all()


def test_jobs_tune_py_is_pro2sam_tune_for_ray_job_submit():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "jobs/tune.py", "--help"], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: pro2sam tune") and "--heldout" in done.stdout


def test_a_heldout_split_without_boxes_is_refused_in_one_line(tmp_path, capsys):
    manifest = tmp_path / "unboxed.csv"
    manifest.write_text("uri,label\na.png,cat\nb.png,dog\n")
    argv = ["tune", "--heldout", str(manifest), "--output", str(tmp_path / "settings.json"), *MODELS]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no image has a box" in err
    assert not (tmp_path / "settings.json").exists()


def test_predict_evaluate_and_demo_take_the_settings_as_defaults_too(tuned_on_manifest, tmp_path):
    settings, _ = tuned_on_manifest
    chosen = json.loads(settings.read_text())["settings"]
    models = ["--gtformer", "shipped", "--sam", "synthetic"]
    commands = {
        "predict": ["predict", *models, "x.png"],
        "evaluate": ["evaluate", "--heldout", "a.csv", "--test", "b.csv", "--output", str(tmp_path), *models],
        "demo": ["demo", "--workdir", str(tmp_path)],
    }
    for name, argv in commands.items():
        args = parse_args([*argv, "--settings", str(settings)])
        assert args.tuned.sha256 == hashlib.sha256(settings.read_bytes()).hexdigest(), name
        assert args.points_per_side == chosen["candidates"]["points_per_side"], name
        if name != "demo":  # the demo has no filter or matching options: run_demo takes them from args.tuned
            assert args.prune == chosen["candidates"]["prune_with_coarse_map"], name
            assert args.pred_iou_thresh == chosen["candidates"]["pred_iou_thresh"], name
            assert (args.part_to_object, args.agreement) == (chosen["matching"]["part_to_object"], chosen["matching"]["agreement"])
            assert (args.container_to_object, args.object_mass, args.support_contrast) == tuple(
                chosen["matching"][k] for k in ("container_to_object", "object_mass", "support_contrast")
            )


def test_shipped_names_the_settings_chosen_for_the_shipped_models_and_the_demo_uses_its_regimes(tmp_path):
    label = ["label", "--input", "i", "--output", "o", "--gtformer", "shipped"]
    digest = {r: hashlib.sha256(shipped.settings_file(r).read_bytes()).hexdigest() for r in ("part", "object")}
    assert parse_args([*label, "--settings", "shipped"]).tuned.sha256 == digest["part"]
    assert parse_args(["demo", "--workdir", str(tmp_path)]).tuned.sha256 == digest["part"]
    assert parse_args(["demo", "--workdir", str(tmp_path), "--regime", "object"]).tuned.sha256 == digest["object"]
    # Each chosen by pro2sam tune on the val split of its own world: part-to-object where the map
    # lights the part, container-to-object where it covers the object (and SAM emits containers).
    part, whole = (json.loads(shipped.settings_file(r).read_text()) for r in ("part", "object"))
    assert part["heldout"]["split"] == whole["heldout"]["split"] == "val"
    assert part["settings"]["matching"]["part_to_object"] is True and whole["settings"]["matching"]["part_to_object"] is False
    assert part["settings"]["matching"]["container_to_object"] is False and whole["settings"]["matching"]["container_to_object"] is True
    object_args = parse_args([*label, "--settings", str(shipped.settings_file("object"))])
    assert (object_args.container_to_object, object_args.object_mass) == (True, whole["settings"]["matching"]["object_mass"])
    assert parse_args(["demo", "--workdir", str(tmp_path), "--settings", "none"]).tuned is None
    assert parse_args(label).part_to_object is False, "the authors' rule by default"
    assert parse_args(label).container_to_object is False, "the authors' rule by default"


def test_a_settings_file_on_object_storage_is_read_as_a_local_one(s3_bucket, tmp_path):
    """Teams keep the file beside their data: --settings s3://... as the README's example."""
    from pro2sam.storage import write_bytes_atomic

    data = shipped.settings_file().read_bytes()
    uri = f"s3://{s3_bucket}/tuning/settings.json"
    write_bytes_atomic(uri, data)
    args = parse_args(["label", "--input", "i", "--output", "o", "--gtformer", "shipped", "--settings", uri])
    assert args.tuned.sha256 == hashlib.sha256(data).hexdigest()
    assert args.part_to_object == json.loads(data)["settings"]["matching"]["part_to_object"]
    with pytest.raises(SettingsError, match=f"settings file s3://{s3_bucket}/tuning/missing.json: not found"):
        load_settings(f"s3://{s3_bucket}/tuning/missing.json")


def test_a_completion_grid_in_a_settings_file_reaches_the_labeling_job_and_an_option_overrides_it(tmp_path):
    document = json.loads(shipped.settings_file("part").read_text())
    document["settings"]["matching"]["completion_size"] = 32
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(document))
    label = ["label", "--input", "i", "--output", "o", "--gtformer", "shipped", "--settings", str(settings)]
    assert _labeling(parse_args(label)).matching.completion_size == 32
    assert _labeling(parse_args([*label, "--completion-size", "64"])).matching.completion_size == 64
    assert _labeling(parse_args(label[:-2])).matching.completion_size is None  # pixel by pixel without the file
    document["settings"]["matching"]["completion_size"] = 0
    settings.write_text(json.dumps(document))
    with pytest.raises(SettingsError, match="completion_size"):
        load_settings(str(settings))
