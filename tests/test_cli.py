"""The pro2sam command, run as a user would."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import cli_label_args, make_tiny_checkpoints, write_scenes

from pro2sam.output import LEASE_NAME
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


# ---------------------------------------------------------------- Ctrl-C while Ray starts


@pytest.fixture
def label_argv(tiny_checkpoints, tmp_path):
    """``pro2sam label`` of two scenes with the tiny models, as main() takes it, and its output."""
    write_scenes(tmp_path / "images", 2)
    output = tmp_path / "labels"
    return cli_label_args(tiny_checkpoints, tmp_path / "images", output)[3:], output


def ray_init_that(monkeypatch, init):
    """Make the job start Ray with ``init`` (no Ray runs in this process)."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)


def assert_stopped_with_the_resume_hint(status: int, err: str, output) -> None:
    assert status == 130, err
    assert err.strip().splitlines()[-1] == (
        f"pro2sam label: stopped by SIGINT: the rows committed so far are in {output}; run the same command "
        "again to label the rest"
    )
    assert "Traceback" not in err and not (output / LEASE_NAME).exists()


def test_ctrl_c_inside_ray_start_up_stops_with_the_resume_hint(label_argv, monkeypatch, capsys):
    from pro2sam.apps.cli import main

    def init(*args, **kwargs):
        raise KeyboardInterrupt  # Python's own SIGINT handler, as inside a library that reset ours

    argv, output = label_argv
    ray_init_that(monkeypatch, init)
    assert_stopped_with_the_resume_hint(main(argv), capsys.readouterr().err, output)


def test_sigint_that_ray_turns_into_a_start_up_error_still_stops_with_the_resume_hint(label_argv, monkeypatch, capsys):
    """The same Ctrl-C reaches the processes Ray is starting, and ray.init fails with an error of
    its own: the run was stopped, not broken."""
    from pro2sam.apps.cli import main

    def init(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)  # the handler interrupts this at once
        except BaseException:
            raise RuntimeError("Failed to start the GCS server: it was killed") from None
        raise AssertionError("SIGINT never arrived")

    argv, output = label_argv
    ray_init_that(monkeypatch, init)
    before = signal.getsignal(signal.SIGINT)  # pytest's, or SIG_IGN where the runner ignores SIGINT
    assert_stopped_with_the_resume_hint(main(argv), capsys.readouterr().err, output)
    assert signal.getsignal(signal.SIGINT) is before, "the subcommand's handler is put back"


def test_sigterm_inside_ray_start_up_stops_with_the_resume_hint(label_argv, monkeypatch, capsys):
    """ray.init puts in a SIGTERM handler of its own (sys.exit(signum)): a SIGTERM that lands
    while Ray starts is a stop (143, the hint), not a silent exit 15."""
    from pro2sam.apps.cli import main

    def init(*args, **kwargs):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init installs
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler interrupts this at once
        raise AssertionError("SIGTERM never arrived")

    argv, output = label_argv
    ray_init_that(monkeypatch, init)
    saved = signal.getsignal(signal.SIGTERM)
    try:
        status, err = main(argv), capsys.readouterr().err
    finally:
        signal.signal(signal.SIGTERM, saved)
    assert status == 143, err
    assert err.strip().splitlines()[-1] == (
        f"pro2sam label: stopped by SIGTERM: the rows committed so far are in {output}; run the same command "
        "again to label the rest"
    )
    assert not (output / LEASE_NAME).exists()


def test_an_output_that_is_a_file_ends_in_one_line(label_argv, tmp_path, capsys):
    from pro2sam.apps.cli import main

    argv, output = label_argv
    output.write_text("mine")
    for target in (output, output / "sub"):
        assert main([a if a != str(output) else str(target) for a in argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("pro2sam label: error: cannot write to the output") and "\n" not in err, err
    assert output.read_text() == "mine"


def test_the_gpu_options_reach_sams_settings_on_every_labeling_command(tmp_path):
    from pro2sam.apps.cli import _candidates, parse_args

    gpu = ["--dtype", "bfloat16", "--compile", "--memory-budget-mb", "512"]
    models = ["--gtformer", "g", "--sam", "vit_b"]
    commands = {
        "label": ["label", "--input", "i", "--output", "o", *models],
        "evaluate": ["evaluate", "--heldout", "a.csv", "--test", "b.csv", "--output", str(tmp_path), *models],
        "tune": ["tune", "--heldout", "a.csv", "--output", "s.json", *models],
        "predict": ["predict", *models, "x.png"],
    }
    for name, argv in commands.items():
        config = _candidates(parse_args([*argv, *gpu]), "vit_b")
        assert (config.dtype, config.compile, config.memory_budget_mb) == ("bfloat16", True, 512), name
        config = _candidates(parse_args(argv), "vit_b")
        assert (config.dtype, config.compile, config.memory_budget_mb) == ("float32", False, None), name


def test_the_grid_defaults_to_the_sam_variants_own_16_for_synthetic_and_32_for_the_official_ones():
    # the shipped SAM's filter thresholds were chosen at 16 x 16 (and the demo runs 16 x 16)
    from pro2sam.apps.cli import _labeling, parse_args
    from pro2sam.candidates import CandidateConfig
    from pro2sam.pipeline.settings import LabelingSettings

    def grid(*options):
        argv = ["label", "--input", "i", "--output", "o", "--gtformer", "shipped", *options]
        return _labeling(parse_args(argv)).candidate_config().points_per_side

    assert grid("--sam", "synthetic") == 16
    assert [grid("--sam", v, "--sam-checkpoint", "s.pth") for v in ("vit_h", "vit_l", "vit_b")] == [32, 32, 32]
    assert grid("--sam", "synthetic", "--points-per-side", "24") == 24
    # the library reads the same table when no candidate settings are given
    assert LabelingSettings(gtformer="g", sam="synthetic").candidate_config().points_per_side == 16
    assert CandidateConfig.resolve("vit_b", None).points_per_side == 32
    assert CandidateConfig.resolve("synthetic", CandidateConfig(points_per_side=8)).points_per_side == 8


def test_predict_runs_in_bfloat16_within_a_tiny_memory_budget(tmp_path):
    gt_dir, sam_path = make_tiny_checkpoints(tmp_path / "models")
    image = write_scenes(tmp_path / "images", 1)[0]
    out = tmp_path / "labels.jsonl"
    proc = run_cli(
        "predict", "--gtformer", str(gt_dir), "--sam", "tiny", "--sam-checkpoint", str(sam_path), "--points-per-side", "4",
        "--dtype", "bfloat16", "--memory-budget-mb", "1", "--device", "cpu", str(image), "-o", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["status"] for line in out.read_text().splitlines()] == ["ok"]
