"""The QA report of a labels table: its numbers on a hand-made table, errors grouped, the most
doubtful rows, bounded memory on a large table, S3, and the page as headless Chromium shows it."""

import json
import re
import tracemalloc

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import CHROMIUM, run_chromium
from pro2sam.apps.cli import main
from pro2sam.labels import error_row, ok_row, rows_to_table
from pro2sam.model import Pro2SAMResult
from pro2sam.qa import Histogram, summarise_labels

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs a headless browser at /usr/bin/chromium (apt-get install chromium)"
)


def labeled(uri: str, *, match, confidence, name="cat", area=(10, 20), size=(40, 30)) -> dict:
    w, h = size
    mask = np.zeros((h, w), bool)
    mask[: area[0], : area[1]] = True
    result = Pro2SAMResult(
        box_xyxy=(0, 0, area[1] - 1, area[0] - 1), mask=mask, box_source="sam" if match is not None else "coarse_fallback",
        topk_classes=[0], topk_scores=[0.5], topk_names=[name], match_score=match,
        pred_iou=None if match is None else 0.9, stability_score=None if match is None else 0.8,
        coarse_map=np.zeros((14, 14), np.float32), num_candidates=1,
    )  # fmt: skip
    row = ok_row(uri.rsplit("/", 1)[-1], uri, None, result, model_ids={}, run_id="r")
    row["confidence"] = confidence
    return row


def hand_made_rows(folder: str) -> list[dict]:
    """6 ok rows (5 cat, 1 dog; one fallback), 3 error rows of two causes."""
    rows = [
        labeled(f"{folder}/a.png", match=0.1, confidence=0.2),
        labeled(f"{folder}/b.png", match=0.3, confidence=0.9),
        labeled(f"{folder}/c.png", match=0.5, confidence=0.4),
        labeled(f"{folder}/d.png", match=0.7, confidence=0.8),
        labeled(f"{folder}/e.png", match=None, confidence=0.1, area=(30, 40)),  # the fallback, whole image
        labeled(f"{folder}/f.png", match=0.9, confidence=0.95, name="dog"),
    ]
    for name, message in (("g", "truncated at 120 bytes"), ("h", "truncated at 4096 bytes"), ("i", "permission denied")):
        uri = f"{folder}/{name}.png"
        kind = "image" if "truncated" in message else "read"
        rows.append(error_row(name, uri, None, f"{uri}: {message}", kind=kind, run_id="r"))
    return rows


