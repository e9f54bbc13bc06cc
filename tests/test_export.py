"""Exports of the labels table: COCO JSON that pycocotools reads and scores, YOLO text files,
row filters, and reading in record batches."""

import json
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pro2sam.gtformer import gtformer_class_names
from pro2sam.export import EXPORT_COLUMNS, LabelFilter, export_coco, export_yolo
from pro2sam.reading import iter_label_rows
from pro2sam.rle import decode_mask
from pro2sam.labels import error_row, ok_row, rows_to_table
from pro2sam.model import Pro2SAM, Pro2SAMResult

from helpers import body_piece_and_speck, choose_planted

CLASSES = ["bird", "cat", "dog"]


def box_of(mask):
    ys, xs = np.nonzero(mask)
    return (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def disc(h, w, cx, cy, r):
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


def labeled(uri, mask, cls, *, match=0.8, box=None, source="sam", label=None):
    result = Pro2SAMResult(
        box_xyxy=box or box_of(mask), mask=mask, box_source=source, topk_classes=[cls, (cls + 1) % 3],
        topk_scores=[0.7, 0.2], topk_names=[CLASSES[cls], CLASSES[(cls + 1) % 3]], match_score=match,
        pred_iou=0.9, stability_score=0.95, coarse_map=np.full((14, 14), 0.5, np.float32), num_candidates=3,
    )  # fmt: skip
    return ok_row(uri.rsplit("/", 1)[-1], uri, label, result, model_ids={"gtformer": "g", "sam": "s"}, run_id="r")


def rect(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), bool)
    m[y0 : y1 + 1, x0 : x1 + 1] = True
    return m


@pytest.fixture
def labels_dir(tmp_path):
    """A labels folder of two Parquet files: 5 ok rows (classes 0, 1, 2, 0, 1; one a coarse-map
    fallback without a match score) and 1 error row."""
    rows = [
        labeled("s3://b/a.jpg", rect(30, 40, 10, 5, 29, 19), 2, match=0.9, label="dog"),
        labeled("s3://b/b.jpg", disc(60, 80, 40, 30, 20), 0, match=0.6, label="bird"),
        labeled("s3://b/c.jpg", disc(50, 50, 20, 25, 12) | rect(50, 50, 30, 30, 45, 45), 1, match=0.3),
        labeled("s3://b/d.jpg", rect(20, 20, 0, 0, 19, 19), 0, match=None, source="coarse_fallback", label="bird"),
        labeled("s3://b/e.jpg", disc(64, 48, 24, 40, 10), 1, match=0.75),
        error_row("f.jpg", "s3://b/f.jpg", None, "not an image file", kind="image", run_id="r"),
    ]
    folder = tmp_path / "labels"
    folder.mkdir()
    pq.write_table(rows_to_table(rows[:4]), folder / "part-0.parquet", row_group_size=2)
    pq.write_table(rows_to_table(rows[4:]), folder / "part-1.parquet", row_group_size=1)
    return folder


def run_coco_eval(gt: COCO, results: list[dict], iou_type: str) -> float:
    evaluation = COCOeval(gt, gt.loadRes(results), iou_type)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return evaluation.stats[0]


def test_coco_export_loads_in_pycocotools_and_scores_ap_1_against_itself(labels_dir, tmp_path):
    out = tmp_path / "coco.json"
    summary = export_coco(str(labels_dir), str(out))
    gt = COCO(str(out))
    assert (summary.images, summary.annotations) == (5, 5) == (len(gt.getImgIds()), len(gt.getAnnIds()))
    anns = gt.loadAnns(gt.getAnnIds())
    # loadRes treats any result with a bbox as a box result, so the two kinds are kept apart
    boxes = [{k: a[k] for k in ("image_id", "category_id", "bbox", "score")} for a in anns]
    masks = [{k: a[k] for k in ("image_id", "category_id", "segmentation", "score")} for a in anns]
    assert run_coco_eval(gt, boxes, "bbox") == pytest.approx(1.0)
    assert run_coco_eval(gt, masks, "segm") == pytest.approx(1.0)


