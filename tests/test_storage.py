"""Where an image is, listing inputs and reading them: real files, FIFOs, links, odd names; moto S3."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pro2sam.storage import (
    InputError,
    ReadError,
    SeenIds,
    canonical_uri,
    exists,
    image_id_for,
    is_manifest,
    iter_inputs,
    join_uri,
    list_files,
    list_inputs,
    location_contains,
    read_bytes,
    read_file,
    read_range,
    write_bytes_atomic,
)


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(b"a")
    (root / "sub" / "b.png").write_bytes(b"bb")
    return root


# ---------------------------------------------------------------- one id per file


def test_one_file_spelled_many_ways_has_one_id(folder, tmp_path, monkeypatch):
    link = tmp_path / "link_to_images"
    link.symlink_to(folder)
    monkeypatch.chdir(folder)
    spellings = [
        str(folder / "a.png"),
        f"{folder}/../images/a.png",
        f"{folder}//a.png",
        f"{folder}/sub/../a.png",
        "./a.png",
        "a.png",
        f"file://{folder}/a.png",
        str(link / "a.png"),
    ]
    assert {image_id_for(s) for s in spellings} == {image_id_for(str(folder / "a.png"))}
    assert {canonical_uri(s) for s in spellings} == {os.path.realpath(folder / "a.png")}


def test_object_keys_keep_their_spelling_but_not_the_scheme_alias():
    assert canonical_uri("s3a://bucket/images/x.jpg") == "s3://bucket/images/x.jpg"
    assert image_id_for("s3a://bucket/images/x.jpg") == image_id_for("s3://bucket/images/x.jpg")
    assert image_id_for("s3://bucket/a//x.jpg") != image_id_for("s3://bucket/a/x.jpg")  # two keys on S3


def test_location_contains_compares_canonical_locations(folder):
    assert location_contains(str(folder), f"{folder}/sub/../sub")
    assert location_contains(f"{folder}/", str(folder))
    assert location_contains(str(folder.parent), str(folder))
    assert not location_contains(str(folder / "sub"), str(folder))
    assert not location_contains(f"{folder}-other", str(folder))  # a prefix of the name is not a parent
    assert location_contains("s3://bucket/", "s3://bucket/images/")
    assert not location_contains("s3://bucket/labels/", "s3://bucket/images/")


def test_a_folder_listed_by_other_spellings_gives_the_same_rows(folder, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(folder)
    tables = [list_inputs(s) for s in (str(folder), f"{folder}/../images//", str(link), f"file://{folder}")]
    for table in tables[1:]:
        assert table.select(["image_id", "uri"]).equals(tables[0].select(["image_id", "uri"]))
    assert tables[0].column("uri").to_pylist() == [str(folder / "a.png"), str(folder / "sub" / "b.png")]


# ---------------------------------------------------------------- what a folder listing holds


def test_listing_marks_what_cannot_be_read_instead_of_stalling(folder):
    os.mkfifo(folder / "pipe.jpg")
    (folder / "zero.jpg").symlink_to("/dev/zero")
    (folder / "gone.jpg").symlink_to(folder / "missing.jpg")
    bad_name = os.fsencode(str(folder)) + b"/caf\xe9.jpg"  # Latin-1, not UTF-8
    with open(bad_name, "wb") as f:
        f.write(b"x")
    (folder / ".hidden.png").write_bytes(b"h")
    (folder / "linked_dir").symlink_to(folder / "sub")
    rows = {Path(r["uri"]).name: r for r in list_inputs(str(folder)).to_pylist()}
    assert "pipe.jpg" in rows and "a FIFO" in rows["pipe.jpg"]["input_error"]
    assert "zero" in rows or "zero.jpg" in rows
    zero = rows.get("zero") or rows["zero.jpg"]
    assert "character device" in zero["input_error"]
    assert "broken symbolic link" in rows["gone.jpg"]["input_error"]
    odd = [r for name, r in rows.items() if name.startswith("caf")]
    assert len(odd) == 1 and "not valid UTF-8" in odd[0]["input_error"] and "\\xe9" in odd[0]["uri"]
    assert ".hidden.png" not in rows
    assert sum(1 for r in rows.values() if r["uri"].endswith("b.png")) == 1, "a linked folder is not entered"
    good = rows["a.png"]
    assert good["input_error"] is None and good["source_fingerprint"].startswith("size=1 ")


def test_a_symbolic_link_loop_is_listed_as_one_error_and_the_rest_is_listed(folder):
    (folder / "self.png").symlink_to("self.png")
    (folder / "sub" / "ping.png").symlink_to("pong.png")
    (folder / "sub" / "pong.png").symlink_to("ping.png")
    rows = {Path(r["uri"]).name: r for r in list_inputs(str(folder)).to_pylist()}
    assert sorted(rows) == ["a.png", "b.png", "ping.png", "pong.png", "self.png"]
    assert rows["a.png"]["input_error"] is None and rows["b.png"]["input_error"] is None
    assert rows["self.png"]["input_error"] == f"symbolic link loop (too many levels of links): {folder}/self.png -> self.png"
    for name in ("ping.png", "pong.png"):
        assert rows[name]["input_error"].startswith("symbolic link loop"), rows[name]


def test_an_excluded_output_folder_is_not_listed(folder):
    (folder / "labels").mkdir()
    (folder / "labels" / "part-x.parquet").write_bytes(b"p")
    uris = list_inputs(str(folder), exclude_prefix=f"{folder}/labels/").column("uri").to_pylist()
    assert not any("labels" in u for u in uris)


# ---------------------------------------------------------------- manifests


def test_join_uri_joins_several_names_and_keeps_the_scheme(tmp_path):
    assert join_uri(str(tmp_path), "a", "b.txt") == str(tmp_path / "a" / "b.txt")
    assert join_uri("s3a://bucket/root/", "a/", "/b.txt") == "s3a://bucket/root/a/b.txt"


def test_list_files_names_every_file_below_a_folder_relative_to_it(folder, tmp_path):
    (folder / ".hidden").write_bytes(b"")
    assert list_files(str(folder)) == [".hidden", "a.png", "sub/b.png"]
    assert list_files(str(tmp_path / "nowhere")) == [] and not exists(str(tmp_path / "nowhere"))


def test_list_files_on_s3_gives_the_same_names(s3_bucket):
    root = f"s3://{s3_bucket}/images"
    for name in ("a.png", "sub/b.png"):
        write_bytes_atomic(join_uri(root, name), b"x")
    assert list_files(root) == ["a.png", "sub/b.png"] and exists(join_uri(root, "sub"))
    assert list_files(f"s3://{s3_bucket}/nowhere") == []


def test_manifest_labels_stay_the_strings_the_user_wrote(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri,label\na.png,001\nb.png,1e3\nc.png,\nd.png,nan\n")
    rows = list_inputs(str(manifest)).to_pylist()
    assert [r["label"] for r in rows] == ["001", "1e3", None, "nan"]
    assert [Path(r["uri"]).name for r in rows] == ["a.png", "b.png", "c.png", "d.png"]


def test_a_manifest_row_without_uri_is_refused_with_its_line(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri,label\na.png,x\n,y\n")
    with pytest.raises(ValueError, match=r"m\.csv line 3: empty uri"):
        list_inputs(str(manifest))


def test_parquet_manifests_need_string_uris_and_string_or_integer_labels(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": ["a.png", "b.png"], "label": [3, None]}), path)
    assert [r["label"] for r in list_inputs(str(path)).to_pylist()] == ["3", None]
    pq.write_table(pa.table({"uri": ["a.png", "b.png"], "label": [1.0, float("nan")]}), path)
    with pytest.raises(ValueError, match="'label' must hold strings"):
        list_inputs(str(path))
    pq.write_table(pa.table({"uri": [1, 2]}), path)
    with pytest.raises(ValueError, match="'uri' must hold strings"):
        list_inputs(str(path))
    pq.write_table(pa.table({"uri": ["a.png", None]}), path)
    with pytest.raises(ValueError, match="row 2: empty uri"):
        list_inputs(str(path))


def test_a_manifest_naming_one_image_twice_lists_it_once(tmp_path):
    (tmp_path / "sub").mkdir()
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"uri\n./a.png\nsub/../a.png\n{tmp_path}/a.png\nfile://{tmp_path}/a.png\n")
    assert list_inputs(str(manifest)).column("uri").to_pylist() == [str(tmp_path / "a.png")]


def test_a_manifest_naming_an_image_in_the_excluded_output_is_refused_with_its_line(tmp_path):
    (tmp_path / "labels").mkdir()
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri\na.png\nlabels/b.png\nlabels/c.png\n")
    with pytest.raises(ValueError) as refused:
        list_inputs(str(manifest), exclude_prefix=str(tmp_path / "labels"))
    assert str(refused.value).startswith(f"manifest {manifest} line 3: {tmp_path}/labels/b.png lies in the output folder")


def test_manifest_suffixes_are_recognised_in_any_case(tmp_path):
    (tmp_path / "LIST.CSV").write_text("uri,label\na.png,cat\n")
    pq.write_table(pa.table({"uri": ["b.png"]}), tmp_path / "list.Parquet")
    assert list_inputs(str(tmp_path / "LIST.CSV")).select(["uri", "label"]).to_pylist() == [
        {"uri": str(tmp_path / "a.png"), "label": "cat"}
    ]
    assert list_inputs(str(tmp_path / "list.Parquet")).column("uri").to_pylist() == [str(tmp_path / "b.png")]
    assert is_manifest(str(tmp_path / "LIST.CSV")) and is_manifest(str(tmp_path / "list.Parquet"))


def test_a_folder_named_like_a_manifest_is_listed_as_a_folder(tmp_path):
    folder = tmp_path / "x.csv"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"a")
    assert list_inputs(str(folder)).column("uri").to_pylist() == [str(folder / "a.png")]
    assert not is_manifest(str(folder)) and not is_manifest(str(tmp_path / "missing.csv"))


def test_a_single_image_file_is_an_input_of_one_image(folder, tmp_path):
    link = tmp_path / "link.png"
    link.symlink_to(folder / "a.png")
    for given in (folder / "a.png", link):
        rows = list_inputs(str(given)).to_pylist()
        assert len(rows) == 1 and rows[0]["uri"] == str(folder / "a.png") and rows[0]["input_error"] is None
        assert rows[0]["source_fingerprint"].startswith("size=1 mtime_ns=")
    assert not is_manifest(str(folder / "a.png"))


def test_a_single_object_is_an_input_of_one_image(s3_bucket):
    write_bytes_atomic(f"s3://{s3_bucket}/images/a.png", b"abc")
    rows = list_inputs(f"s3://{s3_bucket}/images/a.png").to_pylist()
    assert [(r["uri"], r["source_fingerprint"]) for r in rows] == [
        (f"s3://{s3_bucket}/images/a.png", f"size=3 etag={hashlib.md5(b'abc').hexdigest()}")
    ]


@pytest.mark.parametrize(
    "name, content, place, words",
    [
        ("m.csv", b"uri,label\na.png,x\n\nb.png,y,z\n", " line 4", "Expected 2 columns, got 3: b.png,y,z"),
        ("m.csv", b"uri,label\na.png,\xff\xfe\n", "", "invalid UTF8"),
        ("m.parquet", b"uri\na.png\n", "", "Parquet magic bytes not found"),
    ],
)
def test_every_manifest_parse_error_names_the_manifest_and_a_ragged_row_its_line(tmp_path, name, content, place, words):
    manifest = tmp_path / name
    manifest.write_bytes(content)
    with pytest.raises(ValueError) as refused:
        list_inputs(str(manifest))
    assert str(refused.value).startswith(f"manifest {manifest}{place}: ") and words in str(refused.value)


def test_manifest_rows_get_the_fingerprints_a_folder_listing_gives_only_when_asked(folder, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri\nimages/a.png\nimages/sub/b.png\nimages/missing.png\n")
    by_folder = {r["uri"]: r["source_fingerprint"] for r in list_inputs(str(folder)).to_pylist()}
    asked = {r["uri"]: r["source_fingerprint"] for r in list_inputs(str(manifest), fingerprints=True).to_pylist()}
    assert asked == {**by_folder, str(folder / "missing.png"): None}, "a missing file is still listed"
    assert set(by_folder.values()) == {
        f"size={os.stat(p).st_size} mtime_ns={os.stat(p).st_mtime_ns}" for p in (folder / "a.png", folder / "sub" / "b.png")
    }
    assert set(list_inputs(str(manifest)).column("source_fingerprint").to_pylist()) == {None}


def test_manifest_rows_on_s3_get_size_and_etag_from_one_head_each_only_when_asked(s3_server, s3_bucket, s3_requests):
    for name, body in (("a.png", b"a"), ("b.png", b"bb")):
        write_bytes_atomic(f"s3://{s3_bucket}/images/{name}", body)
    write_bytes_atomic(f"s3://{s3_bucket}/m.csv", b"uri\nimages/a.png\nimages/b.png\nimages/missing.png\n")
    s3_requests.requests.clear()
    plain = list_inputs(f"s3://{s3_bucket}/m.csv")
    assert set(plain.column("source_fingerprint").to_pylist()) == {None}
    assert not any(method == "HEAD" and "/images/" in path for method, path, _, _ in s3_requests.requests)
    asked = {r["uri"]: r["source_fingerprint"] for r in list_inputs(f"s3://{s3_bucket}/m.csv", fingerprints=True).to_pylist()}
    assert asked == {
        f"s3://{s3_bucket}/images/a.png": f"size=1 etag={hashlib.md5(b'a').hexdigest()}",
        f"s3://{s3_bucket}/images/b.png": f"size=2 etag={hashlib.md5(b'bb').hexdigest()}",
        f"s3://{s3_bucket}/images/missing.png": None,
    }
    heads = [path for method, path, _, _ in s3_requests.requests if method == "HEAD" and "/images/" in path]
    assert sorted(heads) == [f"/{s3_bucket}/images/{n}" for n in ("a.png", "b.png", "missing.png")]


# ---------------------------------------------------------------- listings that stream


def test_an_s3_prefix_is_listed_a_page_at_a_time_in_key_order(s3_server, s3_bucket, s3_requests):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    keys = [f"images/{i:05d}.png" for i in range(2050)]
    for key in keys:
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    client.put_object(Bucket=s3_bucket, Key="images/sub/", Body=b"")  # a folder marker
    client.put_object(Bucket=s3_bucket, Key="images/zz/.hidden.png", Body=b"x")
    s3_requests.requests.clear()

    def pages_listed() -> int:  # ListObjectsV2 of the whole prefix (not the existence checks, which use a delimiter)
        return sum("list-type=2" in query and "delimiter" not in query for _, _, query, _ in s3_requests.requests)

    batches = iter_inputs(f"s3://{s3_bucket}/images/", batch_rows=1000)
    first = next(batches)
    assert first.num_rows == 1000 and pages_listed() == 1, "the first batch comes from the first page"
    rest = list(batches)
    assert pages_listed() == 3 and [b.num_rows for b in rest] == [1000, 50]
    table = pa.Table.from_batches([first, *rest])
    assert table.column("uri").to_pylist() == [f"s3://{s3_bucket}/{k}" for k in keys]
    assert set(table.column("source_fingerprint").to_pylist()) == {f"size=1 etag={hashlib.md5(b'x').hexdigest()}"}


def test_a_manifest_is_listed_as_it_is_read_so_a_bad_line_far_down_stops_the_listing_there(tmp_path):
    manifest = tmp_path / "m.csv"
    lines = [f"img/{i}.png,cat" for i in range(5000)]
    lines[4500] = ",cat"
    manifest.write_text("uri,label\n" + "\n".join(lines) + "\n")
    batches = iter_inputs(str(manifest), batch_rows=1000)
    assert [next(batches).num_rows for _ in range(4)] == [1000] * 4
    with pytest.raises(ValueError, match=r"m\.csv line 4502: empty uri"):
        next(batches)


def test_an_image_named_again_batches_later_is_listed_once(tmp_path):
    manifest = tmp_path / "m.csv"
    names = ["a.png", *(f"img/{i}.png" for i in range(2500)), "a.png", f"file://{tmp_path}/./a.png"]
    manifest.write_text("uri\n" + "".join(f"{n}\n" for n in names))
    uris = [u for batch in iter_inputs(str(manifest), batch_rows=1000) for u in batch.column("uri").to_pylist()]
    assert len(uris) == 2501 and uris[0] == str(tmp_path / "a.png") and uris.count(str(tmp_path / "a.png")) == 1


def test_seen_ids_mark_the_first_of_each_id_across_calls():
    ids = [image_id_for(f"s3://bucket/{i % 700}") for i in range(2000)]
    seen = SeenIds()
    marks = [bool(m) for start in range(0, len(ids), 300) for m in seen.first_seen(pa.array(ids[start : start + 300]))]
    met: set[str] = set()
    expected = []
    for image_id in ids:
        expected.append(image_id not in met)
        met.add(image_id)
    assert marks == expected and len(seen) == 700


# ---------------------------------------------------------------- reading one image


def test_reading_a_fifo_fails_at_once_instead_of_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    outcome = {}
    reader = threading.Thread(target=lambda: outcome.update(error=_raises(lambda: read_bytes(str(fifo)))), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert isinstance(outcome["error"], InputError) and "FIFO" in str(outcome["error"])


def test_reads_are_capped_in_bytes(tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(b"x" * 5000)
    with pytest.raises(InputError, match="5000 bytes, over the limit of 4096"):
        read_bytes(str(big), max_bytes=4096)
    with pytest.raises(InputError, match="character device"):
        read_bytes("/dev/zero", max_bytes=4096)
    data, fingerprint = read_file(str(big), max_bytes=5000)
    assert len(data) == 5000 and fingerprint.startswith("size=5000 mtime_ns=")


class _WriterInTheMiddle:
    """A file object whose first read lets ``writer`` change the file before the reading goes on:
    the read of a file that another process is writing, made deterministic."""

    def __init__(self, f, writer: threading.Thread):
        self.f, self.writer = f, writer

    def read(self, n):
        chunk = self.f.read(n)
        if not self.writer.is_alive() and self.writer.ident is None:
            self.writer.start()
            self.writer.join()
        return chunk


def _read_while(monkeypatch, write, **options):
    """read_file of ``path`` with ``write`` (a real writer, in a thread) run after its first chunk."""
    import pro2sam.storage as storage

    monkeypatch.setattr(storage, "_READ_CHUNK", 4096)
    read_chunks = storage._read_chunks
    writer = threading.Thread(target=write)
    monkeypatch.setattr(storage, "_read_chunks", lambda f, *args: read_chunks(_WriterInTheMiddle(f, writer), *args))
    return lambda path: read_file(str(path), **options)


def test_a_file_that_grows_while_it_is_read_is_a_read_error_not_a_short_image(tmp_path, monkeypatch):
    path = tmp_path / "growing.png"
    path.write_bytes(b"x" * 10_000)

    def append():
        with open(path, "ab") as f:
            f.write(b"y" * 10_000)

    with pytest.raises(ReadError, match=r"growing\.png changed while it was read \(still being written\?\): size=10000 .* after, 20000 bytes read"):
        _read_while(monkeypatch, append, attempts=1)(path)


def test_a_file_emptied_while_it_is_read_is_a_read_error(tmp_path, monkeypatch):
    path = tmp_path / "rewritten.png"
    path.write_bytes(b"x" * 10_000)

    def truncate():  # what open(path, "wb") of a writer starting over does
        with open(path, "wb"):
            pass

    with pytest.raises(ReadError, match=r"size=10000 .* before, size=0 .* after, 4096 bytes read"):
        _read_while(monkeypatch, truncate, attempts=1)(path)


def test_a_file_whose_writer_finishes_during_the_pause_is_read_whole(tmp_path, monkeypatch):
    path = tmp_path / "late.png"
    path.write_bytes(b"x" * 5000)

    def finish():
        with open(path, "ab") as f:
            f.write(b"y" * 5000)

    data, fingerprint = _read_while(monkeypatch, finish, attempts=2, backoff_s=0.01)(path)
    assert data == b"x" * 5000 + b"y" * 5000
    assert fingerprint == f"size=10000 mtime_ns={os.stat(path).st_mtime_ns}"


def test_a_stably_empty_file_reads_as_no_bytes(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert read_file(str(path), attempts=1) == (b"", f"size=0 mtime_ns={os.stat(path).st_mtime_ns}")


def test_a_range_read_gives_those_bytes_of_a_file_or_an_object_and_fewer_past_its_end(tmp_path, s3_bucket):
    local, remote = tmp_path / "shard.tar", f"s3://{s3_bucket}/shards/shard.tar"
    local.write_bytes(b"0123456789")
    write_bytes_atomic(remote, b"0123456789")
    for uri in (str(local), remote):
        assert read_range(uri, 2, 5, attempts=1) == b"234"
        assert read_range(uri, 8, 20, attempts=1) == b"89"


def test_a_range_read_that_keeps_failing_is_tried_again_after_growing_pauses_then_a_read_error(tmp_path):
    folder = tmp_path / "not_a_shard.tar"  # open() of a folder fails each time, as a broken store would
    folder.mkdir()
    started = time.monotonic()
    with pytest.raises(ReadError, match=r"cannot access .*not_a_shard\.tar: IsADirectoryError"):
        read_range(str(folder), 0, 10, attempts=3, backoff_s=0.2)
    assert time.monotonic() - started >= 0.2 + 0.4


def test_a_range_read_of_a_missing_file_is_file_not_found_at_once(tmp_path):
    started = time.monotonic()
    with pytest.raises(FileNotFoundError):
        read_range(str(tmp_path / "missing.tar"), 0, 10, attempts=3, backoff_s=5.0)
    assert time.monotonic() - started < 5.0


def _raises(fn):
    try:
        fn()
    except Exception as e:
        return e
    return None


# ---------------------------------------------------------------- writing whole files


def test_an_exclusive_write_refuses_an_existing_file_and_leaves_it_as_it_was(tmp_path):
    target = tmp_path / "lease.json"
    write_bytes_atomic(str(target), b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        write_bytes_atomic(str(target), b"second", exclusive=True)
    assert target.read_bytes() == b"first"
    write_bytes_atomic(str(target), b"third")
    assert target.read_bytes() == b"third"
    assert [p.name for p in tmp_path.iterdir()] == ["lease.json"], "no temporary file is left behind"


def test_an_exclusive_write_on_s3_is_refused_by_the_server(s3_bucket):
    uri = f"s3://{s3_bucket}/out/lease.json"
    write_bytes_atomic(uri, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        write_bytes_atomic(uri, b"second", exclusive=True)
    assert read_bytes(uri) == b"first"


def test_a_slow_read_past_its_timeout_is_a_read_error(tmp_path, monkeypatch):
    import pro2sam.storage as storage

    path = tmp_path / "slow.jpg"
    path.write_bytes(b"x" * (3 * 4096))
    monkeypatch.setattr(storage, "_READ_CHUNK", 4096)
    read_chunks = storage._read_chunks

    class Slow:  # a store that gives 4 KiB every 0.3 s
        def __init__(self, f):
            self.f = f

        def read(self, n):
            time.sleep(0.3)
            return self.f.read(n)

    monkeypatch.setattr(storage, "_read_chunks", lambda f, *args: read_chunks(Slow(f), *args))
    with pytest.raises(storage.ReadError, match="took over 0.5 s"):
        storage.read_bytes(str(path), timeout_s=0.5, attempts=1)


@pytest.fixture
def group_umask():
    """The umask of a team on a shared filesystem (group may write, others may read)."""
    old = os.umask(0o002)
    try:
        yield 0o002
    finally:
        os.umask(old)


def test_files_written_whole_get_the_mode_a_plain_open_gives(tmp_path, group_umask):
    from pro2sam.storage import staged_file

    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    expected = stat_mode(plain)
    assert expected == 0o664
    write_bytes_atomic(str(tmp_path / "whole"), b"x")
    write_bytes_atomic(str(tmp_path / "exclusive"), b"x", exclusive=True)
    with staged_file(str(tmp_path / "staged")) as staged, open(staged, "w") as f:
        f.write("x")
    assert {name: stat_mode(tmp_path / name) for name in ("whole", "exclusive", "staged")} == dict.fromkeys(
        ("whole", "exclusive", "staged"), expected
    )


def test_a_rewritten_file_keeps_its_mode(tmp_path, group_umask):
    target = tmp_path / "report.html"
    write_bytes_atomic(str(target), b"old")
    target.chmod(0o640)
    write_bytes_atomic(str(target), b"new")
    assert stat_mode(target) == 0o640 and target.read_bytes() == b"new"


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("spelling", ["local://{path}", "LOCAL://{path}", "file://{path}", "{path}/"])
def test_fsspecs_local_scheme_is_the_same_place_as_the_plain_path(folder, spelling):
    from pro2sam.storage import filesystem

    uri = spelling.format(path=folder)
    assert canonical_uri(uri) == canonical_uri(str(folder)) == str(folder)
    assert image_id_for(uri) == image_id_for(str(folder))
    assert filesystem(uri)[1] == str(folder)
    assert join_uri(uri, "a.png") == str(folder / "a.png")
    assert list_inputs(uri).column("uri").to_pylist() == list_inputs(str(folder)).column("uri").to_pylist()


def test_writing_under_a_file_fails_in_one_line_naming_it(tmp_path):
    from pro2sam.storage import StorageError

    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    for target in (blocker / "out.json", blocker / "sub" / "out.json"):
        with pytest.raises(StorageError, match=f"cannot write {target}: {blocker} is a file, not a folder"):
            write_bytes_atomic(str(target), b"x")
    with pytest.raises(StorageError, match=f"cannot write {tmp_path}: it is a folder, not a file"):
        write_bytes_atomic(str(tmp_path), b"x")
    assert blocker.read_text() == "mine"