@pytest.fixture
def labels_dir(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = hand_made_rows(str(images))
    for row in rows[:6]:
        Image.fromarray(np.full((30, 40, 3), 120, np.uint8)).save(row["uri"])
    folder = tmp_path / "labels"
    folder.mkdir()
    pq.write_table(rows_to_table(rows[:5]), folder / "part-a-0.parquet", row_group_size=2)
    pq.write_table(rows_to_table(rows[5:]), folder / "part-b-0.parquet")
    return folder


def test_counts_distributions_and_classes_of_a_hand_made_table(labels_dir):
    data = summarise_labels(str(labels_dir), doubtful=3).to_dict()
    assert data["counts"] == {"images": 9, "ok": 6, "error": 3, "coarse_fallback": 1, "with_confidence": 6}
    assert data["error_kinds"] == {"image": 2, "read": 1}
    match = data["distributions"]["match_score"]
    assert (match["count"], match["min"], match["max"]) == (5, pytest.approx(0.1), pytest.approx(0.9))
    assert match["mean"] == pytest.approx(0.5) and match["median"] == pytest.approx(0.5, abs=0.01)
    area = data["distributions"]["mask_area_fraction"]  # 200 / 1200 five times, 1200 / 1200 once
    assert area["count"] == 6 and area["max"] == pytest.approx(1.0) and area["median"] == pytest.approx(1 / 6, abs=0.01)
    assert [(c["name"], c["count"], c["coarse_fallback"]) for c in data["classes"]] == [("cat", 5, 1), ("dog", 1, 0)]
    cat = data["classes"][0]["median"]
    assert 0.3 <= cat["match_score"] <= 0.5  # 0.1, 0.3, 0.5, 0.7: between the middle two
    assert cat["confidence"] == pytest.approx(0.4, abs=0.02)  # 0.1, 0.2, 0.4, 0.8, 0.9


def test_errors_are_grouped_by_cause_without_the_image_or_numbers(labels_dir):
    groups = summarise_labels(str(labels_dir)).to_dict()["errors"]["groups"]
    assert [(g["count"], g["kind"], g["pattern"]) for g in groups] == [
        (2, "image", "<image>: truncated at # bytes"),
        (1, "read", "<image>: permission denied"),
    ]
    assert groups[0]["example"].endswith("g.png: truncated at 120 bytes")


def test_most_doubtful_rows_are_the_least_confident(labels_dir):
    doubtful = summarise_labels(str(labels_dir), doubtful=3, batch_size=2).to_dict()["doubtful"]
    assert doubtful["ordered_by"] == "confidence"
    assert [r["image_id"] for r in doubtful["rows"]] == ["e.png", "a.png", "c.png"]


def test_without_confidence_the_fallback_and_lowest_match_scores_are_most_doubtful(tmp_path):
    rows = hand_made_rows(str(tmp_path))
    for row in rows:
        row["confidence"] = None
    pq.write_table(rows_to_table(rows), tmp_path / "labels.parquet")
    doubtful = summarise_labels(str(tmp_path / "labels.parquet"), doubtful=2).to_dict()["doubtful"]
    assert doubtful["ordered_by"] == "match_score"
    assert [r["image_id"] for r in doubtful["rows"]] == ["e.png", "a.png"]


def test_histogram_percentiles_are_within_a_bin_of_numpys():
    values = np.random.default_rng(0).beta(2, 5, size=10_000)
    histogram = Histogram(0.0, 1.0, bins=100)
    for chunk in np.array_split(values, 7):
        histogram.add(np.concatenate([chunk, [np.nan]]))
    assert histogram.n == 10_000 and histogram.total == pytest.approx(values.sum())
    for q in (0.1, 0.5, 0.9):
        assert histogram.quantile(q) == pytest.approx(np.quantile(values, q), abs=0.01)


def test_memory_does_not_grow_with_the_table(tmp_path):
    """Ten times the rows, about the same peak of Python memory: state of a fixed size."""
    base = hand_made_rows(str(tmp_path))

    def table_of(n: int) -> str:
        rows = [{**base[i % len(base)], "image_id": f"{i:08d}"} for i in range(n)]
        path = tmp_path / f"labels-{n}.parquet"
        pq.write_table(rows_to_table(rows), path, row_group_size=500)
        return str(path)

    small, large = table_of(2_000), table_of(20_000)
    peaks = []
    for path in (small, small, large):  # the first run pays for imports and caches
        tracemalloc.start()
        summary = summarise_labels(path, doubtful=10, batch_size=500)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert summary.counts["images"] == 20_000 and len(summary.doubtful_rows()[1]) == 10
    assert peaks[2] < 1.5 * peaks[1] + 2**20, peaks


def test_report_reads_an_s3_output_and_shows_its_images(s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    rows = hand_made_rows(f"s3://{s3_bucket}/images")
    for row in rows[:6]:
        image = tmp_path / "x.png"
        Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(image)
        fs.put(str(image), row["uri"])
    local = tmp_path / "part-s3-0.parquet"
    pq.write_table(rows_to_table(rows), local)
    fs.put(str(local), f"{s3_bucket}/run1/part-s3-0.parquet")
    out = f"s3://{s3_bucket}/reports/qa.html"
    assert main(["report", f"s3://{s3_bucket}/run1/", "--output", out, "--doubtful", "2"]) == 0
    page = fs.cat(out).decode()
    data = json.loads(fs.cat(f"s3://{s3_bucket}/reports/qa.json"))
    assert data["counts"]["error"] == 3 and data["source"] == f"s3://{s3_bucket}/run1/"
    assert len(re.findall(r'<figure class="overlay".*?<img src="data:image/jpeg', page, flags=re.S)) == 2


@needs_chromium
def test_browser_shows_the_report_with_its_plots_tables_and_doubtful_overlays(labels_dir, tmp_path):
    page = tmp_path / "qa.html"
    assert main(["report", str(labels_dir), "--output", str(page), "--doubtful", "4"]) == 0
    dom = run_chromium(page, tmp_path, "--dump-dom")
    plots = re.findall(r'<img class="plot" alt="([^"]+)" src="data:image/png;base64,', dom)
    assert plots == ["histograms of the scores", "images per top-1 class"]
    counts = re.search(r'<table class="counts">.*?<tbody><tr>(.*?)</tr>', dom, flags=re.S).group(1)
    assert re.findall(r"<td>([^<]*)</td>", counts) == ["9", "6", "3", "1", "6"]
    assert len(re.findall(r'<figure class="overlay"', dom)) == 4
    assert "&lt;image&gt;: truncated at # bytes" in dom
    assert json.loads(page.with_suffix(".json").read_text())["counts"]["ok"] == 6
    shot = tmp_path / "qa.png"
    run_chromium(page, tmp_path, "--window-size=1200,2000", f"--screenshot={shot}")
    picture = np.asarray(Image.open(shot).convert("RGB"))
    assert picture.shape == (2000, 1200, 3)
    assert (picture[..., 2] > picture[..., 0] + 60).any()  # the blue bars of the plots are drawn
