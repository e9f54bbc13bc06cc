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


# ---------------------------------------------------------------- files that are not (whole) label files


def foreign_table():
    """A table of someone else's with the key columns' names and other types."""
    import pyarrow as pa

    return pa.table({"image_id": [1, 2, 3], "uri": [4, 5, 6], "status": [7, 8, 9], "run_id": [1, 1, 1]})


def run_readers(input, tmp_path, capsys) -> dict[str, tuple[int, str]]:
    """Each command that reads a labels table, run on ``input`` as a user would: (exit status, stderr)."""
    from pro2sam.apps.cli import main

    commands = {
        "show": ["show", "--input", str(input), "--output", str(tmp_path / "g.html")],
        "report": ["report", str(input), "--output", str(tmp_path / "r.html")],
        "export": ["export", "--input", str(input), "--format", "coco", "--output", str(tmp_path / "c.json")],
        "export --where": ["export", "--input", str(input), "--format", "yolo", "--output", str(tmp_path / "y"),
                           "--where", "status = 'ok'"],  # fmt: skip
    }
    out = {}
    for name, argv in commands.items():
        capsys.readouterr()
        status = main(argv)
        out[name] = status, capsys.readouterr().err.strip()
    return out


def test_a_foreign_parquet_file_given_as_the_labels_table_fails_in_one_line_naming_it_and_the_column(tmp_path, capsys):
    foreign = tmp_path / "stats.parquet"
    pq.write_table(foreign_table(), foreign)
    with pytest.raises(ValueError, match=f"{foreign} is not a labels table: its column 'image_id' holds int64, not string"):
        pro2sam.read_labels(str(foreign))
    for name, (status, err) in run_readers(foreign, tmp_path, capsys).items():
        assert status == 2, name
        assert err.endswith(f"error: {foreign} is not a labels table: its column 'image_id' holds int64, not string "
                            "(pro2sam schema lists the columns)"), (name, err)  # fmt: skip
        assert "\n" not in err, name


def test_a_foreign_parquet_file_in_a_labels_folder_is_no_part_of_the_table(labels_dir, tmp_path, capsys):
    pq.write_table(foreign_table(), labels_dir / "part-mine-0.parquet")  # named like a label file
    pq.write_table(foreign_table(), labels_dir / "stats.parquet")
    assert sorted(pro2sam.read_labels(str(labels_dir))["image_id"]) == ["a", "b", "c", "d"]
    results = run_readers(labels_dir, tmp_path, capsys)
    assert all(status == 0 for status, _ in results.values()), results
    assert "pro2sam show: 4 images" in results["show"][1]
    assert "pro2sam report: 4 images: 3 ok, 1 error" in results["report"][1]
    assert "3 images, 3 annotations, 1 categories (1 rows filtered out)" in results["export"][1]  # the error row


@pytest.mark.parametrize("where", ["folder", "file"])
def test_a_label_file_cut_short_fails_every_reader_in_one_line_naming_it(labels_dir, tmp_path, capsys, where):
    victim = labels_dir / "part-new-0.parquet"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    input = labels_dir if where == "folder" else victim
    with pytest.raises(Exception, match=f"{victim} is not a readable Parquet file"):
        pro2sam.read_labels(str(input))
    for name, (status, err) in run_readers(input, tmp_path, capsys).items():
        assert status == 2 and f"error: {victim} is not a readable Parquet file" in err and "\n" not in err, (name, err)


def test_label_files_of_two_versions_are_read_together_in_the_current_types(labels_dir, tmp_path, capsys):
    """An older writer's file (large strings, 64-bit integers and floats, a box as a variable list)
    beside one of today's: every reader reads both, in LABEL_SCHEMA's types."""
    import pyarrow as pa

    from pro2sam.labels import LABEL_SCHEMA

    older = {"image_id": pa.large_string(), "uri": pa.large_string(), "status": pa.large_string(),
             "width": pa.int64(), "mask_area": pa.int32(), "match_score": pa.float64(),
             "box_xyxy": pa.large_list(pa.int64()), "topk_names": pa.large_list(pa.large_string())}  # fmt: skip
    old_file = labels_dir / "part-old-0.parquet"
    table = pq.read_table(old_file)
    schema = pa.schema([f.with_type(older.get(f.name, f.type)) for f in table.schema], metadata=table.schema.metadata)
    pq.write_table(table.cast(schema), old_file)
    assert pq.read_schema(old_file).field("image_id").type == pa.large_string()

    frame = pro2sam.read_labels(str(labels_dir))
    assert sorted(frame["image_id"]) == ["a", "b", "c", "d"]
    assert frame.set_index("image_id").loc["b", "mask_area"] == 36
    assert frame.set_index("image_id").loc["b", "box_xyxy"].tolist() == [3, 2, 8, 7]
    from pro2sam.reading import iter_label_batches

    for input in (old_file, labels_dir):
        for batch in iter_label_batches(str(input), list(older)):
            assert batch.schema == pa.schema([LABEL_SCHEMA.field(c) for c in older])
    results = run_readers(labels_dir, tmp_path, capsys)
    assert all(status == 0 for status, _ in results.values()), results
    assert "pro2sam report: 4 images: 3 ok, 1 error" in results["report"][1]
