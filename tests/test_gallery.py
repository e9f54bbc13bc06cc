"""The HTML gallery: one overlay per chosen row, as a real headless Chromium renders the page."""

import base64
import io
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import CHROMIUM, run_chromium
from pro2sam.apps.cli import main
from pro2sam.apps.query import build_gallery
from pro2sam.labels import error_row, ok_row, rows_to_table
from pro2sam.model import Pro2SAMResult

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs a headless browser at /usr/bin/chromium (apt-get install chromium)"
)


def labeled(path: Path, match: float | None, cls: int) -> dict:
    h, w = 48, 64
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)
    mask = np.zeros((h, w), bool)
    mask[10:30, 20:50] = True
    result = Pro2SAMResult(
        box_xyxy=(20, 10, 49, 29), mask=mask, box_source="sam" if match is not None else "coarse_fallback",
        topk_classes=[cls], topk_scores=[0.8], topk_names=[f"class<{cls}>"], match_score=match, pred_iou=0.9,
        stability_score=0.95, coarse_map=np.zeros((14, 14), np.float32), num_candidates=2,
    )  # fmt: skip
    return ok_row(path.stem, str(path), None, result, model_ids={}, run_id="r")


@pytest.fixture
def labels_file(tmp_path):
    """5 rows: 4 ok with match scores 0.9, 0.2, 0.7, none (fallback), 1 error (missing image)."""
    rows = [labeled(tmp_path / f"img{i}.png", m, i % 3) for i, m in enumerate([0.9, 0.2, 0.7, None])]
    rows.append(error_row("bad", str(tmp_path / "missing.png"), None, "not found", kind="read", run_id="r"))
    path = tmp_path / "labels.parquet"
    pq.write_table(rows_to_table(rows), path, row_group_size=2)
    return path


def dump_dom(page: Path, tmp_path: Path, fragment: str = "") -> str:
    """The DOM of ``page`` after Chromium has loaded it and run its script."""
    return run_chromium(page, tmp_path, "--dump-dom", fragment=fragment)


def overlays(dom: str) -> list[str]:
    return re.findall(r'<figure class="overlay"[^>]*>', dom)


def figures(dom: str) -> list[str]:
    """Each whole ``<figure class="overlay">`` element, in page order."""
    return re.findall(r'<figure class="overlay".*?</figure>', dom, flags=re.S)


def jpeg_size(data_uri_body: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(data_uri_body))).size


@needs_chromium
def test_browser_shows_one_overlay_per_row_with_embedded_jpegs(labels_file, tmp_path):
    page = tmp_path / "gallery.html"
    assert build_gallery(str(labels_file), str(page)) == 5
    dom = dump_dom(page, tmp_path)
    assert len(overlays(dom)) == 5
    thumbs = re.findall(r'<img src="data:image/jpeg;base64,([^"]+)"', dom)
    assert len(thumbs) == 4  # the error row's image is missing: a figure without an image
    assert all(Image.open(io.BytesIO(base64.b64decode(t))).format == "JPEG" for t in thumbs)
    assert "class&lt;0&gt;" in dom and "<class" not in dom  # names are escaped


@needs_chromium
def test_where_and_limit_change_the_overlay_count(labels_file, tmp_path):
    filtered, limited = tmp_path / "where.html", tmp_path / "limit.html"
    where = "match_score > 0.5 AND status='ok'"
    assert main(["show", "--input", str(labels_file), "--output", str(filtered), "--where", where]) == 0
    assert main(["show", "--input", str(labels_file), "--output", str(limited), "--limit", "2"]) == 0
    shown = overlays(dump_dom(filtered, tmp_path))
    assert len(shown) == 2 and all('data-status="ok"' in o for o in shown)
    assert len(overlays(dump_dom(limited, tmp_path))) == 2


@needs_chromium
def test_page_script_sorts_overlays_by_score(labels_file, tmp_path):
    page = tmp_path / "gallery.html"
    build_gallery(str(labels_file), str(page))
    scores = lambda dom: [re.search(r'data-match-score="([^"]*)"', o).group(1) for o in overlays(dom)]  # noqa: E731
    assert scores(page.read_text()) == ["0.9", "0.7", "0.2", "", ""]  # as written: best first
    assert scores(dump_dom(page, tmp_path, "#sort=match_score:asc")) == ["0.2", "0.7", "0.9", "", ""]


@needs_chromium
def test_coarse_map_flag_puts_a_heat_map_beside_each_shown_overlay(labels_file, tmp_path):
    page = tmp_path / "coarse.html"
    assert main(["show", "--input", str(labels_file), "--output", str(page), "--coarse-map"]) == 0
    shown = figures(dump_dom(page, tmp_path))
    assert len(shown) == 5
    for figure in shown:
        overlay = re.search(r'<img src="data:image/jpeg;base64,([^"]+)"', figure)
        heat = re.search(r'<img class="coarse-map" src="data:image/jpeg;base64,([^"]+)"[^>]*title="GTFormer', figure)
        if 'data-status="ok"' in figure:
            assert overlay and heat
            assert jpeg_size(heat.group(1)) == jpeg_size(overlay.group(1)) == (64, 48)
        else:  # the error row: no image, no coarse map
            assert not overlay and not heat


def test_without_the_flag_no_coarse_map_is_shown(labels_file, tmp_path):
    page = tmp_path / "gallery.html"
    build_gallery(str(labels_file), str(page))
    assert len(figures(page.read_text())) == 5
    assert 'class="coarse-map"' not in page.read_text()


@needs_chromium
def test_show_orders_by_a_score_ascending_and_limits(labels_file, tmp_path):
    page = tmp_path / "worst.html"
    argv = ["show", "--input", str(labels_file), "--output", str(page), "--order-by", "match_score", "--ascending"]
    assert main([*argv, "--limit", "2"]) == 0
    scores = [re.search(r'data-match-score="([^"]*)"', o).group(1) for o in overlays(dump_dom(page, tmp_path))]
    assert scores == ["0.2", "0.7"]
    assert main([*argv, "--offset", "2", "--limit", "5"]) == 0  # the rest of the same order; no score last
    scores = [re.search(r'data-match-score="([^"]*)"', o).group(1) for o in overlays(dump_dom(page, tmp_path))]
    assert scores == ["0.9", "", ""]


def test_captions_call_sams_estimate_predicted_iou(labels_file, tmp_path):
    page = tmp_path / "gallery.html"
    build_gallery(str(labels_file), str(page))
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page.read_text())
    assert sum("predicted IoU 0.900" in c for c in captions) == 4  # the ok rows; the error row has none
    assert not any(re.search(r"(?<!predicted )IoU \d", c) for c in captions)
