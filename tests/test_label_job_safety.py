"""The labeling job as a hostile user drives it: it never deletes what it did not write, never
labels an image twice, never hangs in silence, and says what is wrong in one line.

Real Ray (the session's local Ray in process; ``pro2sam label`` subprocesses with a Ray of their
own), real files (FIFOs, links, non-UTF-8 names), a real S3-protocol server, the tiny models.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    cli_label_args,
    encode,
    job_config,
    local_ray_cluster,
    output_rows,
    parquet_files,
    parse_summary,
    private_ray_tmpdir,
    readable_row_count,
    scene,
    write_scenes,
)

from PIL import Image

from pro2sam.output import LEASE_NAME, LabelsOutput
from pro2sam.pipeline.label_job import run_label_job
from pro2sam.storage import StorageError, image_id_for


def run_cli(args: list[str], *, timeout: float = 240) -> tuple[subprocess.CompletedProcess, bool]:
    """Run ``pro2sam label`` with a Ray of its own; (the process, whether it started a Ray)."""
    with private_ray_tmpdir() as (env, ray_tmp):
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
        started_ray = bool(list(ray_tmp.rglob("session_*")))
    return proc, started_ray


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pro2sam label: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "data" / "images"
    write_scenes(folder, 4)
    (tmp_path / "data" / "notes.txt").write_text("not an input")
    return folder


# ---------------------------------------------------------------- --overwrite deletes nothing of the user's


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["equal", "above"])
def test_overwrite_refuses_an_output_that_is_or_contains_the_input(tiny_checkpoints, images, where):
    data = images.parent
    before = tree(data)
    output = images if where == "equal" else data
    proc, started_ray = run_cli(cli_label_args(tiny_checkpoints, images, output, "--overwrite"))
    assert proc.returncode == 2
    assert "choose an output outside the input" in error_line(proc)
    assert not started_ray
    assert tree(data) == before, "nothing was deleted or written"


@pytest.mark.timeout(120)
def test_overwrite_refuses_a_bucket_root_above_the_input(ray_local, tiny_checkpoints, s3_bucket):
    import boto3

    s3 = boto3.client("s3")
    for i in range(2):
        s3.put_object(Bucket=s3_bucket, Key=f"images/{i}.png", Body=b"png")
    config = job_config(tiny_checkpoints, f"s3://{s3_bucket}/images/", f"s3://{s3_bucket}/", overwrite=True)
    with pytest.raises(ValueError, match="contains --input"):
        run_label_job(config)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == ["images/0.png", "images/1.png"]


@pytest.mark.timeout(300)
def test_overwrite_with_a_mistyped_input_keeps_the_labels(ray_local, tiny_checkpoints, images, tmp_path):
    output = tmp_path / "labels"
    run_label_job(job_config(tiny_checkpoints, images, output))
    before = output_rows(output)
    with pytest.raises(StorageError, match="does not exist"):
        run_label_job(job_config(tiny_checkpoints, tmp_path / "imagse", output, overwrite=True))
    assert output_rows(output) == before and len(before) == 4


@pytest.mark.timeout(300)
def test_overwrite_replaces_the_label_files_and_nothing_else(ray_local, tiny_checkpoints, images, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    output = tmp_path / "labels"
    first = run_label_job(job_config(tiny_checkpoints, images, output))
    (output / "notes.txt").write_text("mine")
    pq.write_table(pa.table({"x": [1]}), output / "my_stats.parquet")
    (output / "extra").mkdir()
    pq.write_table(pa.table({"x": [2]}), output / "extra" / "my_stats.parquet")
    manifest = output / "manifest.csv"
    manifest.write_text("uri\n" + "".join(f"{p}\n" for p in sorted(images.iterdir())))
    kept = {k: v for k, v in tree(output).items() if not k.startswith("part-")}

    second = run_label_job(job_config(tiny_checkpoints, manifest, output, overwrite=True))
    assert (second.ok, second.skipped) == (4, 0)
    assert {k: v for k, v in tree(output).items() if not k.startswith("part-")} == kept
    rows = output_rows(output)
    assert {r["run_id"] for r in rows} == {second.run_id} != {first.run_id}
    assert sorted(r["uri"] for r in rows) == sorted(str(p) for p in images.iterdir())


# ---------------------------------------------------------------- one writer, one row per image


@pytest.mark.timeout(600)
def test_a_second_run_on_the_same_output_is_refused_while_the_first_writes(tiny_checkpoints, tmp_path):
    images = write_scenes(tmp_path / "images", 48)
    output = tmp_path / "labels"
    first_args = cli_label_args(tiny_checkpoints, tmp_path / "images", output, "--batch-size", "2", "--rows-per-file", "4")
    with private_ray_tmpdir() as (env, _):
        first = subprocess.Popen(first_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.monotonic() + 120
        while not (output / LEASE_NAME).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second started"
        second, _ = run_cli(cli_label_args(tiny_checkpoints, tmp_path / "images", output))
        first_out, _ = first.communicate(timeout=400)
    assert second.returncode == 2
    assert "is being written by run" in error_line(second) and "--force" in error_line(second)
    assert first.returncode == 0, first_out[-3000:]
    rows = output_rows(output)
    assert sorted(r["uri"] for r in rows) == sorted(str(p) for p in images)
    assert not (output / LEASE_NAME).exists()


@pytest.mark.timeout(300)
def test_a_respelled_input_is_recognised_as_already_labeled(ray_local, tiny_checkpoints, images, tmp_path):
    output = tmp_path / "labels"
    run_label_job(job_config(tiny_checkpoints, images, output))
    link = tmp_path / "link"
    link.symlink_to(images)
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri\n" + "".join(f"file://{p}\n" for p in sorted(images.iterdir())))
    for spelling in (f"{images}/../images//", str(link), str(manifest)):
        summary = run_label_job(job_config(tiny_checkpoints, spelling, output))
        assert (summary.skipped, summary.ok, summary.error) == (4, 0, 0), spelling
    rows = output_rows(output)
    assert len(rows) == 4 and all(r["image_id"] == image_id_for(r["uri"]) for r in rows)


# ---------------------------------------------------------------- errors that pass are retried


@pytest.mark.timeout(300)
def test_read_errors_are_retried_by_a_rerun_and_other_errors_only_when_asked(ray_local, tiny_checkpoints, tmp_path):
    folder = tmp_path / "images"
    write_scenes(folder, 2)
    (folder / "notes.jpg").write_text("not a picture")
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri\nimages/scene_000.png\nimages/scene_001.png\nimages/late.png\nimages/notes.jpg\n")
    output = tmp_path / "labels"

    first = run_label_job(job_config(tiny_checkpoints, manifest, output))
    assert (first.ok, first.error) == (2, 2)
    kinds = {Path(r["uri"]).name: (r["status"], r["error_kind"]) for r in _rows(output)}
    assert kinds["late.png"] == ("error", "read") and kinds["notes.jpg"] == ("error", "image")

    scene(64, 48, seed=9).save(folder / "late.png")  # the storage problem passed
    scene(64, 48, seed=10).save(folder / "notes.jpg", format="PNG")  # the file was fixed
    second = run_label_job(job_config(tiny_checkpoints, manifest, output))
    assert (second.ok, second.error, second.skipped, second.retried) == (1, 0, 3, 1)
    third = run_label_job(job_config(tiny_checkpoints, manifest, output, retry_errors=True))
    assert (third.ok, third.error, third.skipped, third.retried) == (1, 0, 3, 1)
    rows = _rows(output)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}


@pytest.mark.timeout(300)
def test_an_image_replaced_at_the_same_path_is_relabeled_when_asked(ray_local, tiny_checkpoints, tmp_path):
    folder = tmp_path / "images"
    write_scenes(folder, 2)
    output = tmp_path / "labels"
    run_label_job(job_config(tiny_checkpoints, folder, output))
    scene(100, 60, seed=5).save(folder / "scene_000.png")  # another picture, another size
    unchanged = run_label_job(job_config(tiny_checkpoints, folder, output))
    assert unchanged.skipped == 2
    assert {Path(r["uri"]).name: r["width"] for r in _rows(output)}["scene_000.png"] == 64
    changed = run_label_job(job_config(tiny_checkpoints, folder, output, relabel_changed=True))
    assert (changed.ok, changed.skipped, changed.changed) == (1, 1, 1)
    rows = _rows(output)
    assert len(rows) == 2 and {Path(r["uri"]).name: r["width"] for r in rows}["scene_000.png"] == 100


@pytest.mark.timeout(300)
def test_an_image_replaced_at_the_same_path_in_a_manifest_is_relabeled_when_asked(ray_local, tiny_checkpoints, tmp_path):
    write_scenes(tmp_path / "images", 2)
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri\nimages/scene_000.png\nimages/scene_001.png\n")
    output = tmp_path / "labels"
    run_label_job(job_config(tiny_checkpoints, manifest, output))
    scene(100, 60, seed=5).save(tmp_path / "images" / "scene_000.png")  # another picture, another size
    unchanged = run_label_job(job_config(tiny_checkpoints, manifest, output))
    assert (unchanged.skipped, unchanged.changed) == (2, 0)
    changed = run_label_job(job_config(tiny_checkpoints, manifest, output, relabel_changed=True))
    assert (changed.ok, changed.skipped, changed.changed) == (1, 1, 1)
    assert "1 changed files relabeled" in str(changed)
    rows = _rows(output)
    assert len(rows) == 2 and {Path(r["uri"]).name: r["width"] for r in rows} == {"scene_000.png": 100, "scene_001.png": 72}
    again = run_label_job(job_config(tiny_checkpoints, manifest, output, relabel_changed=True))
    assert (again.skipped, again.changed) == (2, 0), "the new row carries the new file's fingerprint"


@pytest.mark.timeout(300)
def test_images_caught_half_written_are_read_errors_that_a_plain_rerun_relabels(ray_local, tiny_checkpoints, tmp_path, monkeypatch):
    import pro2sam.pipeline.label_job as label_job

    folder = tmp_path / "images"
    write_scenes(folder, 1)
    whole = encode(scene(64, 48, seed=7))
    (folder / "rewritten.png").write_bytes(whole)  # listed whole, then emptied by a writer starting over
    (folder / "growing.png").write_bytes(b"")  # listed empty, then half written
    (folder / "empty.png").write_bytes(b"")  # empty, and it stays so

    def writers_at_work(*args, **kwargs):  # the driver loads the models after listing, before reading
        (folder / "rewritten.png").write_bytes(b"")
        (folder / "growing.png").write_bytes(whole[: len(whole) // 2])
        return load_models(*args, **kwargs)

    load_models = label_job.load_models
    monkeypatch.setattr(label_job, "load_models", writers_at_work)
    output = tmp_path / "labels"
    first = run_label_job(job_config(tiny_checkpoints, folder, output))
    assert (first.ok, first.error) == (1, 3)
    rows = {Path(r["uri"]).name: r for r in _rows(output)}
    for name in ("rewritten.png", "growing.png"):
        assert rows[name]["error_kind"] == "read" and "changed after it was listed" in rows[name]["error"], rows[name]
    assert rows["empty.png"]["error_kind"] == "image" and rows["empty.png"]["error"] == "empty file (0 bytes)"

    monkeypatch.undo()
    (folder / "rewritten.png").write_bytes(whole)  # the writers finished
    (folder / "growing.png").write_bytes(whole)
    second = run_label_job(job_config(tiny_checkpoints, folder, output))
    assert (second.ok, second.error, second.retried, second.skipped) == (2, 0, 2, 2)
    rows = {Path(r["uri"]).name: (r["status"], r["error_kind"]) for r in _rows(output)}
    assert rows == {"scene_000.png": ("ok", None), "rewritten.png": ("ok", None), "growing.png": ("ok", None),
                    "empty.png": ("error", "image")}  # fmt: skip


def _rows(output: Path) -> list[dict]:
    return LabelsOutput(str(output)).read_table(["uri", "status", "error", "error_kind", "width"]).to_pylist()


# ---------------------------------------------------------------- no hangs, one row per entry


@pytest.mark.timeout(300)
def test_a_hostile_folder_gives_one_row_per_entry_and_finishes(ray_local, tiny_checkpoints, tmp_path):
    folder = tmp_path / "hostile"
    write_scenes(folder, 2)
    os.mkfifo(folder / "pipe.jpg")
    (folder / "zero.jpg").symlink_to("/dev/zero")
    (folder / "gone.jpg").symlink_to(folder / "nowhere.jpg")
    (folder / "loop.jpg").symlink_to("loop.jpg")
    with open(os.fsencode(str(folder)) + b"/caf\xe9.png", "wb") as f:
        scene(64, 48, seed=3).save(f, format="PNG")
    (folder / "big.png").write_bytes(b"\x89PNG" + bytes(300_000))
    Image.fromarray(np.full((1, 2000, 3), 128, np.uint8)).save(folder / "thin.png")
    output = tmp_path / "labels"
    summary = run_label_job(job_config(tiny_checkpoints, folder, output, max_bytes=200_000))
    rows = {Path(r["uri"]).name: r for r in _rows(output)}
    assert len(rows) == 9 == summary.inputs
    assert rows["scene_000.png"]["status"] == rows["scene_001.png"]["status"] == "ok"
    expected = {
        "pipe.jpg": ("input", "FIFO"),
        "zero": ("input", "character device"),
        "gone.jpg": ("input", "broken symbolic link"),
        "loop.jpg": ("input", "symbolic link loop"),
        "big.png": ("input", "over the limit of 200000 bytes"),
        "thin.png": ("image", "too elongated"),
    }
    for name, (kind, words) in expected.items():
        assert rows[name]["status"] == "error" and rows[name]["error_kind"] == kind, rows[name]
        assert words in rows[name]["error"], rows[name]["error"]
    odd = [r for n, r in rows.items() if n.startswith("caf")]
    assert odd[0]["error_kind"] == "input" and "not valid UTF-8" in odd[0]["error"]


# ---------------------------------------------------------------- what --input is


@pytest.mark.timeout(300)
@pytest.mark.parametrize("given", ["upper-case manifest", "one image file"])
def test_an_upper_case_manifest_or_one_image_file_is_labeled(ray_local, tiny_checkpoints, images, tmp_path, given):
    if given == "one image file":
        input_ = images / "scene_002.png"
    else:
        input_ = images.parent / "LIST.CSV"
        input_.write_text("uri,label\nimages/scene_002.png,disc\n")
    summary = run_label_job(job_config(tiny_checkpoints, input_, tmp_path / "labels"))
    assert (summary.inputs, summary.ok, summary.error) == (1, 1, 0)
    rows = output_rows(tmp_path / "labels")
    assert [Path(r["uri"]).name for r in rows] == ["scene_002.png"] and rows[0]["status"] == "ok"


@pytest.mark.timeout(120)
def test_a_folder_named_like_a_manifest_inside_the_output_is_refused_as_any_folder_is(tiny_checkpoints, tmp_path):
    folder = tmp_path / "labels" / "x.csv"
    write_scenes(folder, 1)
    with pytest.raises(ValueError, match="choose an output outside the input"):
        run_label_job(job_config(tiny_checkpoints, folder, tmp_path / "labels"))
    assert LabelsOutput(str(tmp_path / "labels")).parquet_paths() == [] and not (tmp_path / "labels" / LEASE_NAME).exists()


@pytest.mark.timeout(120)
def test_a_manifest_naming_images_in_the_output_fails_in_one_line_before_any_work(tiny_checkpoints, images, tmp_path):
    output = images.parent
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri\n" + "".join(f"{p}\n" for p in sorted(images.iterdir())))
    before = tree(output)
    proc, started_ray = run_cli(cli_label_args(tiny_checkpoints, manifest, output))
    assert proc.returncode == 2 and not started_ray
    assert error_line(proc).startswith(
        f"pro2sam label: error: manifest {manifest} line 2: {images}/scene_000.png lies in the output folder {output}"
    )
    assert tree(output) == before, "nothing was written"


# ---------------------------------------------------------------- fail fast, in one line, before Ray


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "option, words",
    [
        (["--points-per-side", "0"], "points_per_side must be 1..256, not 0"),
        (["--pred-iou-thresh", "7"], "pred_iou_thresh must be in [0, 1], not 7.0"),
        (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (["--sam", "vit_q"], "unknown SAM variant 'vit_q'"),
    ],
)
def test_a_bad_option_fails_in_one_line_before_ray(tiny_checkpoints, images, tmp_path, option, words):
    proc, started_ray = run_cli(cli_label_args(tiny_checkpoints, images, tmp_path / "out", *option))
    assert proc.returncode == 2 and words in error_line(proc)
    assert not started_ray and not (tmp_path / "out").exists()


def _broken_gtformer(tiny_checkpoints, tmp_path: Path, **changes) -> Path:
    gt_dir, _ = tiny_checkpoints
    broken = tmp_path / "gtformer"
    shutil.copytree(gt_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config.update(changes)
    (broken / "config.json").write_text(json.dumps(config))
    return broken


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "changes, words",
    [
        ({"class_names": [1, 2, 3]}, "class_names must be a list of strings"),
        ({"std": [0, 0, 0]}, "std must be positive"),
        ({"class_names": ["disc"]}, "class_names has 1 names for 3 classes"),
        ({"img_size": 0}, "img_size must be a positive multiple"),
    ],
)
def test_a_bad_gtformer_config_fails_before_any_image_is_labeled(ray_local, tiny_checkpoints, images, tmp_path, changes, words):
    from pro2sam.checkpoints import CheckpointError

    broken = _broken_gtformer(tiny_checkpoints, tmp_path, **changes)
    config = job_config(tiny_checkpoints, images, tmp_path / "out", gtformer=broken)
    with pytest.raises(CheckpointError, match=words):
        run_label_job(config)
    assert LabelsOutput(str(tmp_path / "out")).parquet_paths() == []


@pytest.mark.timeout(120)
def test_a_truncated_sam_checkpoint_is_one_line_before_ray(tiny_checkpoints, images, tmp_path):
    gt_dir, sam_path = tiny_checkpoints
    truncated = tmp_path / "sam.pth"
    truncated.write_bytes(sam_path.read_bytes()[:5000])
    args = cli_label_args((gt_dir, truncated), images, tmp_path / "out")
    proc, started_ray = run_cli(args)
    assert proc.returncode == 2 and "truncated or corrupt" in error_line(proc)
    assert not started_ray and "Traceback" not in proc.stderr


@pytest.mark.timeout(120)
def test_an_output_that_cannot_be_written_fails_before_ray(tiny_checkpoints, images, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc, started_ray = run_cli(cli_label_args(tiny_checkpoints, images, blocker / "out"))
    assert proc.returncode == 2 and "cannot write to the output" in error_line(proc)
    assert not started_ray


@pytest.mark.timeout(180)
def test_gpus_this_machine_does_not_have_are_refused_at_once(tiny_checkpoints, images, tmp_path):
    proc, _ = run_cli(cli_label_args(tiny_checkpoints, images, tmp_path / "out", "--gpus-per-actor", "1"))
    assert proc.returncode == 2
    assert "1 GPU (the cluster has 0)" in error_line(proc) and "cannot run it" in error_line(proc)


@pytest.mark.timeout(400)
def test_more_actors_than_cores_still_label_everything(tiny_checkpoints, images, tmp_path):
    proc, _ = run_cli(cli_label_args(tiny_checkpoints, images, tmp_path / "out", "--actors", "2"), timeout=380)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert parse_summary(proc.stdout) == {"inputs": 4, "ok": 4, "error": 0, "skipped": 0}


# ---------------------------------------------------------------- a clean stop


@pytest.mark.timeout(600)
def test_sigterm_stops_the_job_cleanly_and_keeps_what_was_committed(ray_local, tiny_checkpoints, tmp_path):
    images = write_scenes(tmp_path / "images", 64)
    output = tmp_path / "labels"
    args = cli_label_args(tiny_checkpoints, tmp_path / "images", output, "--batch-size", "2", "--rows-per-file", "4")
    with private_ray_tmpdir() as (env, _):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 300
        while readable_row_count(output) == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)  # what Kubernetes sends
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and "run the same command again" in stderr
    for crash in ("Aborted", "core dumped", "*** SIG", "Traceback"):
        assert crash not in stderr, stderr[-3000:]
    kept = readable_row_count(output)
    assert 0 < kept < 64 and not (output / LEASE_NAME).exists()

    summary = run_label_job(job_config(tiny_checkpoints, tmp_path / "images", output, batch_size=2))
    assert summary.skipped == kept and summary.ok == 64 - kept
    assert sorted(r["uri"] for r in output_rows(output)) == sorted(str(p) for p in images)


# ---------------------------------------------------------------- GPU nodes that come later


def report_gpu_node_group(cluster) -> None:
    """Tell the cluster's GCS, as an autoscaler (v2, KubeRay's) does at its start, that a node
    group of one GPU can grow from 0 to 1 node: the cluster can grow."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    gpu_group = autoscaler_pb2.NodeGroupConfig(name="gpu", resources={"CPU": 2, "GPU": 1}, min_count=0, max_count=1)
    config = autoscaler_pb2.ClusterConfig(node_group_configs=[gpu_group])
    GcsClient(address=cluster.address).report_cluster_config(config.SerializeToString())