def test_coco_fields_follow_the_labels_table(labels_dir, tmp_path):
    out = tmp_path / "coco.json"
    export_coco(str(labels_dir), str(out))
    data = json.loads(out.read_text())
    image = data["images"][0]
    assert (image["file_name"], image["width"], image["height"]) == ("s3://b/a.jpg", 40, 30)
    ann = data["annotations"][0]
    # box_xyxy (10, 5, 29, 19) holds inclusive indices: 20 x 15 pixels.
    assert ann["bbox"] == [10, 5, 20, 15]
    assert ann["area"] == 300 and ann["category_id"] == 2 and ann["score"] == pytest.approx(0.9)
    for ann in data["annotations"]:  # tight boxes equal the box pycocotools measures on the mask
        assert ann["bbox"] == mask_utils.toBbox(ann["segmentation"]).tolist()
        assert ann["area"] == int(mask_utils.area(ann["segmentation"]))
    fallback = next(a for a in data["annotations"] if a["box_source"] == "coarse_fallback")
    assert fallback["score"] == 0.0 and fallback["match_score"] is None
    assert {c["id"]: c["name"] for c in data["categories"]} == {0: "bird", 1: "cat", 2: "dog"}


def test_coco_categories_come_from_the_gtformer_config(labels_dir, tmp_path):
    gtformer = tmp_path / "gtformer"
    gtformer.mkdir()
    (gtformer / "config.json").write_text(json.dumps({"class_names": ["bird", "cat", "dog", "fish"]}))
    names = gtformer_class_names(str(gtformer))
    out = tmp_path / "coco.json"
    export_coco(str(labels_dir), str(out), class_names=names, filters=LabelFilter(classes=["bird"]))
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["categories"]] == ["bird", "cat", "dog", "fish"]
    assert {a["category_id"] for a in data["annotations"]} == {0}


def test_coco_categories_can_be_the_manifest_labels(labels_dir, tmp_path):
    out = tmp_path / "coco.json"
    summary = export_coco(str(labels_dir), str(out), category="label")
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["categories"]] == ["dog", "bird"]
    assert summary.annotations == 3 and summary.filtered == 3  # two rows without a label, one error


def test_yolo_detection_line_is_the_normalised_inclusive_box(labels_dir, tmp_path):
    export_yolo(str(labels_dir), str(tmp_path / "yolo"))
    # a.jpg: 40 x 30 image, box (10, 5, 29, 19) covers x in [10, 30), y in [5, 20).
    line = (tmp_path / "yolo" / "labels" / "a.txt").read_text()
    assert line == f"2 {20 / 40:.6f} {12.5 / 30:.6f} {20 / 40:.6f} {15 / 30:.6f}\n"
    data = yaml.safe_load((tmp_path / "yolo" / "data.yaml").read_text())
    assert data["names"] == {0: "bird", 1: "cat", 2: "dog"} and data["nc"] == 3
    images = (tmp_path / "yolo" / data["train"]).read_text().split()
    assert images == ["s3://b/a.jpg", "s3://b/b.jpg", "s3://b/c.jpg", "s3://b/d.jpg", "s3://b/e.jpg"]
    assert len(list((tmp_path / "yolo" / "labels").iterdir())) == 5


def test_yolo_segmentation_polygons_lie_inside_the_box(labels_dir, tmp_path):
    export_yolo(str(labels_dir), str(tmp_path / "yolo"), task="segment")
    rows = {r["uri"].rsplit("/", 1)[-1][:-4]: r for r in iter_label_rows(str(labels_dir)) if r["status"] == "ok"}
    for name, row in rows.items():
        fields = (tmp_path / "yolo" / "labels" / f"{name}.txt").read_text().split()
        assert int(fields[0]) == row["topk_classes"][0]
        xy = np.array(fields[1:], float).reshape(-1, 2) * [row["width"], row["height"]]
        x0, y0, x1, y1 = row["box_xyxy"]
        assert len(xy) >= 3
        assert (xy[:, 0] >= x0).all() and (xy[:, 0] <= x1 + 1).all(), name
        assert (xy[:, 1] >= y0).all() and (xy[:, 1] <= y1 + 1).all(), name


# ---------------------------------------------------------------- a mask in pieces, as labeling stores it


