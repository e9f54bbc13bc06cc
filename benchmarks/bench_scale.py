"""Scale benchmark of the labels table on object storage: old layout against new, one run.

    python benchmarks/bench_scale.py --rows 1000000 --old-files 2000 --old-ref main

A loopback S3 server (moto, in a process of its own, counting the requests it answers) holds:

- **new layout**: ``--rows`` synthetic label rows (the real ``LABEL_SCHEMA``; 14x14 coarse maps,
  short RLE masks) committed by the job's ``LabelWriter``: files of 10,000 rows;
- **old layout**: the same rows as 32-row files (one per Ray Data block, as the job wrote them
  before), ``--old-files`` of them, the numbers extrapolated linearly to ``--rows`` (writing and
  reading 31,000 objects one by one on moto would take most of an hour);
- a manifest (CSV) naming the ``--rows`` images.

Measured, each in a fresh subprocess: files and bytes; a rerun's skip decision (seconds, HTTP
requests): the new reader (``LabelsOutput.scan``, byte ranges, 32 threads) and the rerun plan
over the manifest's listing, against the old reader (each file opened in turn, as the issue
measured); DuckDB ``count(*)`` with a ``match_score`` filter over each layout (DuckDB reads S3
through the fsspec filesystem the project registers, as ``pro2sam show`` does); the driver's peak
RSS (``VmHWM``) listing the manifest's rows, with this tree's ``iter_inputs`` and, with
``--old-ref``, that git ref's ``list_inputs``, and for the whole pre-Ray part of a rerun
(listing + reading the output's keys + the plan).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
BUCKET = "bench"
NEW, OLD = f"s3://{BUCKET}/new/", f"s3://{BUCKET}/old/"
MANIFEST = f"s3://{BUCKET}/manifest.csv"
OLD_ROWS_PER_FILE = 32


# ---------------------------------------------------------------- the S3 server, counting requests


def serve() -> None:
    """Run moto on a free loopback port (printed), counting requests; ``GET /__requests`` returns
    the counts by method and empties them."""
    from moto.server import ThreadedMotoServer

    counts: Counter = Counter()
    lock = threading.Lock()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    app = server._server.app  # werkzeug's server calls .app per request

    def counted(environ, start_response):
        if environ.get("PATH_INFO") == "/__requests":
            with lock:
                body = json.dumps(dict(counts)).encode()
                counts.clear()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        with lock:
            counts[environ["REQUEST_METHOD"]] += 1
        return app(environ, start_response)

    server._server.app = counted
    print(server.get_host_and_port()[1], flush=True)
    threading.Event().wait()


def requests_since_last(endpoint: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{endpoint}/__requests") as r:
        return json.loads(r.read())


# ---------------------------------------------------------------- synthetic rows


def image_uri(i: int) -> str:
    return f"s3://images/photos/{i:08d}.jpg"


def label_rows(start: int, count: int) -> pa.Table:
    """Rows ``start`` .. ``start + count`` of the synthetic labels table (LABEL_SCHEMA), as the
    job would write them for images ``image_uri(i)``: 98% ok (5% of those coarse-map fallbacks),
    2% error rows; top-5 classes of 200, a 14x14 coarse map (a Gaussian blob), a 20-80 character
    RLE string."""
    from pro2sam.labels import LABEL_SCHEMA
    from pro2sam.storage import image_id_for

    rng = np.random.default_rng(start)
    n = count
    uris = [image_uri(i) for i in range(start, start + n)]
    etags = rng.bytes(16 * n).hex()
    sizes = rng.integers(20_000, 400_000, n)
    w, h = rng.integers(200, 1024, n).astype(np.int32), rng.integers(200, 1024, n).astype(np.int32)
    ok = rng.random(n) > 0.02
    fallback = ok & (rng.random(n) < 0.05)
    sam = ok & ~fallback
    classes = rng.integers(0, 200, (n, 5)).astype(np.int32)
    names = np.array([f"class_{c:03d}" for c in range(200)], dtype=object)
    scores = np.sort(rng.random((n, 5), dtype=np.float32), axis=1)[:, ::-1].copy()
    x0, y0 = (rng.random(n) * w / 2).astype(np.int32), (rng.random(n) * h / 2).astype(np.int32)
    box = np.stack([x0, y0, np.minimum(w - 1, x0 + w // 3), np.minimum(h - 1, y0 + h // 3)], 1).astype(np.int32)
    lengths = rng.integers(20, 80, n)
    text = bytes(np.frombuffer(bytes(range(48, 112)), np.uint8)[rng.integers(0, 64, int(lengths.sum()))]).decode()
    ends = np.cumsum(lengths)
    counts = [text[e - k : e] for e, k in zip(ends, lengths)]
    yy, xx = np.mgrid[0:14, 0:14]
    cy, cx, s = rng.random(n) * 14, rng.random(n) * 14, 1.5 + 3 * rng.random(n)
    maps = np.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / (2 * s[:, None, None] ** 2))
    maps = maps.reshape(n, -1).astype(np.float32)

    def lists(values: np.ndarray, type_: pa.DataType) -> pa.Array:
        offsets = pa.array(np.arange(0, values.size + 1, values.shape[1], dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(values.ravel(), type_))

    def where(values, type_, valid) -> pa.Array:
        return pa.array(values, type_, mask=~valid)

    def const(value: str) -> pa.Array:
        return pa.array(np.full(n, value, dtype=object), pa.string())

    rle_size = pa.FixedSizeListArray.from_arrays(pa.array(np.stack([h, w], 1).ravel()), 2)
    columns = {
        "image_id": pa.array([image_id_for(u) for u in uris], pa.string()),
        "uri": pa.array(uris, pa.string()),
        "source_fingerprint": pa.array([f"size={z} etag={etags[32 * k : 32 * k + 32]}" for k, z in enumerate(sizes)]),
        "width": pa.array(w),
        "height": pa.array(h),
        "label": pa.nulls(n, pa.string()),
        "topk_classes": lists(classes, pa.int32()),
        "topk_names": lists(names[classes], pa.string()),
        "topk_scores": lists(scores, pa.float32()),
        "box_xyxy": pa.FixedSizeListArray.from_arrays(pa.array(box.ravel()), 4),
        "box_source": where(np.where(fallback, "coarse_fallback", "sam").astype(object), pa.string(), ok),
        "mask_rle": pa.StructArray.from_arrays([rle_size, pa.array(counts)], names=["size", "counts"], mask=pa.array(~ok)),
        "mask_area": where(rng.integers(100, 100_000, n), pa.int64(), ok),
        "match_score": where(rng.random(n, dtype=np.float32), pa.float32(), sam),
        "pred_iou": where(rng.random(n, dtype=np.float32), pa.float32(), sam),
        "stability_score": where(rng.random(n, dtype=np.float32), pa.float32(), sam),
        "num_candidates": where(rng.integers(0, 60, n).astype(np.int32), pa.int32(), ok),
        "coarse_map": lists(maps, pa.float32()),
        "status": pa.array(np.where(ok, "ok", "error").astype(object), pa.string()),
        "error": where(np.full(n, "cannot decode: truncated or corrupt", dtype=object), pa.string(), ~ok),
        "error_kind": where(np.full(n, "image", dtype=object), pa.string(), ~ok),
        "gtformer_sha256": const(hashlib.sha256(b"gtformer").hexdigest()),
        "sam_model": const("vit_h:" + hashlib.sha256(b"sam").hexdigest()),
        "run_id": const("20261202T000000-bench000"),
    }
    return pa.table(columns).cast(LABEL_SCHEMA)


def write_new(rows: int) -> None:
    from pro2sam.output import LabelsOutput, LabelWriter

    writer = LabelWriter(LabelsOutput(NEW), "bench")  # the job's writer: 10,000 rows per file
    for start in range(0, rows, 10_000):
        writer.add(label_rows(start, min(10_000, rows - start)))
    writer.commit()


def write_old(files: int) -> None:
    from pro2sam.output import LabelsOutput

    out = LabelsOutput(OLD)

    def one(n: int) -> None:
        out.commit(label_rows(n * OLD_ROWS_PER_FILE, OLD_ROWS_PER_FILE), f"part-old-{n:06d}.parquet")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(files)))


def write_manifest(rows: int) -> None:
    from pro2sam.storage import filesystem

    text = "uri\n" + "".join(f"{image_uri(i)}\n" for i in range(rows))
    fs, path = filesystem(MANIFEST)
    fs.pipe_file(path, text.encode())


# ---------------------------------------------------------------- the measurements (subprocesses)


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ``ru_maxrss``, it does not inherit the high-water
    mark of the parent that forked it before the exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def role_list(old: bool) -> dict:
    """List the manifest; with ``old``, the way that git ref's ``list_inputs`` does it."""
    import pro2sam.storage as storage

    start = time.perf_counter()
    if old:
        rows = len(storage.list_inputs(MANIFEST))
    else:
        rows = sum(b.num_rows for b in storage.iter_inputs(MANIFEST))
    return {"rows": rows, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(), "source": storage.__file__}


