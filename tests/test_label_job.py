"""The labeling job end to end: real Ray, real Parquet files, the tiny random-weight models.

In-process runs share the session's local Ray (``ray_local``). The run that is interrupted and the
rerun of a finished output use the ``pro2sam label`` command as a user would, each with a Ray temp
folder of its own, so that a killed run leaves nothing behind in the shared ``/tmp/ray``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    POINTS_PER_SIDE,
    TINY_CLASSES,
    assert_each_input_once,
    cli_label_args,
    encode,
    job_config,
    output_rows,
    parquet_files,
    parse_summary,
    png_header_claiming,
    private_ray_tmpdir,
    readable_row_count,
    scene,
    write_scenes,
)
from PIL import Image

from pro2sam.pipeline.label_job import run_label_job

# The mixed folder's job refuses images over this many pixels; its good images are all below it.
MAX_PIXELS = 20_000


# ---------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def reference_model(tiny_checkpoints):
    """The same models and settings as the job, in this process."""
    from pro2sam.model import Pro2SAM
    from pro2sam.candidates import CandidateConfig

    gt_dir, sam_path = tiny_checkpoints
    candidates = CandidateConfig(points_per_side=POINTS_PER_SIDE, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    return Pro2SAM.from_checkpoints(gt_dir, sam="tiny", sam_checkpoint=sam_path, device="cpu", candidates=candidates)


# file name -> a word the error must contain
BAD_FILES = {
    "empty.png": "empty",
    "notes.jpg": "not an image",
    "truncated.jpg": "truncated or corrupt",
    "corrupt.png": "truncated or corrupt",
    "too_many_pixels.png": "over the limit",
    "bomb_header.png": "over the limit",
}
ROTATED = "exif_rotated.jpg"  # stored 96 wide x 64 high, EXIF orientation 6: displayed 64 x 96


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """Good images of every kind we convert, and every kind of bad file, side by side."""
    folder = tmp_path_factory.mktemp("mixed")
    rgb = scene(96, 64, seed=1)
    rotated_exif = Image.Exif()
    rotated_exif[0x0112] = 6
    good = {
        "rgb.png": encode(scene(120, 80, seed=0)),
        "gray.png": encode(scene(80, 96, seed=2).convert("L")),
        "rgba.png": encode(scene(64, 64, seed=3).convert("RGBA")),
        "cmyk.jpg": encode(scene(100, 72, seed=4).convert("CMYK"), "JPEG", quality=95),
        "gray16.png": encode(Image.fromarray(np.asarray(scene(88, 64, seed=5).convert("L"), np.uint16) * 257)),
        "palette.png": encode(scene(72, 104, seed=6).convert("P")),
        ROTATED: encode(rgb, "JPEG", quality=95, exif=rotated_exif),
    }
    jpeg = encode(scene(160, 120, seed=7), "JPEG", quality=90)
    corrupt = bytearray(encode(scene(96, 64, seed=8)))
    idat = corrupt.index(b"IDAT")
    corrupt[idat + 8 : idat + 72] = bytes(64)
    bad = {
        "empty.png": b"",
        "notes.jpg": b"these are notes, not a picture\n" * 20,
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "corrupt.png": bytes(corrupt),
        "too_many_pixels.png": encode(scene(200, 150, seed=9)),  # 30,000 pixels > MAX_PIXELS
        "bomb_header.png": png_header_claiming(20_000, 20_000),
    }
    assert set(bad) == set(BAD_FILES)
    for name, data in {**good, **bad}.items():
        (folder / name).write_bytes(data)
    assert Image.open(folder / "gray16.png").mode.startswith("I")
    assert Image.open(folder / "cmyk.jpg").mode == "CMYK"
    return folder


GOOD_FILES = ["rgb.png", "gray.png", "rgba.png", "cmyk.jpg", "gray16.png", "palette.png", ROTATED]


@pytest.fixture(scope="module")
def mixed_run(ray_local, tiny_checkpoints, mixed_folder, tmp_path_factory):
    """The job over the mixed folder: (summary, {file name: row}, output folder)."""
    output = tmp_path_factory.mktemp("mixed_labels") / "out"
    cfg = job_config(tiny_checkpoints, mixed_folder, output, max_pixels=MAX_PIXELS, batch_size=4)
    summary = run_label_job(cfg)
    rows = {Path(r["uri"]).name: r for r in output_rows(output)}
    return summary, rows, output


# ---------------------------------------------------------------- bad input loses nothing


@pytest.mark.timeout(300)
def test_every_input_of_a_mixed_folder_gets_exactly_one_row(mixed_run, mixed_folder):
    _, _, output = mixed_run
    assert_each_input_once(output, sorted(mixed_folder.iterdir()))


@pytest.mark.timeout(300)
def test_good_images_of_every_kind_are_labeled_as_in_process(mixed_run, mixed_folder, reference_model):
    _, rows, _ = mixed_run
    for name in GOOD_FILES:
        row = rows[name]
        assert row["status"] == "ok", (name, row["error"])
        expected = reference_model.predict([mixed_folder / name])[0]
        assert (row["height"], row["width"]) == expected.mask.shape, name
        assert tuple(row["box_xyxy"]) == expected.box_xyxy, name


@pytest.mark.timeout(300)
def test_bad_files_get_error_rows_that_say_why(mixed_run):
    _, rows, _ = mixed_run
    for name, word in BAD_FILES.items():
        row = rows[name]
        assert row["status"] == "error", name
        assert word in row["error"], (name, row["error"])
        assert row["box_xyxy"] is None


@pytest.mark.timeout(300)
def test_the_summary_counts_ok_and_error_rows(mixed_run):
    summary, _, _ = mixed_run
    n_good, n_bad = len(GOOD_FILES), len(BAD_FILES)
    assert (summary.inputs, summary.ok, summary.error, summary.skipped) == (n_good + n_bad, n_good, n_bad, 0)
    assert f"{n_good + n_bad} inputs: {n_good} ok, {n_bad} error, 0 skipped" in str(summary)


@pytest.mark.timeout(300)
def test_exif_orientation_is_applied_before_the_box(mixed_run):
    _, rows, _ = mixed_run
    row = rows[ROTATED]
    assert (row["width"], row["height"]) == (64, 96)  # stored 96 x 64, rotated for display
    x0, y0, x1, y1 = row["box_xyxy"]
    assert 0 <= x0 <= x1 < 64 and 0 <= y0 <= y1 < 96


# ---------------------------------------------------------------- querying the output


README_QUERY = (
    "SELECT uri, box_xyxy, topk_names[1] AS class, match_score "
    "FROM read_parquet('{output}/*.parquet') WHERE status = 'ok'"
)


@pytest.mark.timeout(300)
def test_duckdb_reads_the_ok_rows_of_the_output_folder(mixed_run):
    import duckdb

    _, rows, output = mixed_run
    result = duckdb.connect().execute(README_QUERY.format(output=output)).fetchall()
    got = {Path(uri).name: (list(box), cls) for uri, box, cls, _ in result}
    assert sorted(got) == sorted(GOOD_FILES)
    for name, (box, cls) in got.items():
        assert box == rows[name]["box_xyxy"]
        assert cls in TINY_CLASSES


# ---------------------------------------------------------------- run again


@pytest.mark.timeout(300)
def test_a_finished_run_run_again_does_no_model_work(mixed_run, mixed_folder, tiny_checkpoints, tmp_path):
    _, rows, finished = mixed_run
    output = tmp_path / "out"
    shutil.copytree(finished, output)
    with private_ray_tmpdir() as (env, ray_tmp):
        proc = subprocess.run(
            cli_label_args(tiny_checkpoints, mixed_folder, output, "--max-pixels", str(MAX_PIXELS)),
            capture_output=True, text=True, env=env, timeout=240,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert not list(ray_tmp.rglob("session_*")), "no Ray was started"
    n = len(rows)
    assert parse_summary(proc.stdout) == {"inputs": n, "ok": 0, "error": 0, "skipped": n}
    assert "0 to label" in proc.stderr
    assert output_rows(output) == output_rows(finished)


# ---------------------------------------------------------------- manifests and --overwrite


@pytest.fixture(scope="module")
def manifest_run(ray_local, tiny_checkpoints, tmp_path_factory):
    """A job over a manifest CSV with relative paths: (manifest, {uri: label}, summary, output)."""
    root = tmp_path_factory.mktemp("manifest")
    scene(80, 64, seed=20).save(root / "a.png")
    (root / "sub").mkdir()
    scene(64, 96, seed=21).save(root / "sub" / "b.png")
    scene(96, 72, seed=22).save(root / "sub" / "c.jpg")
    manifest = root / "manifest.csv"
    manifest.write_text("uri,label\na.png,disc\nsub/b.png,square\nsub/c.jpg,\n")
    labels = {str(root / "a.png"): "disc", str(root / "sub" / "b.png"): "square", str(root / "sub" / "c.jpg"): None}
    output = root / "labels"
    summary = run_label_job(job_config(tiny_checkpoints, manifest, output))
    return manifest, labels, summary, output


@pytest.mark.timeout(300)
def test_manifest_labels_are_carried_into_the_label_column(manifest_run):
    _, labels, summary, output = manifest_run
    assert (summary.ok, summary.error) == (3, 0)
    rows = assert_each_input_once(output, [Path(u) for u in labels])
    assert {r["uri"]: r["label"] for r in rows} == labels


@pytest.mark.timeout(300)
def test_overwrite_starts_afresh(manifest_run, tiny_checkpoints, tmp_path):
    manifest, labels, first, finished = manifest_run
    output = tmp_path / "out"
    shutil.copytree(finished, output)
    summary = run_label_job(job_config(tiny_checkpoints, manifest, output, overwrite=True))
    assert summary.run_id != first.run_id
    assert (summary.ok, summary.error, summary.skipped) == (3, 0, 0)
    rows = assert_each_input_once(output, [Path(u) for u in labels])
    assert {r["run_id"] for r in rows} == {summary.run_id}


# ---------------------------------------------------------------- interruptions and faults

# Enough images for several 4-row files and two 32-row blocks, so that the first files are
# committed while the rest is still being labeled.
LONG_RUN_IMAGES = 64


@pytest.mark.timeout(600)
def test_an_interrupted_run_run_again_finishes_the_rest(ray_local, tiny_checkpoints, tmp_path):
    images = write_scenes(tmp_path / "images", LONG_RUN_IMAGES)
    output = tmp_path / "out"
    # Small files, so that some are committed while the rest is still being labeled.
    args = cli_label_args(tiny_checkpoints, tmp_path / "images", output, "--batch-size", "2", "--rows-per-file", "4")

    with private_ray_tmpdir() as (env, _):
        log = open(tmp_path / "first_run.log", "w")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 400
            while readable_row_count(output) == 0 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)  # until the first complete Parquet file is there
            log_tail = (tmp_path / "first_run.log").read_text()[-3000:]
            assert proc.poll() is None, f"the first run ended before it could be interrupted:\n{log_tail}"
            assert readable_row_count(output) > 0, "no output file appeared in time"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the command, its Ray and its actors
            proc.wait()
            log.close()
    assert 0 < readable_row_count(output) < LONG_RUN_IMAGES, "the first run was interrupted part way"

    # Run again in this process on the session's Ray: the same job, without a second Ray start.
    summary = run_label_job(job_config(tiny_checkpoints, tmp_path / "images", output, batch_size=2))
    assert (summary.inputs, summary.error) == (LONG_RUN_IMAGES, 0)
    assert summary.skipped > 0 and summary.ok + summary.skipped == LONG_RUN_IMAGES
    assert f"{LONG_RUN_IMAGES} inputs: {summary.ok} ok, 0 error, {summary.skipped} skipped" in str(summary)
    rows = assert_each_input_once(output, images)
    assert all(r["status"] == "ok" for r in rows)


@pytest.mark.timeout(400)
def test_inputs_fed_to_ray_in_several_datasets_are_each_labeled_once(ray_local, tiny_checkpoints, tmp_path, monkeypatch):
    from pro2sam.pipeline import label_job

    monkeypatch.setattr(label_job, "_ROWS_PER_DATASET", 5)
    images = write_scenes(tmp_path / "images", 12)
    summary = run_label_job(job_config(tiny_checkpoints, tmp_path / "images", tmp_path / "out", batch_size=2))
    assert (summary.inputs, summary.ok, summary.error) == (12, 12, 0)
    assert_each_input_once(tmp_path / "out", images)


def _labeling_actors() -> dict[str, dict]:
    """Ray Data's labeling actors, by actor id, as the GCS knows them.

    Read from the GCS directly: the public state API needs the dashboard, which the session's
    Ray is started without.
    """
    from ray._private import state

    return {aid: a for aid, a in state.actors().items() if "Pro2SAMLabeler" in a["ActorClassName"]}


@pytest.mark.timeout(600)
def test_a_killed_actor_loses_and_duplicates_no_image(ray_local, tiny_checkpoints, tmp_path):
    images = write_scenes(tmp_path / "images", LONG_RUN_IMAGES)
    output = tmp_path / "out"
    cfg = job_config(tiny_checkpoints, tmp_path / "images", output, batch_size=2, actors=1, rows_per_file=4)
    earlier = set(_labeling_actors())
    outcome: dict = {}

    def run():
        try:
            outcome["summary"] = run_label_job(cfg)
        except BaseException as e:  # reported by the test thread
            outcome["error"] = e

    job = threading.Thread(target=run, daemon=True)
    job.start()
    killed, rows_when_killed = None, None
    deadline = time.monotonic() + 400
    while killed is None and job.is_alive() and time.monotonic() < deadline:
        alive = [(aid, a) for aid, a in _labeling_actors().items() if aid not in earlier and a["State"] == "ALIVE"]
        if alive and parquet_files(output):  # the actor has labeled a block, and has more to do
            killed, actor = alive[0]
            os.kill(int(actor["Pid"]), signal.SIGKILL)
            rows_when_killed = readable_row_count(output)
        time.sleep(0.05)
    assert killed is not None, f"the job ended before its actor could be killed: {outcome}"
    assert rows_when_killed < LONG_RUN_IMAGES, "the actor was killed part way through the job"
    job.join(timeout=400)
    assert not job.is_alive(), "the job did not finish after its actor was killed"
    assert "error" not in outcome, outcome.get("error")

    assert _labeling_actors()[killed]["NumRestarts"] >= 1, "Ray restarted the killed actor"
    assert outcome["summary"].ok == LONG_RUN_IMAGES
    rows = assert_each_input_once(output, images)
    assert all(r["status"] == "ok" for r in rows)


# ---------------------------------------------------------------- spellings of a local folder


@pytest.mark.timeout(300)
def test_local_uris_label_into_the_plain_folder_and_a_plain_rerun_skips_them(ray_local, tiny_checkpoints, tmp_path):
    images = write_scenes(tmp_path / "images", 2)
    output = tmp_path / "labels"
    summary = run_label_job(job_config(tiny_checkpoints, f"local://{tmp_path}/images", f"local://{output}"))
    assert (summary.ok, summary.error) == (2, 0)
    assert_each_input_once(output, images)  # rows name the plain paths, files lie in the plain folder
    assert not Path("local:").exists() and not list(tmp_path.glob("local:*"))
    again = run_label_job(job_config(tiny_checkpoints, tmp_path / "images", output))
    assert (again.skipped, again.ok) == (2, 0)
