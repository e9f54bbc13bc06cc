"""The labels table on storage: what the job may touch, what a rerun does, one writer per output.

Real files and a real S3-protocol server (moto); no Ray.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pro2sam.labels import LABEL_SCHEMA, error_row, rows_to_table
from pro2sam.output import (
    LEASE_NAME,
    LabelsOutput,
    LabelWriter,
    LeaseLost,
    OutputBusy,
    RerunPlanner,
    WriterLease,
    plan_rerun,
)
from pro2sam.storage import INPUT_SCHEMA, write_bytes_atomic


def rows(*specs) -> pa.Table:
    """Label rows from (image_id, status, error_kind, fingerprint) tuples (error rows carry no result)."""
    out = []
    for image_id, status, kind, fingerprint in specs:
        row = error_row(image_id, f"/img/{image_id}.png", None, "x", kind=kind or "image", run_id="r1",
                        source_fingerprint=fingerprint)  # fmt: skip
        if status == "ok":
            row.update(status="ok", error=None, error_kind=None)
        out.append(row)
    return rows_to_table(out)


def inputs(*specs) -> pa.Table:
    """Listing rows from (image_id, fingerprint) tuples."""
    return pa.table(
        {
            "image_id": [i for i, _ in specs],
            "uri": [f"/img/{i}.png" for i, _ in specs],
            "label": [None] * len(specs),
            "source_fingerprint": [f for _, f in specs],
            "input_error": [None] * len(specs),
            **{name: [None] * len(specs) for name in ("container_kind", "container", "member_offset", "member_size")},
        },
        schema=INPUT_SCHEMA,
    )


def output_with(tmp_path: Path, *tables: pa.Table) -> LabelsOutput:
    out = LabelsOutput(str(tmp_path / "out"))
    for n, table in enumerate(tables):
        out.commit(table, f"part-r1-{n:05d}.parquet")
    return out


# ---------------------------------------------------------------- what a rerun does


def test_a_rerun_skips_labeled_images_and_labels_the_rest(tmp_path):
    out = output_with(tmp_path, rows(("a", "ok", None, "s1"), ("b", "ok", None, "s1")))
    plan = plan_rerun(out.scan(), inputs(("a", "s1"), ("b", "s1"), ("c", "s1")))
    assert plan.todo.column("image_id").to_pylist() == ["c"]
    assert (plan.skipped, plan.retried, plan.changed, plan.drops) == (2, 0, 0, {})


def test_read_errors_are_relabeled_by_default_and_other_errors_only_when_asked(tmp_path):
    out = output_with(tmp_path, rows(("a", "error", "read", "s1"), ("b", "error", "image", "s1"), ("c", "ok", None, "s1")))
    listed = inputs(("a", "s1"), ("b", "s1"), ("c", "s1"))
    plan = plan_rerun(out.scan(), listed)
    assert plan.todo.column("image_id").to_pylist() == ["a"] and plan.retried == 1
    assert list(plan.drops.values()) == [[0]]
    plan = plan_rerun(out.scan(), listed, retry_errors=True)
    assert plan.todo.column("image_id").to_pylist() == ["a", "b"] and plan.retried == 2


def test_changed_files_are_relabeled_only_when_asked(tmp_path):
    out = output_with(tmp_path, rows(("a", "ok", None, "size=1"), ("b", "ok", None, "size=2")))
    listed = inputs(("a", "size=1"), ("b", "size=3"))
    assert len(plan_rerun(out.scan(), listed).todo) == 0
    plan = plan_rerun(out.scan(), listed, relabel_changed=True)
    assert plan.todo.column("image_id").to_pylist() == ["b"] and plan.changed == 1


def test_a_listing_decided_batch_by_batch_gets_the_plan_of_the_whole(tmp_path):
    out = output_with(
        tmp_path,
        rows(("a", "ok", None, "s1"), ("b", "error", "read", "s1"), ("c", "error", "image", "s1")),
        rows(("a", "ok", None, "s1"), ("d", "ok", None, "s1")),
    )
    planner = RerunPlanner(out.scan())
    batches = ([("a", "s1"), ("e", "s1")], [("b", "s1")], [("c", "s1"), ("d", "s1"), ("f", "s1")])
    todo = [planner.decide(inputs(*batch)).column("image_id").to_pylist() for batch in batches]
    assert todo == [["e"], ["b"], ["f"]]
    assert (planner.skipped, planner.retried, planner.duplicates) == (3, 1, 1)
    first, second = out.parquet_paths()
    assert planner.drops() == {first: [1], second: [0]}, "b's read error, and a's second row"


def test_rows_of_images_no_longer_listed_are_kept(tmp_path):
    out = output_with(tmp_path, rows(("gone", "error", "read", "s1"), ("a", "ok", None, "s1")))
    plan = plan_rerun(out.scan(), inputs(("a", "s1")), retry_errors=True)
    assert len(plan.todo) == 0 and plan.drops == {}


def test_duplicate_rows_of_an_image_are_reduced_to_one_keeping_the_ok_row(tmp_path):
    out = output_with(
        tmp_path,
        rows(("a", "error", "model", "s1"), ("b", "ok", None, "s1")),
        rows(("a", "ok", None, "s1"), ("b", "ok", None, "s1")),
    )
    plan = plan_rerun(out.scan(), inputs(("a", "s1"), ("b", "s1")))
    assert len(plan.todo) == 0 and plan.duplicates == 2
    out.drop_rows(plan.drops)
    table = out.read_table(["image_id", "status"])
    assert sorted(zip(*table.to_pydict().values())) == [("a", "ok"), ("b", "ok")]
    assert len(pq.read_table(out.parquet_paths()[0])) + len(pq.read_table(out.parquet_paths()[1])) == 2


def test_readers_count_each_image_once_even_in_a_table_with_duplicates(tmp_path):
    out = output_with(tmp_path, rows(("a", "error", "model", "s1")), rows(("a", "ok", None, "s1"), ("b", "ok", None, "s1")))
    assert sorted(out.read_table(["image_id", "status"]).to_pylist(), key=str) == sorted(
        [{"image_id": "a", "status": "ok"}, {"image_id": "b", "status": "ok"}], key=str
    )


def label_rows_with_maps(first: int, count: int) -> pa.Table:
    """``count`` ok rows with ids ``first``.. and a random 14x14 coarse map each: like the job's
    files, megabytes whose key columns are a small part."""
    table = rows(*((f"{first + i:020d}", "ok", None, f"size={i}") for i in range(count)))
    maps = np.random.default_rng(first).random((count, 196), dtype=np.float32)
    column = pa.ListArray.from_arrays(pa.array(np.arange(0, maps.size + 1, 196, dtype=np.int32)), pa.array(maps.ravel()))
    return table.set_column(table.schema.get_field_index("coarse_map"), LABEL_SCHEMA.field("coarse_map"), column)


def test_a_rerun_reads_the_key_columns_of_remote_label_files_in_few_range_requests(s3_bucket, s3_requests):
    out = LabelsOutput(f"s3://{s3_bucket}/labels/")
    for n in range(4):
        out.commit(label_rows_with_maps(n * 4000, 4000), f"part-r1-{n:05d}.parquet")
    size = sum(out.fs.size(p) for p in out.parquet_paths())
    s3_requests.requests.clear()

    done = LabelsOutput(out.uri).scan()  # as the next run sees it
    assert sorted(done.column("image_id").to_pylist()) == [f"{i:020d}" for i in range(16_000)]
    reads = [r for r in s3_requests.requests if r[0] == "GET" and r[1].endswith(".parquet")]
    others = [r for r in s3_requests.requests if r not in reads]
    assert len(others) == 1 and "list-type=2" in others[0][2], f"one listing, no HEAD: {others}"
    assert len(reads) <= 3 * 4, "at most three range requests per file"
    spans = [tuple(map(int, r[3].removeprefix("bytes=").split("-"))) for r in reads]
    assert sum(end - start + 1 for start, end in spans) < size / 2, "the coarse maps are not read"


# ---------------------------------------------------------------- what the job may touch


def test_only_label_files_are_deleted_or_rewritten(tmp_path):
    out = output_with(tmp_path, rows(("a", "ok", None, None)))
    root = Path(out.path)
    (root / "notes.txt").write_text("mine")
    pq.write_table(pa.table({"x": [1, 2]}), root / "my_stats.parquet")
    (root / "extra").mkdir()
    pq.write_table(rows(("z", "ok", None, None)), root / "extra" / "labels_i_kept.parquet")
    (root / "manifest.csv").write_text("uri\na.png\n")
    assert [Path(p).name for p in out.label_files()] == ["part-r1-00000.parquet"]
    assert out.delete_label_files() == 1
    assert sorted(p.name for p in root.iterdir()) == ["extra", "manifest.csv", "my_stats.parquet", "notes.txt"]
    assert (root / "extra" / "labels_i_kept.parquet").exists()


def test_an_unreadable_label_file_is_reported_and_left_alone(tmp_path):
    out = output_with(tmp_path, rows(("a", "ok", None, None)))
    broken = Path(out.path) / "part-r0-00000.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(Exception, match="part-r0-00000.parquet is not a readable Parquet file"):
        out.scan()
    with pytest.raises(Exception, match="part-r0-00000.parquet is not a readable Parquet file"):
        out.label_files()
    assert broken.read_bytes() == b"PAR1 not really"


def test_a_broken_parquet_file_of_the_user_is_not_opened_and_stops_nothing(tmp_path):
    out = output_with(tmp_path, rows(("a", "ok", None, None)))
    broken = Path(out.path) / "half.parquet"
    broken.write_bytes(b"PAR1 not really")
    assert out.scan().column("image_id").to_pylist() == ["a"]
    assert broken.read_bytes() == b"PAR1 not really"


def test_the_writer_fills_every_file_with_exactly_rows_per_file_rows(tmp_path):
    out = LabelsOutput(str(tmp_path / "out"))
    writer = LabelWriter(out, "r9", rows_per_file=4)
    for n in (3, 10, 1, 0, 6):  # tables as the actors return them: whole blocks of any size
        writer.add(rows(*((f"t{n}-{i}", "ok", None, None) for i in range(n))))
    writer.commit()
    assert [len(pq.read_table(p)) for p in out.parquet_paths()] == [4, 4, 4, 4, 4]
    one = LabelWriter(LabelsOutput(str(tmp_path / "one")), "r1", rows_per_file=1)
    one.add(rows(*((f"u{i}", "ok", None, None) for i in range(3))))
    assert [len(pq.read_table(p)) for p in one.output.parquet_paths()] == [1, 1, 1] and one.pending_rows == 0


def test_the_writer_commits_files_of_bounded_size_and_counts_what_it_wrote(tmp_path):
    out = LabelsOutput(str(tmp_path / "out"))
    writer = LabelWriter(out, "r9", rows_per_file=3)
    for i in range(7):
        writer.add(rows((f"i{i}", "ok" if i % 2 else "error", "image", None)))
    writer.commit()
    assert [len(pq.read_table(p)) for p in out.parquet_paths()] == [3, 3, 1]
    assert (writer.ok, writer.error) == (3, 4)
    assert pq.read_schema(out.parquet_paths()[0]).names == LABEL_SCHEMA.names
    assert not [p for p in Path(out.path).iterdir() if p.name.startswith(".")], "no temporary file is left"


# ---------------------------------------------------------------- one writer per output


def test_a_second_run_on_a_leased_output_is_refused(tmp_path):
    out = LabelsOutput(str(tmp_path / "out"))
    with WriterLease(out, "first"):
        start = time.monotonic()
        with pytest.raises(OutputBusy, match="being written by run first"):
            WriterLease(out, "second").acquire()
        assert time.monotonic() - start < 2, "a live holder on this host is refused at once"
    assert not (Path(out.path) / LEASE_NAME).exists(), "the lease is released"


def test_a_lease_left_by_a_killed_run_of_this_host_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = LabelsOutput(str(tmp_path / "out"))
    Path(out.path).mkdir()
    holder = {"run_id": "killed", "host": socket.gethostname(), "pid": int(dead.stdout), "expires": time.time() + 600}
    (Path(out.path) / LEASE_NAME).write_text(json.dumps(holder))
    with WriterLease(out, "next") as lease:
        lease.check()
        assert json.loads((Path(out.path) / LEASE_NAME).read_text())["run_id"] == "next"


def test_a_lease_held_on_another_host_is_waited_for_until_it_expires(tmp_path):
    out = LabelsOutput(str(tmp_path / "out"))
    Path(out.path).mkdir()
    holder = {"run_id": "elsewhere", "host": "another-pod", "pid": 1, "expires": time.time() + 1.5}
    (Path(out.path) / LEASE_NAME).write_text(json.dumps(holder))
    start = time.monotonic()
    with WriterLease(out, "retry", ttl_s=5):
        waited = time.monotonic() - start
    assert 1.0 < waited < 5


def test_a_lease_renewed_on_another_host_is_refused(tmp_path):
    out = LabelsOutput(str(tmp_path / "out"))
    Path(out.path).mkdir()
    path = Path(out.path) / LEASE_NAME
    stop = threading.Event()

    def holder_heartbeat():  # a live run on another machine, renewing its lease as runs do: whole
        while not stop.is_set():
            lease = {"run_id": "alive", "host": "another-pod", "pid": 1, "expires": time.time() + 1.0}
            write_bytes_atomic(str(path), json.dumps(lease).encode())
            stop.wait(0.25)

    beat = threading.Thread(target=holder_heartbeat, daemon=True)
    beat.start()
    while not path.exists():  # the holder has its lease before the second run starts
        time.sleep(0.01)
    try:
        with pytest.raises(OutputBusy, match="being written by run alive"):
            WriterLease(out, "second", ttl_s=1.0).acquire()
    finally:
        stop.set()
        beat.join()


def test_force_takes_the_lease_and_the_old_holder_stops_at_its_next_commit(tmp_path):
    out = LabelsOutput(str(tmp_path / "out"))
    first = WriterLease(out, "first", ttl_s=0.4)
    first.acquire()
    writer = LabelWriter(out, "first", lease=first, rows_per_file=100)
    writer.add(rows(("a", "ok", None, None)))
    with WriterLease(out, "second", ttl_s=0.4, force=True):
        time.sleep(0.3)  # one heartbeat of the first holder
        with pytest.raises(LeaseLost, match="taken over by run second"):
            writer.commit()
    first.release()
    assert out.parquet_paths() == [], "the old holder wrote nothing after losing the lease"


def test_one_lease_per_output_on_s3(s3_bucket):
    out = LabelsOutput(f"s3://{s3_bucket}/labels/run1/")
    with WriterLease(out, "first"):
        with pytest.raises(OutputBusy):
            WriterLease(out, "second").acquire()
    with WriterLease(out, "third"):
        pass
    assert not out.fs.exists(f"{s3_bucket}/labels/run1/{LEASE_NAME}")


def test_no_lease_on_an_output_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(Exception, match="cannot write to the output"):
        WriterLease(LabelsOutput(str(blocker / "out")), "r").acquire()
    assert os.listdir(tmp_path) == ["a_file"]


# ---------------------------------------------------------------- which files are label files


def test_a_users_own_copy_of_the_labels_in_the_output_is_never_taken_for_a_label_file(tmp_path):
    """Copies with the table's columns: DuckDB's COPY, pyarrow's write_table of what the job wrote
    (field metadata and all), and a byte-for-byte copy under a label file's name."""
    import duckdb

    out = output_with(tmp_path, rows(("a", "ok", None, None), ("b", "error", "read", None)))
    root = Path(out.path)
    (label_file,) = root.glob("part-*.parquet")
    duckdb.sql(f"COPY (SELECT * FROM '{label_file}' WHERE status = 'ok') TO '{root / 'reviewed_final.parquet'}'")
    pq.write_table(pq.read_table(label_file), root / "copy_by_pyarrow.parquet")
    (root / "part-mine-00000.parquet").write_bytes(label_file.read_bytes())
    mine = {p.name: p.read_bytes() for p in root.iterdir() if p != label_file}

    assert out.label_files() == [str(label_file)]
    done = out.scan()
    assert sorted(done.column("image_id").to_pylist()) == ["a", "b"], "each row once: the copies are not read"
    planner = RerunPlanner(done)
    assert planner.duplicates == 0
    out.drop_rows(planner.drops())
    assert out.delete_label_files() == 1
    assert {p.name: p.read_bytes() for p in root.iterdir()} == mine, "every copy is left as it was"