@pytest.fixture(scope="module")
def pieces_labels(tiny_checkpoints, tmp_path_factory):
    """A labels folder of one row labeled by stage 3 (:meth:`Pro2SAM.choose`) from a SAM mask
    with a body, a separate piece over the minimum component area and a speck under it."""
    gt_dir, sam_path = tiny_checkpoints
    model = Pro2SAM.from_checkpoints(gt_dir, sam="tiny", sam_checkpoint=sam_path, device="cpu")
    body, piece, speck = body_piece_and_speck()
    result = choose_planted(model, [body | piece | speck])
    folder = tmp_path_factory.mktemp("pieces") / "labels"
    folder.mkdir()
    row = ok_row("p", "s3://b/pieces.jpg", None, result, model_ids={"gtformer": "g", "sam": "s"}, run_id="r")
    pq.write_table(rows_to_table([row]), folder / "part-0.parquet")
    return folder, row, (body, piece)


def test_coco_segmentation_of_a_mask_in_pieces_has_the_annotations_bbox(pieces_labels, tmp_path):
    folder, row, _ = pieces_labels
    export_coco(str(folder), str(tmp_path / "coco.json"))
    (ann,) = json.loads((tmp_path / "coco.json").read_text())["annotations"]
    assert ann["bbox"] == [20, 60, 140, 100]  # box_xyxy (20, 60, 159, 159): the body and the piece
    segmentation = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
    assert mask_utils.toBbox(segmentation).tolist() == ann["bbox"]
    assert ann["area"] == int(mask_utils.area(segmentation)) == 100 * 100 + 8 * 8


def test_yolo_polygon_of_a_mask_in_pieces_covers_every_piece_inside_the_box(pieces_labels, tmp_path):
    folder, row, pieces = pieces_labels
    export_yolo(str(folder), str(tmp_path / "yolo"), task="segment")
    fields = (tmp_path / "yolo" / "labels" / "pieces.txt").read_text().split()
    h, w = row["height"], row["width"]
    xy = np.array(fields[1:], float).reshape(-1, 2) * [w, h]  # continuous pixel coordinates
    x0, y0, x1, y1 = row["box_xyxy"]
    assert (xy[:, 0] >= x0).all() and (xy[:, 0] <= x1 + 1).all()
    assert (xy[:, 1] >= y0).all() and (xy[:, 1] <= y1 + 1).all()
    drawn = np.zeros((h, w), np.uint8)  # vertices are pixel centres: index = coordinate - 0.5
    cv2.fillPoly(drawn, [np.round(xy - 0.5).astype(np.int32)], 1)
    for piece in pieces:
        assert drawn[piece].mean() == 1.0


def test_label_studio_brush_of_a_mask_in_pieces_lies_in_its_rectangle(pieces_labels, tmp_path):
    from pro2sam.label_studio import brush_module

    folder, row, _ = pieces_labels
    _, (task,), _ = label_studio_tasks(folder, tmp_path)
    result = {r["type"]: r for r in task["predictions"][0]["result"]}
    h, w = row["height"], row["width"]
    brush = brush_module().decode_rle(result["brushlabels"]["value"]["rle"]).reshape(h, w, 4)[..., 3] > 0
    ys, xs = np.nonzero(brush)
    rect = result["rectanglelabels"]["value"]
    left, top = rect["x"] * w / 100, rect["y"] * h / 100
    right, bottom = left + rect["width"] * w / 100, top + rect["height"] * h / 100
    # pixel i spans [i, i + 1): the brush's pixels fill the rectangle to its edges, not beyond
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == pytest.approx((left, top, right, bottom))


def exported_uris(labels_dir, tmp_path, filters):
    out = tmp_path / "filtered.json"
    export_coco(str(labels_dir), str(out), filters=filters)
    return sorted(i["file_name"].rsplit("/", 1)[-1] for i in json.loads(out.read_text())["images"])


def test_default_filter_keeps_ok_rows_only(labels_dir, tmp_path):
    assert exported_uris(labels_dir, tmp_path, LabelFilter()) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]


def test_status_none_keeps_error_rows_as_images_without_annotations(labels_dir, tmp_path):
    out = tmp_path / "all.json"
    summary = export_coco(str(labels_dir), str(out), filters=LabelFilter(status=None))
    assert (summary.images, summary.annotations) == (6, 5)
    assert exported_uris(labels_dir, tmp_path, LabelFilter(status="error")) == ["f.jpg"]


def test_min_match_score_drops_lower_scores_and_the_fallback(labels_dir, tmp_path):
    assert exported_uris(labels_dir, tmp_path, LabelFilter(min_match_score=0.6)) == ["a.jpg", "b.jpg", "e.jpg"]


