"""Sources of inputs: WebDataset tar shards and Parquet tables of image bytes, listed and read as
the labeling job lists and reads them (real tar files written with tarfile, real Parquet, moto S3)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import encode, hf_table, members_of, samples, scene, upload_file, write_shard

from pro2sam.inputs import iter_inputs, list_inputs
from pro2sam.inputs.webdataset import expand_braces
from pro2sam.pipeline.stages import decode_images, read_images


def sha1_id(location: str) -> str:
    """The id the README promises: 20 hex digits of the SHA-1 of the canonical location."""
    return hashlib.sha1(location.encode()).hexdigest()[:20]


def read_and_decode(table: pa.Table, **limits) -> dict[str, np.ndarray]:
    """The job's read and decode stages over a listing, in this process."""
    batch = {name: np.array(table.column(name).to_pylist(), dtype=object) for name in table.column_names}
    return decode_images(read_images(batch, **limits))


# ---------------------------------------------------------------- WebDataset shards


@pytest.fixture
def shards(tmp_path) -> tuple[Path, dict[str, dict[str, bytes]]]:
    """Two shards of three samples each under shards/; returns (folder, {location: members})."""
    folder = (tmp_path / "shards").resolve()
    by_location = {}
    for n, keys in enumerate([["a/s0", "a/s1", "a/s2"], ["b/s3", "b/s4", "b/s5"]]):
        found = samples(keys, seed=10 * n)
        write_shard(folder / f"{n:06d}.tar", members_of(found))
        by_location.update({f"{folder}/{n:06d}.tar#{key}": exts for key, exts in found.items()})
    return folder, by_location


def test_a_folder_of_shards_lists_one_input_per_sample_at_shard_and_key(shards):
    folder, by_location = shards
    rows = list_inputs(str(folder)).to_pylist()
    assert [r["uri"] for r in rows] == list(by_location), "every sample once, in shard order"
    assert [r["image_id"] for r in rows] == [sha1_id(u) for u in by_location]
    assert [r["label"] for r in rows] == ["0", "1", "2"] * 2, "the .cls member is the label"
    assert {r["container_kind"] for r in rows} == {"tar"} and not any(r["input_error"] for r in rows)


def test_the_read_stage_gives_each_sample_its_image_member_exactly(shards):
    folder, by_location = shards
    table = list_inputs(str(folder))
    batch = {name: np.array(table.column(name).to_pylist(), dtype=object) for name in table.column_names}
    read = read_images(batch)
    assert list(read["data"]) == [m["png"] for m in by_location.values()]
    assert set(read["error"]) == {""}


def test_an_over_large_member_is_an_input_error_and_a_shard_gone_since_listed_a_read_error(shards):
    folder, by_location = shards
    table = list_inputs(str(folder))
    smallest = min(len(m["png"]) for m in by_location.values())
    decoded = read_and_decode(table, max_bytes=smallest)
    kinds = [None if len(m["png"]) <= smallest else "input" for m in by_location.values()]
    assert list(decoded["error_kind"]) == kinds and kinds.count("input") == 5
    assert all("over the limit" in e for e, k in zip(decoded["error"], kinds) if k)
    (folder / "000001.tar").unlink()
    decoded = read_and_decode(table)
    assert list(decoded["error_kind"]) == [None] * 3 + ["read"] * 3, "a rerun reads them again"
    assert all("not found" in e for e in decoded["error"][3:])


def test_a_brace_pattern_names_the_same_samples_as_the_folder(shards):
    folder, by_location = shards
    assert expand_braces("s3://b/{000008..000011}.tar") == [f"s3://b/{n:06d}.tar" for n in (8, 9, 10, 11)]
    assert expand_braces("x/{a,b}-{1..2}.tar") == ["x/a-1.tar", "x/a-2.tar", "x/b-1.tar", "x/b-2.tar"]
    listed = list_inputs(f"{folder}/{{000000..000001}}.tar").column("uri").to_pylist()
    assert listed == list(by_location)


def test_a_brace_pattern_whose_first_shard_is_missing_is_one_clear_error(shards):
    from pro2sam.storage import StorageError

    folder, _ = shards
    with pytest.raises(StorageError, match="first shard .*000007.tar does not exist"):
        iter_inputs(f"{folder}/{{000007..000009}}.tar")  # when called, before a batch is asked for


