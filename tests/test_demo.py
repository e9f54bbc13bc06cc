"""``pro2sam demo`` end to end: generated data, the real Ray evaluation job, real Parquet, the gallery.

The tiny random-weight models stand in wherever the shipped ones are not needed: their numbers mean
nothing, but every stage runs. Sizes are small (a few images, a 4 x 4 grid); Ray is the session's.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pro2sam import shipped
from pro2sam.apps.cli import main
from pro2sam.apps.demo import run_demo
from pro2sam.report import BOX_ACCURACY, SUMMARY_METRICS

NUM_TEST, NUM_VAL, POINTS_PER_SIDE = 6, 4, 4


def run_captured(workdir: Path, **kwargs) -> tuple[dict, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = run_demo(workdir, num_test=NUM_TEST, num_val=NUM_VAL, points_per_side=POINTS_PER_SIDE, **kwargs)
    return summary, out.getvalue()


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory, tiny_checkpoints, ray_local):
    """(summary, printed text) of one demo run with the tiny random-weight models."""
    gtformer, sam_path = tiny_checkpoints
    workdir = tmp_path_factory.mktemp("demo")
    return run_captured(workdir, gtformer=gtformer, sam="tiny", sam_checkpoint=sam_path)


def test_every_image_of_both_splits_gets_an_ok_row(tiny_demo):
    summary, _ = tiny_demo
    rows = pq.read_table(summary["labels"], columns=["uri", "status"]).to_pylist()
    assert len(rows) == NUM_TEST + NUM_VAL
    assert {r["status"] for r in rows} == {"ok"}
    assert sum("/images/test/" in r["uri"] for r in rows) == NUM_TEST


def test_report_holds_both_methods_numbers_on_the_test_split(tiny_demo):
    summary, _ = tiny_demo
    report = json.loads(Path(summary["report_json"]).read_text())
    assert report["test_split"] == "test" and report["heldout_split"] == "val"
    assert report["test"]["num_images"] == NUM_TEST and report["heldout"]["num_images"] == NUM_VAL
    not_applicable = {("Pro2SAM", "MaxBoxAccV2"), ("GTFormer", "fallback_rate")}  # one box; no fallback
    for method in ("GTFormer", "Pro2SAM"):
        for key in (*SUMMARY_METRICS, BOX_ACCURACY[method]):
            value = report["results"][method].get(key)
            assert summary["results"][method][key] == value
            assert value is None if (method, key) in not_applicable else 0.0 <= value <= 100.0
    assert Path(summary["report_md"]).is_file()


def test_gallery_shows_each_test_image_with_its_coarse_map(tiny_demo):
    summary, _ = tiny_demo
    page = Path(summary["gallery"]).read_text()
    figures = re.findall(r'<figure class="overlay".*?</figure>', page, flags=re.S)
    assert summary["gallery_images"] == len(figures) == NUM_TEST
    assert all('<img class="coarse-map"' in f and "/images/test/" in f for f in figures)


def test_printed_summary_gives_the_numbers_and_the_paths(tiny_demo):
    summary, printed = tiny_demo
    header = next(line for line in printed.splitlines() if "GT-known Loc" in line)
    assert header.split() == ["Top-1", "Cls", "Top-1", "Loc", "Top-5", "Loc", "GT-known", "Loc", "MaxBoxAccV2", "mIoU", "fallback"]
    for method, name in (("Pro2SAM", "Pro2SAM"), ("GTFormer", "GTFormer only (coarse map)")):
        line = next(line for line in printed.splitlines() if line.strip().startswith(name + " "))
        values = [summary["results"][method][k] for k in SUMMARY_METRICS]
        assert line.split()[len(name.split()) :] == ["-" if v is None else f"{v:.1f}" for v in values]
    for key in ("labels", "report_md", "gallery"):
        assert str(summary[key]) in printed
    assert f"{NUM_TEST} test + {NUM_VAL} held-out" in printed


def test_cli_demo_exits_0_and_prints_the_summary(tmp_path, tiny_checkpoints, ray_local, capsys):
    gtformer, sam_path = tiny_checkpoints
    argv = [
        "demo", "--workdir", str(tmp_path / "demo"), "--num-test", "2", "--num-val", "2", "--points-per-side", "2",
        "--gtformer", str(gtformer), "--sam", "tiny", "--sam-checkpoint", str(sam_path),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "GT-known Loc" in printed and str(tmp_path / "demo" / "demo.html") in printed


def test_cli_demo_without_the_shipped_models_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shipped, "MODELS_DIR", tmp_path / "no_models")
    assert main(["demo", "--workdir", str(tmp_path / "demo")]) == 2
    assert "reinstall the package" in capsys.readouterr().err


def test_demo_runs_with_the_shipped_models_by_default(tmp_path, ray_local):
    summary, printed = run_captured(tmp_path / "demo")
    assert summary["models"]["sam"] == shipped.SAM_VARIANT
    assert summary["models"]["gtformer"] == str(shipped.gtformer_dir())
    assert summary["error_rows"] == {"test": 0, "val": 0}
    assert "GT-known Loc" in printed
    # the shipped SAM's own filter thresholds reach the labeling actors: candidates survive
    sources = pq.read_table(summary["labels"], columns=["box_source"]).column("box_source").to_pylist()
    assert sources.count("sam") >= len(sources) // 2


def test_demo_in_the_object_regime_uses_its_data_gtformer_and_sam(tmp_path, ray_local):
    summary, printed = run_captured(tmp_path / "demo", regime="object")
    assert summary["regime"] == "object" and "object regime" in printed
    assert summary["models"]["gtformer"] == str(shipped.gtformer_dir("object"))
    assert summary["models"]["sam_checkpoint"] == str(shipped.sam_checkpoint("object"))
    assert json.loads((Path(summary["data"]) / "synthetic.json").read_text())["regime"] == "object"
    assert summary["error_rows"] == {"test": 0, "val": 0}
