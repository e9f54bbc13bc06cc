"""The labels table schema: one declaration, documented from there, rows conform."""

from pathlib import Path

import numpy as np

from pro2sam.labels import LABEL_SCHEMA, describe_schema, error_row, ok_row, rows_to_table
from pro2sam.model import Pro2SAMResult
from pro2sam.rle import decode_mask


def make_result():
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:20, 10:30] = True
    return Pro2SAMResult(
        box_xyxy=(10, 5, 29, 19), mask=mask, box_source="sam", topk_classes=[2, 0], topk_scores=[0.7, 0.2],
        topk_names=["c", "a"], match_score=0.8, pred_iou=0.9, stability_score=float("nan"),
        coarse_map=np.full((14, 14), 0.5, np.float32), num_candidates=12,
    )  # fmt: skip


def test_ok_and_error_rows_fit_the_schema():
    ok = ok_row("id1", "s3://b/x.jpg", "bird", make_result(), model_ids={"gtformer": "g", "sam": "vit_h:s"}, run_id="r")
    bad = error_row("id2", "s3://b/y.jpg", None, "not an image file", kind="image", run_id="r")
    table = rows_to_table([ok, bad])
    assert table.schema == LABEL_SCHEMA
    rows = table.to_pylist()
    assert rows[0]["stability_score"] is None  # nan is stored as null
    assert decode_mask(rows[0]["mask_rle"]).sum() == rows[0]["mask_area"] == 300
    assert len(rows[0]["coarse_map"]) == 196
    assert rows[1]["status"] == "error" and rows[1]["box_xyxy"] is None


def test_readme_documents_the_schema_as_declared():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert describe_schema() in readme