def test_label_files_written_before_the_marker_are_still_label_files(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    old = rows(("a", "ok", None, None)).cast(LABEL_SCHEMA)  # as earlier versions wrote them: no footer marker
    pq.write_table(old, root / "part-20261101T000000-abcd1234-00000.parquet", compression="zstd")
    assert b"pro2sam" not in (pq.ParquetFile(root / "part-20261101T000000-abcd1234-00000.parquet").metadata.metadata or {})
    out = LabelsOutput(str(root))
    assert [Path(p).name for p in out.label_files()] == ["part-20261101T000000-abcd1234-00000.parquet"]
    assert out.scan().column("image_id").to_pylist() == ["a"]


def test_a_label_file_carries_a_footer_marker_naming_itself(tmp_path):
    out = output_with(tmp_path, rows(("a", "ok", None, None)))
    (path,) = out.parquet_paths()
    marker = json.loads(pq.ParquetFile(path).metadata.metadata[b"pro2sam"])
    assert marker == {"label_file": 1, "name": "part-r1-00000.parquet", "run_id": "r1"}


# ---------------------------------------------------------------- the lease on object storage and its oddities


def test_the_s3_lease_holds_over_many_renewals_and_commits_and_is_removed_at_the_end(s3_bucket, s3_requests):
    """The run of the bug report: the output listed (s3fs's listing cache filled with the lease's
    first ETag) between renewals; every later renewal and commit must still go through."""
    out = LabelsOutput(f"s3://{s3_bucket}/labels/long/")
    lease = WriterLease(out, "long", ttl_s=0.8)
    lease.acquire()
    writer = LabelWriter(out, "long", lease=lease, rows_per_file=2)

    def lease_writes() -> int:
        return sum(1 for r in list(s3_requests.requests) if r[0] == "PUT" and r[1].endswith(LEASE_NAME))

    start = time.monotonic()
    n = 0
    # Four lease periods and a dozen renewals at least, however slow the machine (bounded).
    while (time.monotonic() - start < 4 * 0.8 or lease_writes() < 12) and time.monotonic() - start < 120:
        out.scan()
        writer.add(rows((f"i{n}", "ok", None, None)))
        n += 1
        time.sleep(0.1)
    writer.commit()
    lease.release()
    assert lease_writes() >= 12, f"renewed by the heartbeat and before each commit: {lease_writes()} lease writes"
    assert sorted(LabelsOutput(out.uri).scan().column("image_id").to_pylist()) == sorted(f"i{i}" for i in range(n))
    assert not LabelsOutput(out.uri).fs.exists(f"{s3_bucket}/labels/long/{LEASE_NAME}"), "the lease is removed at the end"


def test_force_on_s3_stops_the_displaced_run_before_its_next_commit(s3_bucket):
    out = LabelsOutput(f"s3://{s3_bucket}/labels/forced/")
    first = WriterLease(out, "first", ttl_s=30)
    first.acquire()
    writer = LabelWriter(out, "first", lease=first, rows_per_file=100)
    writer.add(rows(("a", "ok", None, None)))
    writer.commit()
    writer.add(rows(("b", "ok", None, None)))
    with WriterLease(out, "second", ttl_s=30, force=True) as second:
        assert second.displaced == "first"
        with pytest.raises(LeaseLost, match="taken over by run second"):
            writer.commit()  # at once: no heartbeat of the first run has run yet
        first.release()
        assert json.loads(out.fs.cat_file(f"{s3_bucket}/labels/forced/{LEASE_NAME}"))["run_id"] == "second"
    assert LabelsOutput(out.uri).scan().column("image_id").to_pylist() == ["a"], "b was not written"


def test_a_lease_rewritten_by_another_host_is_lost_at_the_next_commit(tmp_path):
    out = LabelsOutput(str(tmp_path / "out"))
    with WriterLease(out, "mine", ttl_s=30) as lease:
        other = {"run_id": "theirs", "host": "another-pod", "pid": 1, "expires": time.time() + 30}
        (Path(out.path) / LEASE_NAME).write_text(json.dumps(other))
        with pytest.raises(LeaseLost, match="taken over by run theirs"):
            lease.check()
    assert json.loads((Path(out.path) / LEASE_NAME).read_text())["run_id"] == "theirs", "their lease is left"


def test_a_lease_that_is_a_folder_fails_in_one_line_naming_it(tmp_path):
    out = LabelsOutput(str(tmp_path / "out"))
    (Path(out.path) / LEASE_NAME).mkdir(parents=True)
    with pytest.raises(Exception, match=f"lease .*{LEASE_NAME} is a folder"):
        WriterLease(out, "r").acquire()
    assert (Path(out.path) / LEASE_NAME).is_dir()


def test_a_lease_with_a_nonsense_expiry_is_taken_over_naming_it(tmp_path, caplog):
    out = LabelsOutput(str(tmp_path / "out"))
    Path(out.path).mkdir()
    (Path(out.path) / LEASE_NAME).write_text('{"run_id": "odd", "host": "x", "pid": 1, "expires": NaN}')
    start = time.monotonic()
    with WriterLease(out, "next") as lease:
        lease.check()
    assert time.monotonic() - start < 2
    assert f"an unreadable lease ({Path(out.path) / LEASE_NAME})" in caplog.text


def test_an_output_that_is_a_file_fails_the_lease_in_one_line(tmp_path):
    target = tmp_path / "labels.txt"
    target.write_text("mine")
    with pytest.raises(Exception, match="is a file, not a folder"):
        WriterLease(LabelsOutput(str(target)), "r").acquire()
    assert target.read_text() == "mine"


def test_the_lease_on_another_fsspec_store_is_read_fresh_and_compared_by_content(tmp_path):
    """A store without S3's conditional requests (fsspec's memory store stands for gs://, az://):
    read-compare-write, a renewal refused once another run wrote the lease."""
    out = LabelsOutput(f"memory://lease-{tmp_path.name}/labels/")
    first = WriterLease(out, "first", ttl_s=0.4)
    first.acquire()
    with pytest.raises(OutputBusy, match="being written by run first"):
        WriterLease(out, "second").acquire()
    time.sleep(1.0)  # several heartbeats
    first.check()
    with WriterLease(out, "third", force=True):
        with pytest.raises(LeaseLost, match="taken over by run third"):
            first.check()
        first.release()
        assert json.loads(out.fs.cat_file(f"{out.path}/{LEASE_NAME}"))["run_id"] == "third", "theirs is left"
    assert not out.fs.exists(f"{out.path}/{LEASE_NAME}")


def test_label_files_and_the_lease_are_as_readable_as_the_umask_allows(tmp_path):
    old = os.umask(0o022)
    try:
        out = output_with(tmp_path, rows(("a", "ok", None, None), ("b", "ok", None, None)))
        with WriterLease(out, "r2", ttl_s=60.0):
            lease_mode = (Path(out.path) / LEASE_NAME).stat().st_mode & 0o777
            out.drop_rows({str(Path(out.path) / "part-r1-00000.parquet"): [0]})  # a rewrite
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in Path(out.path).iterdir()}
    assert modes == {"part-r1-00000.parquet": 0o644} and lease_mode == 0o644