@pytest.mark.timeout(600)
def test_gpu_nodes_that_join_after_the_job_starts_are_waited_for_and_used(tiny_checkpoints, tmp_path):
    """An autoscaling cluster starts without GPU workers: the job asks for GPUs and waits. (The
    test is its autoscaler: it reports the GPU node group, then adds the node.)"""
    images = write_scenes(tmp_path / "images", 6)
    output = tmp_path / "labels"
    with local_ray_cluster(num_cpus=3, num_gpus=0) as (cluster, env):
        report_gpu_node_group(cluster)
        args = cli_label_args(
            tiny_checkpoints, tmp_path / "images", output, "--ray-address", cluster.address,
            "--gpus-per-actor", "1", "--actors", "1", "--wait-for-resources", "300",
        )  # fmt: skip
        job = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(job.stderr), daemon=True)
        reader.start()
        deadline = time.monotonic() + 180
        while not any("waiting up to" in line for line in lines) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert job.poll() is None, "".join(lines)[-3000:]
        assert any("asked the autoscaler" in line for line in lines)
        cluster.add_node(num_cpus=2, num_gpus=1)  # the autoscaler's GPU worker arrives
        stdout = job.communicate(timeout=400)[0]
        reader.join(timeout=10)
    assert job.returncode == 0, "".join(lines)[-3000:]
    assert parse_summary(stdout) == {"inputs": 6, "ok": 6, "error": 0, "skipped": 0}
    assert sorted(r["uri"] for r in output_rows(output)) == sorted(str(p) for p in images)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "ask, lacking, fits",
    [
        (("--cpus-per-actor", "2"), "needs 3 CPU (the cluster has 2)", "pass --cpus-per-actor 1"),
        (("--gpus-per-actor", "1"), "needs 1 GPU (the cluster has 0)", "pass --gpus-per-actor 0"),
    ],
)
def test_a_cluster_without_an_autoscaler_refuses_what_it_lacks_at_once_naming_what_fits(
    tiny_checkpoints, tmp_path, ask, lacking, fits
):
    """A fixed 2-CPU cluster without GPUs (no autoscaler) asked for more than it has (each actor's
    CPUs plus 1 for decoding): the job ends in one line naming the option that fits, instead of
    waiting --wait-for-resources for what never comes."""
    write_scenes(tmp_path / "images", 2)
    output = tmp_path / "labels"
    with local_ray_cluster(num_cpus=2, num_gpus=0) as (cluster, env):
        args = cli_label_args(
            tiny_checkpoints, tmp_path / "images", output, "--ray-address", cluster.address, *ask,
            "--wait-for-resources", "600",
        )  # fmt: skip
        start = time.monotonic()
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=240)
        seconds = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc)
    assert lacking in line and "no autoscaler" in line and fits in line, line
    assert "asked the autoscaler" not in proc.stderr and seconds < 200, "refused, not waited for"
    assert not parquet_files(output)


# ---------------------------------------------------------------- exports


@pytest.mark.timeout(300)
def test_a_failed_export_leaves_the_previous_export_as_it_was(ray_local, tiny_checkpoints, images, tmp_path):
    output = tmp_path / "labels"
    run_label_job(job_config(tiny_checkpoints, images, output))
    coco = tmp_path / "coco.json"
    cmd = [sys.executable, "-m", "pro2sam", "export", "--format", "coco", "--output", str(coco)]
    ok = subprocess.run([*cmd, "--input", str(output), "--status", "OK"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    good = coco.read_bytes()
    assert len(json.loads(good)["annotations"]) == 4, "--status OK means ok"
    failed = subprocess.run([*cmd, "--input", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and "pro2sam export: error:" in failed.stderr
    assert coco.read_bytes() == good
    bogus = subprocess.run([*cmd, "--input", str(output), "--status", "okay"], capture_output=True, text=True, timeout=120)
    assert bogus.returncode == 2 and "invalid choice" in bogus.stderr
    assert coco.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
