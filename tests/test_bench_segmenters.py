"""benchmarks/bench_segmenters.py runs two segmenters through the fast path on the same images."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_two_segmenters_side_by_side(tmp_path):
    import bench_segmenters

    out = tmp_path / "r.json"
    assert bench_segmenters.main(["--sams", "tiny", "synthetic", "--images", "1", "--points-per-side", "2",
                                  "--threads", "1", "--json", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert set(report) == {"tiny", "synthetic"}
    assert report["tiny"]["vs_base"] == 1.0
    for r in report.values():
        assert r["total"] > 0 and r["decode_ms_per_prompt"] > 0 and r["embed"] <= r["total"]


def test_a_checkpoint_names_one_of_the_segmenters():
    import bench_segmenters

    with pytest.raises(SystemExit):
        bench_segmenters.main(["--sams", "tiny", "synthetic", "--checkpoint", "vit_b=x.pth"])
