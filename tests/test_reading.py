"""Reading a labels table for analysts: a pandas DataFrame, one row per image, filtered batch by
batch, local and on S3, and a row's mask."""

import subprocess
import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import pro2sam
from pro2sam.labels import error_row, ok_row, rows_to_table
from pro2sam.model import Pro2SAMResult


def labeled(name: str, match: float | None, square: int) -> dict:
    mask = np.zeros((20, 30), bool)
    mask[2 : 2 + square, 3 : 3 + square] = True
    result = Pro2SAMResult(
        box_xyxy=(3, 2, 2 + square, 1 + square), mask=mask, box_source="sam" if match is not None else "coarse_fallback",
        topk_classes=[1], topk_scores=[0.6], topk_names=["cat"], match_score=match, pred_iou=0.9, stability_score=0.9,
        coarse_map=np.zeros((14, 14), np.float32), num_candidates=1,
    )  # fmt: skip
    return ok_row(name, f"s3://b/{name}.png", None, result, model_ids={}, run_id="r")


ROWS = [labeled("a", 0.9, 4), labeled("b", 0.3, 6), labeled("c", None, 5)]
ERROR = error_row("d", "s3://b/d.png", None, "truncated file", kind="image", run_id="r")


@pytest.fixture
def labels_dir(tmp_path):
    """Two label files; image "a" has a stale error row besides its ok row (one row per image wins)."""
    folder = tmp_path / "labels"
    folder.mkdir()
    stale = error_row("a", "s3://b/a.png", None, "timeout", kind="read", run_id="old")
    pq.write_table(rows_to_table([stale, ROWS[1], ERROR]), folder / "part-old-0.parquet")
    pq.write_table(rows_to_table([ROWS[0], ROWS[2]]), folder / "part-new-0.parquet", row_group_size=1)
    return folder


def test_read_labels_gives_one_row_per_image_with_the_chosen_columns(labels_dir):
    frame = pro2sam.read_labels(str(labels_dir), columns=["image_id", "status", "match_score"])
    assert list(frame.columns) == ["image_id", "status", "match_score"]
    by_id = frame.set_index("image_id")
    assert sorted(by_id.index) == ["a", "b", "c", "d"]
    assert by_id.loc["a", "status"] == "ok"  # the ok row wins over the stale error
    assert np.isnan(by_id.loc["c", "match_score"])  # the fallback has none


def test_filter_may_be_an_expression_or_a_list_and_name_unread_columns(labels_dir):
    expression = pro2sam.read_labels(str(labels_dir), columns=["image_id"], filter=pc.field("match_score") > 0.5)
    assert expression["image_id"].tolist() == ["a"]
    listed = pro2sam.read_labels(str(labels_dir), columns=["image_id"], filter=[("status", "==", "error")])
    assert listed["image_id"].tolist() == ["d"]
    nothing = pro2sam.read_labels(str(labels_dir), columns=["image_id", "box_xyxy"], filter=[("width", ">", 10**6)])
    assert list(nothing.columns) == ["image_id", "box_xyxy"] and len(nothing) == 0


def test_row_mask_decodes_a_frame_row_and_is_none_for_an_error_row(labels_dir):
    frame = pro2sam.read_labels(str(labels_dir), columns=["image_id", "mask_rle", "mask_area"]).set_index("image_id")
    mask = pro2sam.row_mask(frame.loc["b"])
    assert mask.shape == (20, 30) and mask.dtype == bool and mask.sum() == frame.loc["b", "mask_area"] == 36
    assert mask[2:8, 3:9].all()
    assert pro2sam.row_mask(frame.loc["d"]) is None


def test_read_labels_reads_an_s3_output(labels_dir, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(labels_dir) + "/", f"{s3_bucket}/run1/", recursive=True)
    frame = pro2sam.read_labels(f"s3://{s3_bucket}/run1/", columns=["image_id", "mask_area"], filter=[("status", "==", "ok")])
    assert sorted(zip(frame["image_id"], frame["mask_area"])) == [("a", 16), ("b", 36), ("c", 25)]


def test_importing_pro2sam_stays_light():
    code = "import sys, pro2sam; print(any(m in sys.modules for m in ('pandas', 'torch', 'matplotlib', 'pyarrow')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
