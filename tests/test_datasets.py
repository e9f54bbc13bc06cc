"""The data-set readers: CUB, ILSVRC (XML and CSV), wsolevaluation metadata, manifests."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pro2sam.datasets import (
    DatasetError,
    WSOLDataset,
    open_dataset,
    read_cub,
    read_ilsvrc,
    read_manifest,
    read_wsol_metadata,
)


def _image(path: Path, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 80, 40)).save(path)
    return path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- CUB


def _cub(root: Path, *, boxes="1 2.0 3.0 10.0 20.0\n2 0 0 40 30\n3 5 5 5 5\n") -> Path:
    _write(root / "classes.txt", "1 001.Albatross\n2 002.Auklet\n")
    _write(root / "images.txt", "1 001.Albatross/a_1.jpg\n2 001.Albatross/a_2.jpg\n3 002.Auklet/b_1.jpg\n")
    _write(root / "image_class_labels.txt", "1 1\n2 1\n3 2\n")
    _write(root / "train_test_split.txt", "1 1\n2 0\n3 0\n")
    _write(root / "bounding_boxes.txt", boxes)
    for rel in ("001.Albatross/a_1.jpg", "001.Albatross/a_2.jpg", "002.Auklet/b_1.jpg"):
        _image(root / "images" / rel)
    _image(root / "segmentations" / "002.Auklet" / "b_1.png")
    return root


def test_cub_splits_labels_and_xywh_boxes(tmp_path):
    root = _cub(tmp_path / "CUB")
    train, test = read_cub(root, "train"), read_cub(root, "test")
    assert train.class_names == ["001.Albatross", "002.Auklet"]
    assert [s.image_id for s in train.samples] == ["1"]
    assert [s.image_id for s in test.samples] == ["2", "3"]
    # 1-based class ids become 0-based indices; x, y, w, h becomes x, y, x + w, y + h
    assert train.samples[0].label == 0 and test.samples[1].label == 1
    np.testing.assert_array_equal(train.samples[0].boxes, [[2, 3, 12, 23]])
    np.testing.assert_array_equal(test.samples[0].boxes, [[0, 0, 40, 30]])  # edge-to-edge box is inside
    assert train.samples[0].uri == str(root / "images" / "001.Albatross" / "a_1.jpg")
    assert (train.samples[0].width, train.samples[0].height) == (40, 30)
    # segmentation masks are picked up where they exist
    assert test.samples[1].mask_uri == str(root / "segmentations" / "002.Auklet" / "b_1.png")
    assert test.samples[0].mask_uri is None


def test_cub_box_outside_image_names_file_and_line(tmp_path):
    root = _cub(tmp_path / "CUB", boxes="1 2 3 10 20\n2 0 0 40 30\n3 30 5 20 5\n")
    with pytest.raises(DatasetError, match=r"bounding_boxes\.txt:3: .*outside the 40x30 image"):
        read_cub(root, "test")


def test_cub_unknown_class_names_file_and_line(tmp_path):
    root = _cub(tmp_path / "CUB")
    _write(root / "image_class_labels.txt", "1 1\n2 7\n3 2\n")
    with pytest.raises(DatasetError, match=r"image_class_labels\.txt:2: unknown class id 7"):
        read_cub(root, "train")


def test_cub_unparsable_line_names_file_and_line(tmp_path):
    root = _cub(tmp_path / "CUB", boxes="1 2 3 10 20\n2 0 zero 40 30\n3 5 5 5 5\n")
    with pytest.raises(DatasetError, match=r"bounding_boxes\.txt:2: box coordinate is not a number"):
        read_cub(root, "train")


def test_cub_missing_image_names_file_and_line(tmp_path):
    root = _cub(tmp_path / "CUB")
    (root / "images" / "001.Albatross" / "a_2.jpg").unlink()
    with pytest.raises(DatasetError, match=r"images\.txt:2: image not found"):
        read_cub(root, "test")


# ---------------------------------------------------------------- ILSVRC


_XML = """<annotation><filename>{stem}</filename><size><width>40</width><height>30</height><depth>3</depth></size>
{objects}</annotation>"""
_OBJECT = (
    "<object><name>{wnid}</name>"
    "<bndbox><xmin>{0}</xmin><ymin>{1}</ymin><xmax>{2}</xmax><ymax>{3}</ymax></bndbox></object>"
)


def _ilsvrc(root: Path) -> Path:
    for wnid in ("n02", "n01"):
        _image(root / "train" / wnid / f"{wnid}_1.JPEG")
    _write(root / "LOC_synset_mapping.txt", "n01 tench, Tinca tinca\nn02 goldfish, Carassius auratus\n")
    for i in (1, 2):
        _image(root / "val" / f"ILSVRC2012_val_0000000{i}.JPEG")
    return root


def test_ilsvrc_train_class_order_is_sorted_wnids_with_names(tmp_path):
    ds = read_ilsvrc(_ilsvrc(tmp_path / "in"), "train")
    assert ds.class_names == ["tench", "goldfish"]
    assert [(s.image_id, s.label, s.boxes) for s in ds.samples] == [
        ("train/n01/n01_1.JPEG", 0, None),
        ("train/n02/n02_1.JPEG", 1, None),
    ]


def test_ilsvrc_val_keeps_every_box_from_xml(tmp_path):
    root = _ilsvrc(tmp_path / "in")
    two = _OBJECT.format(1, 2, 10, 12, wnid="n02") + _OBJECT.format(20, 5, 39, 29, wnid="n02")
    _write(root / "annotations" / "val" / "ILSVRC2012_val_00000001.xml", _XML.format(stem="1", objects=two))
    one = _OBJECT.format(0, 0, 40, 30, wnid="n01")
    _write(root / "annotations" / "val" / "ILSVRC2012_val_00000002.xml", _XML.format(stem="2", objects=one))
    ds = read_ilsvrc(root, "val")
    first, second = ds.samples
    assert first.label == 1 and second.label == 0
    np.testing.assert_array_equal(first.boxes, [[1, 2, 10, 12], [20, 5, 39, 29]])
    assert (first.width, first.height) == (40, 30)
    assert first.image_id == "val/ILSVRC2012_val_00000001.JPEG"


def test_ilsvrc_val_keeps_every_box_from_solution_csv(tmp_path):
    root = _ilsvrc(tmp_path / "in")
    _write(
        root / "LOC_val_solution.csv",
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000001,n02 1 2 10 12 n02 20 5 39 29 \n"
        "ILSVRC2012_val_00000002,n01 0 0 40 30 \n",
    )
    first, second = read_ilsvrc(root, "val").samples
    np.testing.assert_array_equal(first.boxes, [[1, 2, 10, 12], [20, 5, 39, 29]])
    assert (first.label, second.label) == (1, 0)


def test_ilsvrc_solution_csv_unknown_wnid_names_line(tmp_path):
    root = _ilsvrc(tmp_path / "in")
    _write(
        root / "LOC_val_solution.csv",
        "ImageId,PredictionString\nILSVRC2012_val_00000001,n02 1 2 10 12\nILSVRC2012_val_00000002,n99 0 0 4 4\n",
    )
    with pytest.raises(DatasetError, match=r"LOC_val_solution\.csv:3: unknown class 'n99'"):
        read_ilsvrc(root, "val")


def test_ilsvrc_xml_box_outside_image_names_file(tmp_path):
    root = _ilsvrc(tmp_path / "in")
    bad = _OBJECT.format(1, 2, 60, 12, wnid="n02")
    _write(root / "annotations" / "val" / "ILSVRC2012_val_00000001.xml", _XML.format(stem="1", objects=bad))
    _write(root / "annotations" / "val" / "ILSVRC2012_val_00000002.xml", _XML.format(stem="2", objects=bad))
    with pytest.raises(DatasetError, match=r"ILSVRC2012_val_00000001\.xml: box .* outside the 40x30 image"):
        read_ilsvrc(root, "val")


# ---------------------------------------------------------------- wsolevaluation metadata


def _wsol_cub(meta: Path, data: Path, localization: str) -> None:
    _image(data / "a" / "1.jpg")
    _image(data / "b" / "2.jpg")
    split = meta / "test"
    _write(split / "image_ids.txt", "a/1.jpg\nb/2.jpg\n")
    _write(split / "class_labels.txt", "a/1.jpg,0\nb/2.jpg,1\n")
    _write(split / "image_sizes.txt", "a/1.jpg,40,30\nb/2.jpg,40,30\n")
    _write(split / "localization.txt", localization)


def test_wsol_metadata_one_line_per_box(tmp_path):
    _wsol_cub(tmp_path / "meta", tmp_path / "data", "a/1.jpg,1,2,10,12\na/1.jpg,20,5,39,29\nb/2.jpg,0,0,39,29\n")
    ds = read_wsol_metadata(tmp_path / "meta", tmp_path / "data", "test")
    a, b = ds.samples
    assert (a.image_id, a.label, b.label) == ("a/1.jpg", 0, 1)
    np.testing.assert_array_equal(a.boxes, [[1, 2, 10, 12], [20, 5, 39, 29]])
    assert a.uri == str(tmp_path / "data" / "a" / "1.jpg") and a.size == (40, 30)
    assert ds.class_names == ["0", "1"]


def test_wsol_metadata_openimages_masks(tmp_path):
    data = tmp_path / "data"
    _image(data / "a" / "1_m0.png")
    _image(data / "a" / "1_m1.png")
    _image(data / "a" / "1_ignore.png")
    _image(data / "b" / "2_m0.png")
    localization = "a/1.jpg,a/1_m0.png,a/1_ignore.png\na/1.jpg,a/1_m1.png,a/1_ignore.png\nb/2.jpg,b/2_m0.png,\n"
    _wsol_cub(tmp_path / "meta", data, localization)
    a, b = read_wsol_metadata(tmp_path / "meta", data, "test").samples
    assert a.boxes is None
    assert a.mask_uris == (str(data / "a" / "1_m0.png"), str(data / "a" / "1_m1.png"))
    assert a.mask_uri == a.mask_uris[0] and a.ignore_uri == str(data / "a" / "1_ignore.png")
    assert b.mask_uris == (str(data / "b" / "2_m0.png"),) and b.ignore_uri is None


def test_wsol_metadata_box_outside_image_names_line(tmp_path):
    _wsol_cub(tmp_path / "meta", tmp_path / "data", "a/1.jpg,1,2,10,12\nb/2.jpg,0,0,39,90\n")
    with pytest.raises(DatasetError, match=r"localization\.txt:2: box .* outside the 40x30 image"):
        read_wsol_metadata(tmp_path / "meta", tmp_path / "data", "test")


def test_wsol_metadata_unparsable_line_names_line(tmp_path):
    _wsol_cub(tmp_path / "meta", tmp_path / "data", "a/1.jpg,1,2,10\n")
    with pytest.raises(DatasetError, match=r"localization\.txt:1: expected 2 or 3 or 5 fields, got 4"):
        read_wsol_metadata(tmp_path / "meta", tmp_path / "data", "test")


def test_wsol_metadata_missing_image_names_line(tmp_path):
    _wsol_cub(tmp_path / "meta", tmp_path / "data", "a/1.jpg,1,2,10,12\n")
    (tmp_path / "data" / "b" / "2.jpg").unlink()
    with pytest.raises(DatasetError, match=r"image_ids\.txt:2: image not found"):
        read_wsol_metadata(tmp_path / "meta", tmp_path / "data", "test")


# ---------------------------------------------------------------- manifests and specs


def test_manifest_rows_with_boxes_group_by_image(tmp_path):
    _image(tmp_path / "img" / "x.jpg")
    _image(tmp_path / "img" / "y.jpg")
    manifest = _write(
        tmp_path / "m.csv",
        "uri,label,x0,y0,x1,y1\nimg/x.jpg,cat,1,2,10,12\nimg/x.jpg,cat,20,5,39,29\nimg/y.jpg,dog,,,,\n",
    )
    ds = read_manifest(str(manifest))
    assert ds.class_names == ["cat", "dog"]
    x, y = ds.samples
    assert x.uri == str(tmp_path / "img" / "x.jpg") and x.image_id == "img/x.jpg"
    np.testing.assert_array_equal(x.boxes, [[1, 2, 10, 12], [20, 5, 39, 29]])
    assert (x.label, y.label, y.boxes) == (0, 1, None)


def test_manifest_integer_labels_with_given_class_names(tmp_path):
    manifest = _write(tmp_path / "m.csv", "uri,label\n/a.jpg,2\n/b.jpg,bird\n")
    ds = read_manifest(str(manifest), class_names=["cat", "dog", "bird"])
    assert [s.label for s in ds.samples] == [2, 2]


def test_manifest_unknown_class_names_line(tmp_path):
    manifest = _write(tmp_path / "m.csv", "uri,label\n/a.jpg,cat\n/b.jpg,zebra\n")
    with pytest.raises(DatasetError, match=r"m\.csv:3: unknown class 'zebra'"):
        read_manifest(str(manifest), class_names=["cat", "dog"])


def test_to_manifest_round_trips_through_parquet(tmp_path):
    _wsol_cub(tmp_path / "meta", tmp_path / "data", "a/1.jpg,1,2,10,12\na/1.jpg,20,5,39,29\nb/2.jpg,0,0,39,29\n")
    ds = read_wsol_metadata(tmp_path / "meta", tmp_path / "data", "test", class_names=["cat", "dog"])
    table = ds.to_manifest()
    assert table.num_rows == 3 and table.column("label").to_pylist() == ["cat", "cat", "dog"]
    pq.write_table(table, tmp_path / "m.parquet")
    back = open_dataset(str(tmp_path / "m.parquet"))
    assert isinstance(back, WSOLDataset) and back.class_names == ["cat", "dog"] and back.split == "test"
    for s, t in zip(ds.samples, back.samples):
        assert (s.image_id, s.uri, s.label, s.size) == (t.image_id, t.uri, t.label, t.size)
        np.testing.assert_array_equal(s.boxes, t.boxes)


def test_open_dataset_specs(tmp_path):
    _wsol_cub(tmp_path / "meta", tmp_path / "data", "a/1.jpg,1,2,10,12\n")
    assert len(open_dataset(f"wsol:{tmp_path / 'meta'}:{tmp_path / 'data'}:test")) == 2
    assert open_dataset(f"cub:{_cub(tmp_path / 'CUB')}:test").name == "cub"
    with pytest.raises(ValueError, match="unknown data-set spec"):
        open_dataset("imagenet")


def test_manifest_suffixes_are_recognised_in_any_case_as_the_labeling_job_does(tmp_path):
    _wsol_cub(tmp_path / "meta", tmp_path / "data", "a/1.jpg,1,2,10,12\n")
    table = read_wsol_metadata(tmp_path / "meta", tmp_path / "data", "test", class_names=["cat", "dog"]).to_manifest()
    pq.write_table(table, tmp_path / "M.PARQUET")
    assert open_dataset(str(tmp_path / "M.PARQUET")).class_names == ["cat", "dog"]
    _write(tmp_path / "LIST.CSV", "uri,label\n/a.jpg,cat\n")
    assert [s.uri for s in open_dataset(str(tmp_path / "LIST.CSV")).samples] == ["/a.jpg"]
