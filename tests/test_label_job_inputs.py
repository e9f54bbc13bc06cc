"""The labeling job over WebDataset shards and Parquet tables of image bytes, locally and on S3
(moto): real Ray, real tar and Parquet files, the tiny random-weight models. Every sample or row
ends up in the output once, by id; a rerun labels nothing twice; a bad member and a truncated
shard are error rows and the job finishes."""

from __future__ import annotations

import hashlib
import subprocess
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import (
    cli_label_args,
    hf_table,
    job_config,
    members_of,
    output_rows,
    parse_summary,
    private_ray_tmpdir,
    read_s3_output,
    samples,
    upload_file,
    write_shard,
)

from pro2sam.pipeline.label_job import run_label_job


def sha1_id(location: str) -> str:
    return hashlib.sha1(location.encode()).hexdigest()[:20]


def assert_once_by_id(rows: list[dict], locations: list[str]) -> None:
    """Each location exactly once in the output, under the id of its location, nothing else."""
    counts = Counter(r["image_id"] for r in rows)
    assert sorted(counts) == sorted(sha1_id(u) for u in locations), "every input, nothing else"
    assert set(counts.values()) == {1}, "no input twice"
    assert all(r["image_id"] == sha1_id(r["uri"]) for r in rows)


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory) -> tuple[Path, list[str], str, str]:
    """shards/000000.tar (3 good samples and one whose .jpg is text), 000001.tar (3 good), and
    000002.tar cut inside its second sample's image. Returns (folder, the good samples'
    locations, the bad member's location, the cut sample's location)."""
    folder = (tmp_path_factory.mktemp("wds") / "shards").resolve()
    first = samples(["k00", "k01", "k02"])
    first["k03"] = {"jpg": b"these are notes, not a picture\n" * 10, "cls": b"1"}
    write_shard(folder / "000000.tar", members_of(first))
    write_shard(folder / "000001.tar", members_of(samples(["k10", "k11", "k12"], seed=20)))
    third = samples(["k20", "k21"], seed=40)
    whole = write_shard(folder / "000002.tar", members_of(third))
    (folder / "000002.tar").write_bytes(whole[: whole.index(third["k21"]["png"]) + 50])
    good = [f"{folder}/000000.tar#k0{i}" for i in range(3)] + [f"{folder}/000001.tar#k1{i}" for i in range(3)]
    return folder, good + [f"{folder}/000002.tar#k20"], f"{folder}/000000.tar#k03", f"{folder}/000002.tar#k21"


def test_a_folder_of_shards_is_labeled_sample_by_sample_and_a_rerun_labels_nothing_twice(
    ray_local, tiny_checkpoints, shard_folder, tmp_path
):
    folder, good, bad, cut = shard_folder
    output = tmp_path / "labels"
    summary = run_label_job(job_config(tiny_checkpoints, folder, output, batch_size=2))
    rows = output_rows(output)
    tail = [r["uri"] for r in rows if "#@" in r["uri"]]
    assert len(tail) == 1 and tail[0].startswith(f"{folder}/000002.tar#@"), "one row for the cut shard's rest"
    assert_once_by_id(rows, good + [bad, cut] + tail)
    by_uri = {r["uri"]: r for r in rows}
    assert {by_uri[u]["status"] for u in good} == {"ok"}
    assert {(by_uri[u]["width"], by_uri[u]["height"]) for u in good} == {(64, 48)}
    assert by_uri[good[1]]["label"] == "1", "the .cls member is the label"
    assert by_uri[bad]["status"] == "error" and "not an image" in by_uri[bad]["error"]
    assert by_uri[cut]["status"] == "error" and "truncated" in by_uri[cut]["error"]
    assert (summary.inputs, summary.ok, summary.error) == (10, 7, 3)

    again = run_label_job(job_config(tiny_checkpoints, folder, output, batch_size=2))
    assert (again.inputs, again.ok, again.error, again.skipped) == (10, 0, 0, 10)
    assert_once_by_id(output_rows(output), good + [bad, cut] + tail)


