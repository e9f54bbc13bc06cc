"""Long runs on object storage, the product's main road: the write lease over many periods, a
kill -9 in the middle, an S3 outage at the end, a run displaced by ``--force``.

Everything is real: ``pro2sam label`` subprocesses with a Ray of their own, an S3-protocol server
(moto) on loopback, Parquet read back with s3fs + pyarrow and counted with DuckDB as a user
would. The lease periods are shortened through ``--lease-ttl`` (seconds), so that a run of a
minute spans many of them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    cli_label_args,
    job_config,
    parse_summary,
    private_ray_tmpdir,
    read_s3_output,
    s3_client,
    upload_file,
    write_scenes,
)

from pro2sam.output import LEASE_NAME
from pro2sam.pipeline.label_job import run_label_job

TTL_S = 2.0  # the lease's life in these tests: renewed every 0.5 s


def _upload(endpoint: str, bucket: str, folder: Path, count: int) -> list[str]:
    return [upload_file(endpoint, bucket, p, f"images/{p.name}") for p in write_scenes(folder, count)]


def _label_files(endpoint: str, bucket: str) -> int:
    page = s3_client(endpoint).list_objects_v2(Bucket=bucket, Prefix="labels/")
    return sum(1 for o in page.get("Contents", []) if o["Key"].endswith(".parquet"))


def _lease_exists(endpoint: str, bucket: str) -> bool:
    page = s3_client(endpoint).list_objects_v2(Bucket=bucket, Prefix=f"labels/{LEASE_NAME}")
    return bool(page.get("Contents"))


def _wait_for_files(proc: subprocess.Popen, endpoint: str, bucket: str, files: int, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while _label_files(endpoint, bucket) < files and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before the test could act:\n{log.read_text()[-3000:]}"
    assert _label_files(endpoint, bucket) >= files, f"no label file in {timeout_s} s:\n{log.read_text()[-3000:]}"


def _duckdb_counts(endpoint: str, bucket: str) -> tuple[int, int]:
    """(rows, distinct image ids) over labels/*.parquet, the README's own query, by DuckDB."""
    import duckdb

    con = duckdb.connect()
    con.register("labels", read_s3_output(endpoint, f"{bucket}/labels/"))
    return con.sql("SELECT count(*), count(DISTINCT image_id) FROM labels").fetchall()[0]


def _assert_each_image_once(endpoint: str, bucket: str, uris: list[str]) -> None:
    table = read_s3_output(endpoint, f"{bucket}/labels/")
    assert sorted(table.column("uri").to_pylist()) == sorted(uris), "every image exactly once, nothing else"
    assert _duckdb_counts(endpoint, bucket) == (len(uris), len(uris))
    assert set(table.column("status").to_pylist()) == {"ok"}


@pytest.mark.timeout(600)
def test_an_s3_run_over_many_lease_periods_killed_and_resumed_labels_every_image_once(
    s3_server, s3_bucket, tiny_checkpoints, tmp_path
):
    uris = _upload(s3_server, s3_bucket, tmp_path / "images", 40)
    output = f"s3://{s3_bucket}/labels/"
    args = cli_label_args(tiny_checkpoints, f"s3://{s3_bucket}/images/", output, "--batch-size", "1",
                          "--rows-per-file", "2", "--commit-seconds", "1", "--lease-ttl", str(TTL_S))  # fmt: skip
    log = tmp_path / "first.log"
    with private_ray_tmpdir() as (env, _), open(log, "w") as out:
        start = time.monotonic()
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            _wait_for_files(proc, s3_server, s3_bucket, 3, 400, log)
            held = time.monotonic() - start
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the command, its Ray and its actors
            proc.wait()
    assert held > 3 * TTL_S, "the lease was held over several periods before the kill"
    assert "could not be renewed" not in log.read_text() and "could not renew" not in log.read_text()
    kept = read_s3_output(s3_server, f"{s3_bucket}/labels/").num_rows
    assert 0 < kept < len(uris), "killed part way"
    assert _lease_exists(s3_server, s3_bucket), "a kill -9 leaves the lease behind"

    with private_ray_tmpdir() as (env, _):
        start = time.monotonic()
        again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=400)
        seconds = time.monotonic() - start
    assert again.returncode == 0, again.stderr[-3000:]
    assert seconds > 3 * TTL_S
    assert f"{len(uris)} inputs: {len(uris) - kept} ok, 0 error, {kept} skipped" in again.stdout, again.stdout[-2000:]
    assert "taking over the output's lease" in again.stderr, "the dead run's lease was taken over at once"
    _assert_each_image_once(s3_server, s3_bucket, uris)
    assert not _lease_exists(s3_server, s3_bucket), "the lease is removed at the end"


@pytest.mark.timeout(600)
def test_an_s3_outage_before_the_last_commit_exits_3_and_a_rerun_labels_the_rest(
    s3_server, tiny_checkpoints, ray_local, tmp_path
):
    """A second S3 endpoint of the same store (moto keeps its buckets per process) is stopped
    while the run labels: commits fail, the run says how many images it did not write and exits
    3; a rerun against the store, reached again, finishes the job."""
    from moto.server import ThreadedMotoServer

    bucket = "outage-bucket"
    s3_client(s3_server).create_bucket(Bucket=bucket)
    uris = _upload(s3_server, bucket, tmp_path / "images", 24)
    flaky = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    flaky.start()
    host, port = flaky.get_host_and_port()
    args = cli_label_args(tiny_checkpoints, f"s3://{bucket}/images/", f"s3://{bucket}/labels/", "--batch-size", "1",
                          "--rows-per-file", "2", "--commit-seconds", "1", "--lease-ttl", str(TTL_S))  # fmt: skip
    log = tmp_path / "outage.log"
    with private_ray_tmpdir() as (env, _), open(log, "w") as err:
        env["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        try:
            _wait_for_files(proc, s3_server, bucket, 1, 400, log)
        finally:
            flaky.stop()  # the endpoint goes away: reads and commits fail from now on
        stdout, _ = proc.communicate(timeout=300)
    stderr = log.read_text()
    assert proc.returncode == 3, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("pro2sam label: error: ") and "images to label were not written" in last, last
    assert "run the same command again" in last
    assert "Traceback" not in stderr
    written = read_s3_output(s3_server, f"{bucket}/labels/").num_rows
    assert f"{len(uris) - written} of the {len(uris)} images to label were not written" in last
    done = parse_summary(stdout)
    assert (done["inputs"], done["ok"] + done["error"]) == (len(uris), written), "the summary counts what was written"

    summary = run_label_job(job_config(tiny_checkpoints, f"s3://{bucket}/images/", f"s3://{bucket}/labels/", batch_size=2))
    assert summary.skipped + summary.ok + summary.error == len(uris)
    table = read_s3_output(s3_server, f"{bucket}/labels/")
    assert sorted(table.column("uri").to_pylist()) == sorted(uris)
    assert _duckdb_counts(s3_server, bucket) == (len(uris), len(uris))


@pytest.mark.timeout(600)
def test_force_stops_the_displaced_run_and_no_image_is_counted_twice(s3_server, s3_bucket, tiny_checkpoints, ray_local, tmp_path):
    uris = _upload(s3_server, s3_bucket, tmp_path / "images", 40)
    output = f"s3://{s3_bucket}/labels/"
    args = cli_label_args(tiny_checkpoints, f"s3://{s3_bucket}/images/", output, "--batch-size", "1",
                          "--rows-per-file", "2", "--commit-seconds", "1", "--lease-ttl", "30")  # fmt: skip
    log = tmp_path / "displaced.log"
    with private_ray_tmpdir() as (env, _), open(log, "w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        try:
            _wait_for_files(proc, s3_server, s3_bucket, 2, 400, log)
            forced = run_label_job(job_config(tiny_checkpoints, f"s3://{s3_bucket}/images/", output, batch_size=2,
                                              force=True, lease_ttl_s=TTL_S))  # fmt: skip
            stdout, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = log.read_text()
    assert proc.returncode == 3, stderr[-3000:]
    assert f"taken over by run {forced.run_id}" in stderr.strip().splitlines()[-1]
    assert forced.ok + forced.skipped == len(uris) and forced.error == 0
    _assert_each_image_once(s3_server, s3_bucket, uris)