def test_classes_filter_by_index_or_name(labels_dir, tmp_path):
    assert exported_uris(labels_dir, tmp_path, LabelFilter(classes=[1])) == ["c.jpg", "e.jpg"]
    assert exported_uris(labels_dir, tmp_path, LabelFilter(classes=["bird", 2])) == ["a.jpg", "b.jpg", "d.jpg"]


def test_export_reads_record_batches_of_bounded_size_never_whole_tables(labels_dir, tmp_path, monkeypatch):
    seen = []
    iter_batches = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("columns"))
        for batch in iter_batches(self, *args, **kwargs):
            seen.append(batch.num_rows)
            yield batch

    def whole_table(*args, **kwargs):
        raise AssertionError("the exporter read a whole table")

    read = pq.ParquetFile.read

    def keys_only(self, columns=None, **kwargs):
        # One row per image is decided on the key columns alone; the rows come in batches.
        if columns is None or not set(columns) <= {"image_id", "status"}:
            raise AssertionError(f"the exporter read whole columns {columns}")
        return read(self, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", keys_only)
    monkeypatch.setattr(pq, "read_table", whole_table)
    monkeypatch.setattr(pq, "ParquetDataset", whole_table)
    summary = export_coco(str(labels_dir), str(tmp_path / "coco.json"), batch_size=2, filters=LabelFilter(status=None))
    sizes = [s for s in seen if isinstance(s, int)]
    assert summary.images == 6 and sum(sizes) == 6
    assert len(sizes) >= 3 and max(sizes) <= 2
    assert all(columns == EXPORT_COLUMNS and "coarse_map" not in columns for columns in seen if not isinstance(columns, int))


def test_cli_functions_export_coco(labels_dir, tmp_path):
    from pro2sam.apps.cli import main

    out = tmp_path / "cli.json"
    argv = ["export", "--input", str(labels_dir / "part-0.parquet"), "--format", "coco", "--output", str(out), "--classes", "0"]
    assert main(argv) == 0
    assert len(COCO(str(out)).getImgIds()) == 2
    out_dir = tmp_path / "cli-yolo"
    argv = ["export", "--input", str(labels_dir), "--format", "yolo", "--yolo-task", "segment", "--output", str(out_dir)]
    assert main([*argv, "--min-match-score", "0.7"]) == 0
    assert sorted(p.name for p in (out_dir / "labels").iterdir()) == ["a.txt", "e.txt"]


# ---------------------------------------------------------------- Label Studio


def label_studio_tasks(labels_dir, tmp_path, **kwargs):
    from pro2sam.label_studio import export_label_studio

    out = tmp_path / "ls" / "tasks.json"
    summary = export_label_studio(str(labels_dir), str(out), **kwargs)
    return summary, json.loads(out.read_text()), out


def test_label_studio_brush_masks_decode_to_our_masks_pixel_for_pixel(labels_dir, tmp_path):
    from pro2sam.label_studio import brush_module

    _, tasks, _ = label_studio_tasks(labels_dir, tmp_path)
    ours = {r["uri"]: r for r in iter_label_rows(str(labels_dir)) if r["status"] == "ok"}
    assert len(tasks) == len(ours) == 5
    for task in tasks:
        row = ours[task["data"]["uri"]]
        brush = next(r for r in task["predictions"][0]["result"] if r["type"] == "brushlabels")
        h, w = brush["original_height"], brush["original_width"]
        rgba = brush_module().decode_rle(brush["value"]["rle"]).reshape(h, w, 4)  # Label Studio's decoder
        assert (rgba[..., 3] > 0).tolist() == decode_mask(row["mask_rle"]).tolist()
        assert brush["value"]["brushlabels"] == [row["topk_names"][0]]


def test_label_studio_rectangle_is_the_inclusive_box_in_percent(labels_dir, tmp_path):
    _, tasks, out = label_studio_tasks(labels_dir, tmp_path)
    a = next(t for t in tasks if t["data"]["uri"] == "s3://b/a.jpg")  # 40 x 30, box (10, 5, 29, 19)
    box = next(r for r in a["predictions"][0]["result"] if r["type"] == "rectanglelabels")
    value = box["value"]
    assert [value[k] for k in ("x", "y", "width", "height")] == pytest.approx([25.0, 100 * 5 / 30, 50.0, 50.0])
    assert value["rectanglelabels"] == ["dog"] and box["from_name"] == "box" and box["to_name"] == "image"
    assert a["predictions"][0]["score"] == pytest.approx(0.9)  # no confidence in the table: the match score
    assert a["data"]["image"] == "s3://b/a.jpg" and a["data"]["match_score"] == pytest.approx(0.9)
    config = (out.parent / "tasks.label_config.xml").read_text()
    assert '<BrushLabels name="mask" toName="image">' in config and '<Label value="dog"/>' in config


def test_label_studio_error_rows_become_tasks_without_predictions(labels_dir, tmp_path):
    summary, tasks, _ = label_studio_tasks(labels_dir, tmp_path, filters=LabelFilter(status=None))
    error = [t for t in tasks if t["data"]["status"] == "error"]
    assert len(tasks) == 6 and (summary.images, summary.annotations) == (6, 5)
    assert error == [{"data": {**error[0]["data"], "error": "not an image file"}}] and "predictions" not in error[0]


def test_image_locations_map_prefixes_and_local_files():
    from pro2sam.label_studio import ImageLocations

    locations = ImageLocations.parse(["s3://b/img/=https://cdn.example.com/img/"], local_files_root="/data/photos")
    assert locations("s3://b/img/x.jpg") == "https://cdn.example.com/img/x.jpg"
    assert locations("s3://other/x.jpg") == "s3://other/x.jpg"  # opened through a cloud storage
    assert locations("/data/photos/a b/c#1.jpg") == "/data/local-files/?d=a%20b/c%231.jpg"
    assert locations("/elsewhere/c.jpg") == "/elsewhere/c.jpg"
    with pytest.raises(ValueError, match="FROM=TO"):
        ImageLocations.parse(["no-equals-sign"])


def test_review_the_worst_two_then_export_the_rest_is_two_commands(labels_dir, tmp_path):
    from pro2sam.apps.cli import main

    page, out = tmp_path / "review.html", tmp_path / "rest.json"
    order = ["--order-by", "match_score", "--ascending"]
    assert main(["show", "--input", str(labels_dir), "--output", str(page), *order, "--limit", "2", "--where", "status = 'ok'"]) == 0
    assert main(["export", "--input", str(labels_dir), "--format", "coco", "--output", str(out), *order, "--offset", "2",
                 "--where", "status = 'ok'"]) == 0  # fmt: skip
    reviewed = re.findall(r'data-image-id="([^"]+)"', page.read_text())
    exported = [i["pro2sam_image_id"] for i in json.loads(out.read_text())["images"]]
    # match scores: c 0.3, b 0.6, e 0.75, a 0.9, d none (last)
    assert reviewed == ["c.jpg", "b.jpg"]
    assert sorted(exported) == ["a.jpg", "d.jpg", "e.jpg"]


def test_export_where_takes_sql_over_the_columns_and_class_score(labels_dir, tmp_path):
    from pro2sam.apps.cli import main

    out = tmp_path / "ls.json"
    argv = ["export", "--input", str(labels_dir), "--format", "label-studio", "--output", str(out)]
    assert main([*argv, "--where", "topk_names[1] = 'cat' OR (class_score > 0.6 AND match_score > 0.85)"]) == 0
    assert sorted(t["data"]["image_id"] for t in json.loads(out.read_text())) == ["a.jpg", "c.jpg", "e.jpg"]


def test_a_typo_in_where_ends_in_one_line(labels_dir, tmp_path, capsys):
    from pro2sam.apps.cli import main

    argv = ["export", "--input", str(labels_dir), "--format", "coco", "--output", str(tmp_path / "x.json")]
    assert main([*argv, "--where", "no_such_column > 1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pro2sam export: error: the selection's SQL failed:") and "no_such_column" in err
    assert "\n" not in err and not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("command", ["export", "show"])
@pytest.mark.parametrize(
    "where, named",
    [
        ("uri IN (SELECT column0 FROM read_csv('/etc/passwd', header = false, sep = ':'))", "/etc/passwd"),
        ("uri IN (SELECT * FROM read_csv('https://example.com/uris.csv'))", "https://example.com/uris.csv"),
    ],
)
def test_where_reads_the_labels_table_only_never_a_file_or_url(labels_dir, tmp_path, capsys, command, where, named):
    from pro2sam.apps.cli import main

    out = tmp_path / ("x.json" if command == "export" else "x.html")
    argv = [command, "--input", str(labels_dir), "--output", str(out), "--where", where]
    assert main([*argv, "--format", "coco"] if command == "export" else argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pro2sam {command}: error: the selection's SQL may use the labels table's columns only")
    assert f'Cannot access file "{named}"' in err and "\n" not in err and "root:" not in err
    assert not out.exists()


def test_fiftyone_coco_importer_reads_our_boxes_and_masks(labels_dir, tmp_path):
    """FiftyOne's own COCO parser (what ``COCODetectionDataset`` uses), without its database: a
    Dataset needs MongoDB, which does not run on our machines (README, "FiftyOne")."""
    fouc = pytest.importorskip("fiftyone.utils.coco")
    out = tmp_path / "coco.json"
    export_coco(str(labels_dir), str(out))
    _, classes, supercategories, images, annotations = fouc.load_coco_detection_annotations(str(out))
    rows = {r["uri"]: r for r in iter_label_rows(str(labels_dir)) if r["status"] == "ok"}
    for image_id, image in images.items():
        row = rows[image["file_name"]]
        (obj,) = annotations[image_id]
        w, h = image["width"], image["height"]
        detection = obj.to_detection((w, h), classes_map=classes, supercategory_map=supercategories, load_segmentation=True)
        x0, y0, x1, y1 = row["box_xyxy"]
        assert detection.label == row["topk_names"][0]
        assert detection.bounding_box == pytest.approx([x0 / w, y0 / h, (x1 - x0 + 1) / w, (y1 - y0 + 1) / h])
        assert (detection.mask == decode_mask(row["mask_rle"])[y0 : y1 + 1, x0 : x1 + 1]).all()


def test_coco_score_is_the_confidence_where_the_table_has_one(tmp_path):
    rows = [labeled("s3://b/a.jpg", rect(30, 40, 10, 5, 29, 19), 2, match=0.9), labeled("s3://b/b.jpg", disc(60, 80, 40, 30, 20), 0, match=0.6)]
    rows[0]["confidence"] = 0.25
    pq.write_table(rows_to_table(rows), tmp_path / "labels.parquet")
    export_coco(str(tmp_path / "labels.parquet"), str(tmp_path / "coco.json"))
    anns = json.loads((tmp_path / "coco.json").read_text())["annotations"]
    assert [(a["score"], a["score_is"]) for a in anns] == [(0.25, "confidence"), (pytest.approx(0.6), "match_score")]
    assert all("confidence" not in a for a in anns)  # FiftyOne reads score as the confidence; two would clash


def test_review_commands_run_on_an_s3_output_with_error_rows(labels_dir, tmp_path, s3_bucket):
    import s3fs

    from pro2sam.apps.cli import main

    s3fs.S3FileSystem().put(str(labels_dir) + "/", f"{s3_bucket}/run1/", recursive=True)
    labels = f"s3://{s3_bucket}/run1/"
    tasks = f"s3://{s3_bucket}/exports/tasks.json"
    argv = ["export", "--input", labels, "--format", "label-studio", "--output", tasks, "--status", "all"]
    assert main([*argv, "--order-by", "match_score", "--ascending", "--offset", "1", "--map-uri", "s3://b/=https://img/"]) == 0
    exported = json.loads(s3fs.S3FileSystem().cat(tasks))
    # match scores c 0.3 (skipped by the offset), b, e, a; then d (fallback) and f (error), no score
    assert sorted(t["data"]["image_id"] for t in exported) == ["a.jpg", "b.jpg", "d.jpg", "e.jpg", "f.jpg"]
    assert {t["data"]["image"] for t in exported} >= {"https://img/a.jpg"} and sum("predictions" in t for t in exported) == 4
    page = tmp_path / "errors.html"
    assert main(["show", "--input", labels, "--output", str(page), "--where", "status = 'error'", "--order-by", "confidence"]) == 0
    assert re.findall(r'data-image-id="([^"]+)"', page.read_text()) == ["f.jpg"]


# ---------------------------------------------------------------- what the exports write, and where


def test_yolo_leaves_out_an_image_whose_uri_holds_a_line_break_naming_and_counting_it(tmp_path, capsys, caplog):
    from pro2sam.apps.cli import main

    uris = [f"s3://b/img_{i:02d}.jpg" for i in range(18)] + ["s3://b/two\nlines.jpg", "s3://b/carriage\rreturn.jpg"]
    folder = tmp_path / "labels"
    folder.mkdir()
    rows = [labeled(uri, rect(20, 20, 2, 2, 9, 9), 0) for uri in uris]
    pq.write_table(rows_to_table(rows), folder / "part-0.parquet")
    out = tmp_path / "yolo"
    assert main(["export", "--input", str(folder), "--format", "yolo", "--output", str(out)]) == 0
    listed = (out / "images.txt").read_text().splitlines()
    assert listed == uris[:18] and len(list((out / "labels").iterdir())) == 18
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [
        "YOLO export: left out 's3://b/two\\nlines.jpg': its URI holds a line break, which images.txt cannot list",
        "YOLO export: left out 's3://b/carriage\\rreturn.jpg': its URI holds a line break, which images.txt cannot list",
    ]
    err = capsys.readouterr().err
    assert "18 images, 18 annotations, 1 categories (0 rows filtered out, 2 left out: their URI holds a line break)" in err


def test_exports_reports_and_galleries_are_as_readable_as_the_umask_allows(labels_dir, tmp_path):
    from pro2sam.apps.cli import main

    old = os.umask(0o002)
    try:
        assert main(["export", "--input", str(labels_dir), "--format", "coco", "--output", str(tmp_path / "c.json")]) == 0
        assert main(["export", "--input", str(labels_dir), "--format", "label-studio", "--output", str(tmp_path / "t.json")]) == 0
        assert main(["export", "--input", str(labels_dir), "--format", "yolo", "--output", str(tmp_path / "yolo")]) == 0
        assert main(["report", str(labels_dir), "--output", str(tmp_path / "qa.html")]) == 0
        assert main(["show", "--input", str(labels_dir), "--output", str(tmp_path / "g.html")]) == 0
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if labels_dir not in p.parents and p != labels_dir]
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in written}
    assert {"c.json", "t.json", "t.label_config.xml", "yolo/images.txt", "qa.json", "g.html"} <= set(modes)
    assert modes == {name: 0o775 if (tmp_path / name).is_dir() else 0o664 for name in modes}


@pytest.mark.parametrize("command", ["export", "export-yolo", "show", "report"])
def test_an_output_under_a_file_ends_in_one_line_naming_the_file(labels_dir, tmp_path, capsys, command):
    from pro2sam.apps.cli import main

    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    target = str(blocker / "sub" / "out")
    argv = {
        "export": ["export", "--input", str(labels_dir), "--format", "coco", "--output", target],
        "export-yolo": ["export", "--input", str(labels_dir), "--format", "yolo", "--output", target],
        "show": ["show", "--input", str(labels_dir), "--output", target],
        "report": ["report", str(labels_dir), "--output", target],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"error: cannot write {target}: {blocker} is a file, not a folder") and "\n" not in err
    assert blocker.read_text() == "mine"


def test_local_uris_read_and_write_where_the_plain_paths_do(labels_dir, tmp_path):
    from pro2sam.apps.cli import main

    plain, local = tmp_path / "plain.json", tmp_path / "local.json"
    assert main(["export", "--input", str(labels_dir), "--format", "coco", "--output", str(plain)]) == 0
    assert main(["export", "--input", f"local://{labels_dir}", "--format", "coco", "--output", f"local://{local}",
                 "--where", "status = 'ok'"]) == 0  # fmt: skip
    assert main(["export", "--input", f"local://{labels_dir}", "--format", "yolo", "--output", f"local://{tmp_path}/y"]) == 0
    assert main(["report", f"local://{labels_dir}", "--output", f"local://{tmp_path}/qa.html"]) == 0
    assert [i["file_name"] for i in json.loads(local.read_text())["images"]] == [
        i["file_name"] for i in json.loads(plain.read_text())["images"]
    ]
    assert (tmp_path / "y" / "images.txt").exists() and (tmp_path / "qa.json").exists()
    assert not list(tmp_path.glob("local:*")) and not Path("local:").exists()