@pytest.mark.timeout(600)
def test_pro2sam_label_over_a_parquet_of_image_bytes_then_a_rerun(ray_local, tiny_checkpoints, tmp_path):
    table, _ = hf_table(5)
    bad = pa.array([{"bytes": b"not a png", "path": "bad.png"}], table.schema.field("image").type)
    table = pa.concat_tables([table, pa.table({"image": bad, "label": pa.array([0], pa.int64())})])
    parquet = tmp_path / "images.parquet"
    pq.write_table(table, parquet, row_group_size=4)
    locations = [f"{parquet}#row={i}&path=img_{i:03d}.png" for i in range(5)] + [f"{parquet}#row=5&path=bad.png"]
    output = tmp_path / "labels"
    with private_ray_tmpdir() as (env, _):
        done = subprocess.run(cli_label_args(tiny_checkpoints, parquet, output, "--batch-size", "2"),
                              capture_output=True, text=True, env=env, timeout=500)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert parse_summary(done.stdout) == {"inputs": 6, "ok": 5, "error": 1, "skipped": 0}
    rows = output_rows(output)
    assert_once_by_id(rows, locations)
    assert [r["label"] for r in sorted(rows, key=lambda r: r["uri"])] == ["0", "1", "2", "0", "1", "0"]

    again = run_label_job(job_config(tiny_checkpoints, parquet, output, batch_size=2))
    assert (again.ok, again.error, again.skipped) == (0, 0, 6)
    assert_once_by_id(output_rows(output), locations)


# ---------------------------------------------------------------- on object storage


@pytest.mark.timeout(600)
def test_pro2sam_label_over_an_s3_prefix_of_shards_then_a_rerun(s3_server, s3_bucket, ray_local, tiny_checkpoints, shard_folder, tmp_path):
    folder, good, bad, cut = shard_folder
    for path in sorted(folder.iterdir()):
        upload_file(s3_server, s3_bucket, path, f"shards/{path.name}")
    on_s3 = lambda u: u.replace(str(folder), f"s3://{s3_bucket}/shards")  # noqa: E731
    output = f"s3://{s3_bucket}/labels/"
    with private_ray_tmpdir() as (env, _):
        done = subprocess.run(cli_label_args(tiny_checkpoints, f"s3://{s3_bucket}/shards/", output, "--batch-size", "2"),
                              capture_output=True, text=True, env=env, timeout=500)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert parse_summary(done.stdout) == {"inputs": 10, "ok": 7, "error": 3, "skipped": 0}
    rows = read_s3_output(s3_server, f"{s3_bucket}/labels/").to_pylist()
    tail = [r["uri"] for r in rows if "#@" in r["uri"]]
    assert_once_by_id(rows, [on_s3(u) for u in good + [bad, cut]] + tail)
    assert {r["status"] for r in rows if r["uri"] in map(on_s3, good)} == {"ok"}

    pattern = f"s3://{s3_bucket}/shards/{{000000..000002}}.tar"
    again = run_label_job(job_config(tiny_checkpoints, pattern, output, batch_size=2))
    assert (again.inputs, again.ok, again.error, again.skipped) == (10, 0, 0, 10), "the pattern names the same samples"
    assert read_s3_output(s3_server, f"{s3_bucket}/labels/").num_rows == 10


@pytest.mark.timeout(600)
def test_a_parquet_of_image_bytes_on_s3_is_labeled_once(s3_server, s3_bucket, ray_local, tiny_checkpoints, tmp_path):
    table, _ = hf_table(4, layout="binary")
    pq.write_table(table, tmp_path / "images.parquet", row_group_size=3)
    uri = upload_file(s3_server, s3_bucket, tmp_path / "images.parquet", "tables/images.parquet")
    output = f"s3://{s3_bucket}/labels/"
    first = run_label_job(job_config(tiny_checkpoints, uri, output, batch_size=2))
    assert (first.ok, first.error) == (4, 0)
    again = run_label_job(job_config(tiny_checkpoints, f"s3://{s3_bucket}/tables/", output, batch_size=2))
    assert (again.ok, again.error, again.skipped) == (0, 0, 4), "the folder holds the same rows"
    rows = read_s3_output(s3_server, f"{s3_bucket}/labels/").to_pylist()
    assert_once_by_id(rows, [f"{uri}#row={i}" for i in range(4)])
    assert {(r["width"], r["height"]) for r in rows} == {(64, 48)}