def role_decide(endpoint: str) -> dict:
    """A rerun's pre-Ray part over the new layout: read the output's keys, then list the manifest
    through the plan (every image is already labeled)."""
    from pro2sam.output import LabelsOutput, RerunPlanner
    from pro2sam.storage import iter_inputs

    requests_since_last(endpoint)
    start = time.perf_counter()
    done = LabelsOutput(NEW).scan(RerunPlanner.columns())
    planner = RerunPlanner(done)
    scanned = time.perf_counter()
    scan_requests = requests_since_last(endpoint)
    todo = sum(planner.decide(batch).num_rows for batch in iter_inputs(MANIFEST))
    end = time.perf_counter()
    return {
        "output_rows": len(done), "scan_s": scanned - start, "scan_requests": scan_requests,
        "plan_s": end - scanned, "listing_requests": requests_since_last(endpoint),
        "skipped": planner.skipped, "todo": todo, "plan_bytes_per_row": planner.nbytes / max(1, len(done)),
        "peak_rss_mb": peak_rss_mb(),
    }  # fmt: skip


def role_old_scan(endpoint: str) -> dict:
    """The old rerun's reader: list the output, then open each file in turn and read its keys."""
    import pyarrow.parquet as pq

    from pro2sam.output import RerunPlanner
    from pro2sam.storage import filesystem

    requests_since_last(endpoint)
    start = time.perf_counter()
    fs, path = filesystem(OLD)
    rows = 0
    for name in sorted(p for p in fs.find(path) if p.endswith(".parquet")):
        with fs.open(name, "rb") as f:
            rows += pq.ParquetFile(f).read(columns=list(RerunPlanner.columns())).num_rows
    return {"rows": rows, "seconds": time.perf_counter() - start, "requests": requests_since_last(endpoint)}


