"""The pro2sam command, run as a user would."""

import json
import subprocess
import sys

from helpers import make_tiny_checkpoints, write_scenes

from pro2sam.rle import decode_mask


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pro2sam", *args], capture_output=True, text=True, timeout=300)


def test_predict_writes_a_line_per_image_and_an_error_line_for_a_broken_one(tmp_path):
    gt_dir, sam_path = make_tiny_checkpoints(tmp_path / "models")
    good = write_scenes(tmp_path / "images", 2)
    broken = tmp_path / "images" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "labels.jsonl"
    proc = run_cli(
        "predict", "--gtformer", str(gt_dir), "--sam", "tiny", "--sam-checkpoint", str(sam_path),
        "--points-per-side", "4", "--device", "cpu", str(good[0]), str(broken), str(good[1]), "-o", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "2 ok, 1 error" in proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "error", "ok"]
    assert "broken.jpg" in records[1]["path"] and records[1]["error"]
    mask = decode_mask(records[0]["mask_rle"])
    assert mask.shape == (records[0]["height"], records[0]["width"])
    assert mask.sum() == records[0]["mask_area"]


def test_a_wrong_sam_file_is_reported_without_a_traceback(tmp_path):
    gt_dir, _ = make_tiny_checkpoints(tmp_path / "models")
    fake = tmp_path / "sam_vit_b_01ec64.pth"
    fake.write_bytes(b"not the official weights")
    image = write_scenes(tmp_path / "images", 1)[0]
    proc = run_cli("predict", "--gtformer", str(gt_dir), "--sam", "vit_b", "--sam-checkpoint", str(fake), str(image))
    assert proc.returncode != 0
    assert "SHA-256" in proc.stderr and "Traceback" not in proc.stderr