def test_many_shards_read_at_once_list_their_samples_in_listing_order(tmp_path):
    keys = [f"s{n:02d}" for n in range(20)]
    for n, (key, exts) in enumerate(samples(keys).items()):
        write_shard(tmp_path / "many" / f"{n:06d}.tar", members_of({key: exts}))
    (tmp_path / "many" / "zz_loose.png").write_bytes(encode(scene(64, 48, seed=0)))
    listed = list_inputs(f"{tmp_path}/many").column("uri").to_pylist()
    expected = [f"{tmp_path}/many/{n:06d}.tar#{key}" for n, key in enumerate(keys)] + [f"{tmp_path}/many/zz_loose.png"]
    assert sorted(listed) == expected and len(listed) == len(expected)
    pattern = list_inputs(f"{tmp_path}/many/{{000000..000019}}.tar").column("uri").to_pylist()
    assert pattern == expected[:-1], "a pattern's shards in the pattern's order"


def test_a_shard_label_is_read_from_the_member_asked_for(shards):
    folder, _ = shards
    shard = str(folder / "000000.tar")
    assert list_inputs(shard, shard_label="json:name").column("label").to_pylist() == ["n0", "n1", "n2"]
    assert list_inputs(shard, shard_label=None).column("label").to_pylist() == [None] * 3


def test_one_shard_given_as_the_input_is_its_samples(shards):
    folder, by_location = shards
    listed = list_inputs(str(folder / "000001.tar")).column("uri").to_pylist()
    assert listed == [u for u in by_location if "000001.tar" in u]


def test_a_sample_without_an_image_and_a_member_that_is_not_one_are_error_rows(tmp_path):
    shard = tmp_path / "odd.tar"
    write_shard(shard, [("k0.png", encode(scene(64, 48, seed=0))), ("k1.cls", b"2"), ("k2.jpg", b"notes, not a picture")])
    rows = list_inputs(str(shard)).to_pylist()
    assert [r["uri"] for r in rows] == [f"{shard}#k0", f"{shard}#k1", f"{shard}#k2"]
    assert "no image member" in rows[1]["input_error"] and "cls" in rows[1]["input_error"]
    decoded = read_and_decode(list_inputs(str(shard)))
    assert list(decoded["error_kind"]) == [None, "input", "image"]
    assert "not an image" in decoded["error"][2]


def test_a_shard_cut_inside_a_member_lists_what_precedes_and_error_rows_for_the_rest(tmp_path):
    found = samples(["s0", "s1", "s2"])
    whole = write_shard(tmp_path / "whole.tar", members_of(found))
    cut = whole.index(found["s1"]["png"]) + 100  # inside s1's image
    (tmp_path / "cut.tar").write_bytes(whole[:cut])
    rows = list_inputs(str(tmp_path / "cut.tar")).to_pylist()
    uris = [r["uri"] for r in rows]
    assert uris[:2] == [f"{tmp_path}/cut.tar#s0", f"{tmp_path}/cut.tar#s1"]
    assert rows[0]["input_error"] is None
    assert "ends inside s1.png" in rows[1]["input_error"]
    assert len(rows) == 3 and uris[2].startswith(f"{tmp_path}/cut.tar#@"), "one row for the unreadable rest"
    assert "cannot be read from byte" in rows[2]["input_error"]
    decoded = read_and_decode(list_inputs(str(tmp_path / "cut.tar")))
    assert decoded["image"][0].shape == (48, 64, 3) and list(decoded["error_kind"]) == [None, "input", "input"]


def test_a_shard_cut_between_members_ends_in_an_error_row(tmp_path):
    found = samples(["s0", "s1"])
    whole = write_shard(tmp_path / "whole.tar", members_of(found))
    boundary = whole.index(found["s1"]["png"]) - 512  # s1.png's header starts here
    (tmp_path / "cut.tar").write_bytes(whole[:boundary])
    rows = list_inputs(str(tmp_path / "cut.tar")).to_pylist()
    assert [r["input_error"] is None for r in rows] == [True, False]
    assert rows[1]["uri"] == f"{tmp_path}/cut.tar#@{boundary}" and "end-of-archive" in rows[1]["input_error"]