def role_duckdb(endpoint: str, prefix: str) -> dict:
    import duckdb

    from pro2sam.storage import filesystem

    con = duckdb.connect()
    con.register_filesystem(filesystem(prefix)[0])
    requests_since_last(endpoint)
    start = time.perf_counter()
    (count,) = con.execute(f"SELECT count(*) FROM read_parquet('{prefix}*.parquet') WHERE match_score > 0.5").fetchone()
    return {"count": count, "seconds": time.perf_counter() - start, "requests": requests_since_last(endpoint)}


def run_role(endpoint: str, *args: str, pythonpath: str = str(REPO)) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    proc = subprocess.run([sys.executable, __file__, "--endpoint", endpoint, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{args}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the run


def layout_size(prefix: str) -> tuple[int, int]:
    from pro2sam.storage import filesystem

    fs, path = filesystem(prefix)
    sizes = [info["size"] for info in fs.ls(path, detail=True, refresh=True) if info["name"].endswith(".parquet")]
    return len(sizes), sum(sizes)


def machine() -> str:
    import duckdb
    import moto
    import pyarrow
    import s3fs

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB; Python {platform.python_version()}, pyarrow {pyarrow.__version__}, "
        f"s3fs {s3fs.__version__}, duckdb {duckdb.__version__}, moto {moto.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--old-files", type=int, default=2000, help="32-row files written for the old layout")
    parser.add_argument("--old-ref", default=None, help="git ref whose list_inputs is the old listing (e.g. main)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve()
    if args.endpoint:
        os.environ.update(AWS_ENDPOINT_URL=args.endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
    if args.role:
        result = {
            "list": lambda: role_list(old=False),
            "list-old": lambda: role_list(old=True),
            "decide": lambda: role_decide(args.endpoint),
            "old-scan": lambda: role_old_scan(args.endpoint),
            "duckdb": lambda: role_duckdb(args.endpoint, args.prefix),
        }[args.role]()
        print(json.dumps(result))
        return

    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        endpoint = f"http://127.0.0.1:{server.stdout.readline().strip()}"
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
        report(args, endpoint)
    finally:
        server.kill()
        server.wait()


def report(args, endpoint: str) -> None:
    from pro2sam.storage import filesystem

    fs, _ = filesystem(NEW)
    fs.mkdir(BUCKET)
    print(f"# bench_scale: {args.rows:,} rows; machine: {machine()}", flush=True)
    t = time.perf_counter()
    write_new(args.rows)
    write_old(args.old_files)
    write_manifest(args.rows)
    print(f"(wrote both layouts and the manifest in {time.perf_counter() - t:.0f} s)", flush=True)
    scale = args.rows / (args.old_files * OLD_ROWS_PER_FILE)

    new_files, new_bytes = layout_size(NEW)
    old_files, old_bytes = layout_size(OLD)
    decide = run_role(endpoint, "--role", "decide")
    old_scan = run_role(endpoint, "--role", "old-scan")
    duck_new = run_role(endpoint, "--role", "duckdb", "--prefix", NEW)
    duck_old = run_role(endpoint, "--role", "duckdb", "--prefix", OLD)
    listing = run_role(endpoint, "--role", "list")
    old_listing = None
    if args.old_ref:
        with tempfile.TemporaryDirectory() as old_src:
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.old_ref, "pro2sam"], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", old_src], input=archive.stdout, check=True)
            old_listing = run_role(endpoint, "--role", "list-old", pythonpath=old_src)

    def total(counts: dict) -> int:
        return sum(counts.values())

    old_label = f"old: 32-row files (measured on {old_files:,} files, x{scale:.2f})"
    print(json.dumps({"decide": decide, "old_scan": old_scan, "duck_new": duck_new, "duck_old": duck_old,
                      "listing": listing, "old_listing": old_listing}, indent=1), flush=True)  # fmt: skip
    lines = [
        f"| | {old_label} | new: 10,000-row files |",
        "|---|---|---|",
        f"| files per {args.rows:,} rows | {old_files * scale:,.0f} | {new_files:,} |",
        f"| bytes | {old_bytes * scale / 2**20:,.0f} MiB | {new_bytes / 2**20:,.0f} MiB |",
        f"| rerun: reading the output's keys, s | {old_scan['seconds'] * scale:.1f} (serial) | {decide['scan_s']:.1f} |",
        f"| rerun: HTTP requests reading the keys | {total(old_scan['requests']) * scale:,.0f} ({_methods(old_scan['requests'])}) "
        f"| {total(decide['scan_requests']):,} ({_methods(decide['scan_requests'])}) |",
        f"| rerun: plan over the {args.rows:,}-row listing, s | - | {decide['plan_s']:.1f} ({decide['skipped']:,} skipped, "
        f"{decide['todo']} to label; {total(decide['listing_requests'])} requests) |",
        f"| DuckDB count(*) WHERE match_score > 0.5, s | {duck_old['seconds'] * scale:.1f} ({total(duck_old['requests']) * scale:,.0f} requests) "
        f"| {duck_new['seconds']:.1f} ({total(duck_new['requests']):,} requests; count {duck_new['count']:,}) |",
        f"| driver peak RSS listing {args.rows:,} manifest rows | "
        + (f"{old_listing['peak_rss_mb']:,.0f} MB ({args.old_ref}'s list_inputs, {old_listing['seconds']:.0f} s)" if old_listing else "-")
        + f" | {listing['peak_rss_mb']:,.0f} MB (iter_inputs, {listing['seconds']:.0f} s) |",
        f"| driver peak RSS, the rerun's whole pre-Ray part | - | {decide['peak_rss_mb']:,.0f} MB |",
    ]
    print("\n".join(lines))


def _methods(counts: dict) -> str:
    return ", ".join(f"{v:,} {k}" for k, v in sorted(counts.items()))


if __name__ == "__main__":
    main()
