"""One manifest reader (:mod:`pro2sam.inputs.manifests`) for the labeling job's input and the
data sets' manifests. Each case where the two readers used to disagree is tested on both: the job
(:func:`list_inputs`, ``ValueError``) and the data set (:func:`read_manifest`, ``DatasetError``)
read the same file the same way, by the rule the module's docstring states."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pro2sam.datasets import DatasetError, read_manifest
from pro2sam.inputs import list_inputs
from pro2sam.inputs.manifests import ManifestError, manifest_place, read_manifest_rows
from pro2sam.storage import write_bytes_atomic


def _csv(path: Path, text: str) -> str:
    path.write_bytes(text.encode("utf-8"))
    return str(path)


def _job_rows(manifest: str) -> list[tuple[str, str | None]]:
    return [(r["uri"], r["label"]) for r in list_inputs(manifest).to_pylist()]


def _dataset_rows(manifest: str) -> list[tuple[str, str]]:
    dataset = read_manifest(manifest)
    return [(s.uri, dataset.class_names[s.label]) for s in dataset.samples]


def _both_refuse(manifest: str, job_message: str, dataset_message: str, *, pattern: bool = False) -> None:
    """The job's reader and the data sets' refuse ``manifest`` with these whole messages (regular
    expressions with ``pattern``)."""
    def whole(message: str) -> str:
        return f"^{message if pattern else re.escape(message)}$"

    with pytest.raises(ValueError, match=whole(job_message)):
        list_inputs(manifest)
    with pytest.raises(DatasetError, match=whole(dataset_message)):
        read_manifest(manifest)


# ---------------------------------------------------------------- where a row is


def test_a_csv_row_is_named_by_its_line_in_the_file_empty_lines_and_quoted_line_breaks_counted(tmp_path):
    # line 1 header, 2 empty, 3-4 one quoted record, 5 empty (CRLF), 6 the bad row
    manifest = _csv(tmp_path / "m.csv", 'uri,label\r\n\r\n"a\nb.png",cat\r\n\r\n,dog\r\n')
    _both_refuse(manifest, f"manifest {manifest} line 6: empty uri", f"{manifest}:6: empty uri")


def test_a_parquet_row_is_named_by_its_row_number_from_one(tmp_path):
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"uri": ["a.png", "  "], "label": ["cat", "dog"]}), manifest)
    _both_refuse(manifest, f"manifest {manifest} row 2: empty uri", f"{manifest} row 2: empty uri")


def test_a_csv_row_with_more_cells_than_the_header_is_refused_with_its_line(tmp_path):
    manifest = _csv(tmp_path / "m.csv", "uri,label\na.png,cat\n\nb.png,cat,extra\n")
    _both_refuse(manifest, rf"manifest {re.escape(manifest)} line 4: .*Expected 2 columns, got 3.*",
                 rf"{re.escape(manifest)}:4: .*Expected 2 columns, got 3.*", pattern=True)


def test_a_data_set_error_found_after_reading_names_the_line_of_the_row(tmp_path):
    manifest = _csv(tmp_path / "m.csv", "uri,label,x0,y0,x1,y1\n\na.png,cat,1,2,3,4\n\nb.png,cat,1,2,x,4\n")
    with pytest.raises(DatasetError, match=rf"^{re.escape(manifest)}:5: box coordinate is not a number: 'x'$"):
        read_manifest(manifest)


def test_manifest_place_counts_the_header_as_line_one_and_skips_empty_lines(tmp_path):
    manifest = _csv(tmp_path / "m.csv", "\nuri\n\na.png\nb.png\n")
    assert [manifest_place(manifest, row) for row in (0, 1)] == [("line", 4), ("line", 5)]
    assert manifest_place(str(tmp_path / "m.parquet"), 0) == ("row", 1)


# ---------------------------------------------------------------- what is read


def test_a_byte_order_mark_and_empty_lines_before_the_header_are_skipped_by_both(tmp_path):
    manifest = _csv(tmp_path / "m.csv", "\ufeff\nuri,label\na.png,cat\n")
    assert _job_rows(manifest) == [(str(tmp_path / "a.png"), "cat")]
    assert _dataset_rows(manifest) == [(str(tmp_path / "a.png"), "cat")]


def test_quoted_commas_are_part_of_the_cell_in_both(tmp_path):
    manifest = _csv(tmp_path / "m.csv", 'uri,label\n"x,y.png","big, cat"\n')
    assert _job_rows(manifest) == [(str(tmp_path / "x,y.png"), "big, cat")]
    assert _dataset_rows(manifest) == [(str(tmp_path / "x,y.png"), "big, cat")]


def test_the_whitespace_around_a_cell_is_not_part_of_it_in_both(tmp_path):
    # the job used to keep ' a.png ' and ' cat ' as written; the data sets stripped them
    manifest = _csv(tmp_path / "m.csv", "uri,label\n a.png , cat \n")
    assert _job_rows(manifest) == [(str(tmp_path / "a.png"), "cat")]
    assert _dataset_rows(manifest) == [(str(tmp_path / "a.png"), "cat")]


def test_a_blank_or_nan_cell_is_empty_in_both(tmp_path):
    # the job used to give the label ' ' (the data sets: no label)
    manifest = _csv(tmp_path / "m.csv", "uri,label\na.png, \n")
    assert _job_rows(manifest) == [(str(tmp_path / "a.png"), None)]
    with pytest.raises(DatasetError, match=rf"^{re.escape(manifest)}:2: image 'a.png' has no label$"):
        read_manifest(manifest)
    table = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"uri": ["a.png"], "label": ["cat"], "x0": [float("nan")], "y0": [None], "x1": [None], "y1": [None]}), table)
    assert read_manifest(table).samples[0].boxes is None


def test_relative_uris_name_one_location_in_both_dots_and_schemes_resolved(tmp_path):
    # the data sets used to keep 'sub/../b.png' and 'file://' as written, so their URIs did not
    # meet the labels' (which the job spells canonically)
    (tmp_path / "sub").mkdir()
    manifest = _csv(tmp_path / "sub" / "m.csv", f"uri,label\n./a.png,cat\n../b.png,cat\nx/../c.png,cat\nfile://{tmp_path}/d.png,cat\n")
    expected = [str(tmp_path / "sub" / "a.png"), str(tmp_path / "b.png"), str(tmp_path / "sub" / "c.png"), str(tmp_path / "d.png")]
    assert [uri for uri, _ in _job_rows(manifest)] == expected
    assert [uri for uri, _ in _dataset_rows(manifest)] == expected


def test_rows_naming_one_image_by_two_spellings_are_one_image_in_both(tmp_path):
    manifest = _csv(tmp_path / "m.csv", "uri,label,x0,y0,x1,y1\na.png,cat,1,1,2,2\nsub/../a.png,cat,3,3,4,4\n")
    assert _job_rows(manifest) == [(str(tmp_path / "a.png"), "cat")]
    (sample,) = read_manifest(manifest).samples
    assert sample.uri == str(tmp_path / "a.png") and sample.boxes.tolist() == [[1, 1, 2, 2], [3, 3, 4, 4]]


def test_a_remote_manifests_relative_uris_are_below_its_folder_in_both(s3_bucket):
    manifest = f"s3://{s3_bucket}/data/m.csv"
    write_bytes_atomic(manifest, f"uri,label\nimages/a.png,cat\ns3://{s3_bucket}/other/b.png,dog\n".encode())
    expected = [(f"s3://{s3_bucket}/data/images/a.png", "cat"), (f"s3://{s3_bucket}/other/b.png", "dog")]
    assert _job_rows(manifest) == expected
    assert _dataset_rows(manifest) == expected


def test_integer_labels_are_read_as_the_text_written_in_both(tmp_path):
    manifest = _csv(tmp_path / "m.csv", "uri,label\na.png,001\nb.png,2\n")
    assert [label for _, label in _job_rows(manifest)] == ["001", "2"]
    assert [s.label for s in read_manifest(manifest).samples] == [1, 2], "the data set reads '001' as the index 1"


# ---------------------------------------------------------------- columns and empty files


def test_an_empty_file_is_refused_by_both(tmp_path):
    # the data sets used to read it as a data set of no images
    manifest = _csv(tmp_path / "m.csv", "")
    _both_refuse(manifest, f"manifest {manifest}: no 'uri' column (columns: [])", f"{manifest}: no 'uri' column (columns: [])")


def test_a_header_without_rows_is_a_manifest_of_no_rows_whose_columns_are_still_checked(tmp_path):
    # the data sets used to check the columns only when there were rows
    manifest = _csv(tmp_path / "m.csv", "uri,label\n")
    assert _job_rows(manifest) == [] and read_manifest(manifest).samples == []
    no_label = _csv(tmp_path / "n.csv", "uri\n")
    assert _job_rows(no_label) == []
    with pytest.raises(DatasetError, match=rf"^{re.escape(no_label)}: no 'label' column \(columns: \['uri'\]\)$"):
        read_manifest(no_label)


def test_a_parquet_uri_column_of_numbers_is_refused_by_both(tmp_path):
    # the data sets used to take 1 for the file '1'
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"uri": [1, 2], "label": ["cat", "dog"]}), manifest)
    _both_refuse(
        manifest,
        f"manifest {manifest}: column 'uri' must hold strings, not int64",
        f"{manifest}: column 'uri' must hold strings, not int64",
    )


def test_the_reader_gives_the_asked_columns_it_has_and_a_block_even_without_rows(tmp_path):
    manifest = str(tmp_path / "m.parquet")
    table = pa.table({"uri": pa.array([], pa.string()), "label": pa.array([], pa.int32()), "other": pa.array([], pa.string())})
    pq.write_table(table.replace_schema_metadata({b"k": b"v"}), manifest)
    (block,) = list(read_manifest_rows(manifest, ("uri", "label", "width")))
    assert (block.first_row, block.num_rows, block.columns) == (0, 0, {"uri": [], "label": []})
    assert block.types == {"uri": pa.string(), "label": pa.int32()} and block.metadata[b"k"] == b"v"
    with pytest.raises(ManifestError, match=r"no 'width' column"):
        list(read_manifest_rows(manifest, ("uri",), required=("uri", "width")))


def test_a_missing_manifest_is_a_data_set_error(tmp_path):
    with pytest.raises(DatasetError, match="manifest not found"):
        read_manifest(str(tmp_path / "none.csv"))