def test_a_file_named_tar_that_is_not_a_tar_is_one_error_row(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"a text file, not a tar\n" * 100)
    rows = list_inputs(str(tmp_path / "x.tar")).to_pylist()
    assert [r["uri"] for r in rows] == [f"{tmp_path}/x.tar#@0"] and "not a tar" in rows[0]["input_error"]


def test_a_folder_mixing_images_and_shards_lists_both(tmp_path):
    found = samples(["s0"])
    write_shard(tmp_path / "in" / "part.tar", members_of(found))
    (tmp_path / "in" / "loose.png").write_bytes(found["s0"]["png"])
    listed = sorted(list_inputs(str(tmp_path / "in")).column("uri").to_pylist())
    assert listed == [f"{tmp_path}/in/loose.png", f"{tmp_path}/in/part.tar#s0"]


def test_shard_members_come_from_s3_in_one_range_request(s3_server, s3_bucket, s3_requests, shards):
    folder, by_location = shards
    for path in sorted(folder.iterdir()):
        upload_file(s3_server, s3_bucket, path, f"shards/{path.name}")
    table = list_inputs(f"s3://{s3_bucket}/shards/")
    assert table.column("uri").to_pylist() == [
        u.replace(str(folder), f"s3://{s3_bucket}/shards") for u in by_location
    ]
    first = table.filter(pa.compute.equal(table.column("container"), f"s3://{s3_bucket}/shards/000000.tar"))
    s3_requests.requests.clear()
    batch = {name: np.array(first.column(name).to_pylist(), dtype=object) for name in first.column_names}
    read = read_images(batch)
    assert list(read["data"]) == [m["png"] for u, m in by_location.items() if "000000.tar" in u]
    gets = [r for r in s3_requests.requests if r[0] == "GET" and "000000.tar" in r[1]]
    assert len(gets) == 1 and gets[0][3] is not None, f"one range GET for the shard's three samples: {gets}"


# ---------------------------------------------------------------- Parquet tables of images


def test_a_parquet_table_of_images_lists_one_input_per_row_and_reads_its_bytes(tmp_path):
    table, images = hf_table(5)
    pq.write_table(table, tmp_path / "images.parquet", row_group_size=2)
    listed = list_inputs(str(tmp_path / "images.parquet"))
    uris = [f"{tmp_path}/images.parquet#row={i}&path=img_{i:03d}.png" for i in range(5)]
    assert listed.column("uri").to_pylist() == uris
    assert listed.column("image_id").to_pylist() == [sha1_id(u) for u in uris]
    assert listed.column("label").to_pylist() == ["0", "1", "2", "0", "1"]
    batch = {name: np.array(listed.column(name).to_pylist(), dtype=object) for name in listed.column_names}
    assert list(read_images(batch)["data"]) == images


def test_a_parquet_of_binary_images_without_paths_is_located_by_row(tmp_path):
    table, images = hf_table(3, layout="binary")
    pq.write_table(table.append_column("extra", pa.array(["x"] * 3)), tmp_path / "IMAGES.PARQUET")
    listed = list_inputs(str(tmp_path))
    assert listed.column("uri").to_pylist() == [f"{tmp_path}/IMAGES.PARQUET#row={i}" for i in range(3)]
    decoded = read_and_decode(listed)
    assert [im.shape for im in decoded["image"]] == [(48, 64, 3)] * 3


def test_a_null_or_bad_image_in_a_parquet_table_is_an_error_row(tmp_path):
    column = pa.array([{"bytes": encode(scene(64, 48, seed=0)), "path": None}, None, {"bytes": b"not a png", "path": "x.png"}],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))  # fmt: skip
    pq.write_table(pa.table({"image": column}), tmp_path / "t.parquet")
    decoded = read_and_decode(list_inputs(str(tmp_path / "t.parquet")))
    assert list(decoded["error_kind"]) == [None, "input", "image"]
    assert "null image" in decoded["error"][1]


def test_a_parquet_with_a_uri_column_and_no_image_bytes_is_still_a_manifest(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(encode(scene(64, 48, seed=0)))
    pq.write_table(pa.table({"uri": [str(image)], "image": ["a path, not bytes"]}), tmp_path / "list.parquet")
    assert list_inputs(str(tmp_path / "list.parquet")).column("uri").to_pylist() == [str(image)]
