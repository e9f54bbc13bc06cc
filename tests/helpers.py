"""Helpers shared by the tests: scenes built on pro2sam.synthetic, the tiny models, the labeling
job's settings and command line, reading its output, a private Ray for subprocesses."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import struct
import sys
import tarfile
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pro2sam.matching import MatchConfig
from pro2sam.output import LabelsOutput
from pro2sam.pipeline.settings import LabelingSettings, LabelJobConfig, ReadLimits, Resources
from pro2sam.candidates import CandidateConfig
from pro2sam.storage import image_id_for
from pro2sam.synthetic import generate_scene

# The class names of the tiny random GTFormer.
TINY_CLASSES = ("disc", "square", "triangle")

# One grid and filter setting for every tiny run, in-process and on the command line: a random
# SAM's outputs survive only with its filters off.
POINTS_PER_SIDE = 4
CLI_MODEL_ARGS = [
    "--sam", "tiny", "--points-per-side", str(POINTS_PER_SIDE), "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
]  # fmt: skip


# ---------------------------------------------------------------- images and models


def scene(width: int, height: int, seed: int) -> Image.Image:
    """A synthetic scene (pro2sam.synthetic) of exactly ``width`` x ``height`` pixels, RGB."""
    return Image.fromarray(generate_scene(np.random.default_rng(seed), size=(width, height)).image)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's calling card)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def write_scenes(folder: Path, count: int) -> list[Path]:
    """``count`` PNG scenes of a few sizes (64..96 x 48..64) in ``folder``, named scene_NNN.png."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"scene_{i:03d}.png"
        scene(64 + 8 * (i % 5), 48 + 8 * (i % 3), seed=i).save(path)
        paths.append(path)
    return paths


def wsol_tree(root: Path) -> tuple[Path, Path]:
    """A wsolevaluation tree: six 64x48 images with one box each (x1, y1 one past the end), three
    in val and three in test, labels 0, 1, 2 in each; returns (metadata root, data root)."""
    rng = np.random.default_rng(0)
    data, meta = root / "data", root / "meta"
    for split, names in (("val", ["v0", "v1", "v2"]), ("test", ["t0", "t1", "t2"])):
        lines = {"image_ids.txt": [], "class_labels.txt": [], "image_sizes.txt": [], "localization.txt": []}
        for k, name in enumerate(names):
            image = np.full((48, 64, 3), 200, np.uint8)
            x0, y0 = int(rng.integers(2, 20)), int(rng.integers(2, 14))
            image[y0 : y0 + 24, x0 : x0 + 30] = (30, 60, 160)
            (data / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(data / split / f"{name}.png")
            path = f"{split}/{name}.png"
            lines["image_ids.txt"].append(path)
            lines["class_labels.txt"].append(f"{path},{k}")
            lines["image_sizes.txt"].append(f"{path},64,48")
            lines["localization.txt"].append(f"{path},{x0},{y0},{x0 + 30},{y0 + 24}")  # one past the end
        (meta / split).mkdir(parents=True, exist_ok=True)
        for file, content in lines.items():
            (meta / split / file).write_text("\n".join(content) + "\n")
    return meta, data


def make_tiny_checkpoints(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """A random tiny GTFormer export (3 classes) and a random tiny SAM state dict, on disk."""
    import torch

    from pro2sam.gtformer import create_gtformer, save_gtformer
    from pro2sam.sam import build_sam

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gtformer = create_gtformer("gtformer_test_tiny", num_classes=len(TINY_CLASSES))
    gt_dir = folder / "gtformer_test_tiny"
    save_gtformer(gtformer, gt_dir, class_names=list(TINY_CLASSES))
    sam_path = folder / "sam_tiny.pth"
    torch.save(build_sam("tiny").state_dict(), sam_path)
    return gt_dir, sam_path


def rect_mask(shape: tuple[int, int], x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """(H, W) bool with the inclusive rectangle [x0..x1] x [y0..y1] set."""
    m = np.zeros(shape, dtype=bool)
    m[y0 : y1 + 1, x0 : x1 + 1] = True
    return m


def body_piece_and_speck(shape: tuple[int, int] = (224, 224)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three separate parts of one SAM mask of a (224, 224) image: a body (x 60..159, y 60..159),
    a piece of 8x8 px (over the 10-pixel minimum component area) at x 20..27, y 100..107, and a
    speck of 2x2 px (under it) at x 200..201, y 10..11, outside the others' box."""
    return rect_mask(shape, 60, 60, 159, 159), rect_mask(shape, 20, 100, 27, 107), rect_mask(shape, 200, 10, 201, 11)


def choose_planted(model, masks: list[np.ndarray]):
    """Stage 3 of ``model`` (:meth:`pro2sam.Pro2SAM.choose`) on planted exact-mode candidates,
    with a coarse map lit where the first of them is: the first wins."""
    from pro2sam.candidates import Candidates

    h, w = masks[0].shape
    n = len(masks)
    candidates = Candidates(
        masks=np.stack(masks), pred_ious=np.full(n, 0.9, np.float32), stability_scores=np.full(n, 0.95, np.float32),
        point_coords=np.zeros((n, 2)), multimask_index=np.zeros(n, np.int64), boxes_xyxy=np.zeros((n, 4), np.int64),
        image_size=(h, w), mode="exact", num_grid_points=n,
    )  # fmt: skip
    first = np.asarray(Image.fromarray(masks[0].astype(np.uint8) * 255).resize((14, 14), Image.BILINEAR)) > 127
    coarse = np.where(first, 0.9, 0.05).astype(np.float32)
    probs = np.array([0.6, 0.3, 0.1], np.float32)
    return model.choose(np.zeros((h, w, 3), np.uint8), probs, coarse, candidates)


# ---------------------------------------------------------------- the labeling job


def tiny_labeling(tiny_checkpoints, *, ray_address=None, **resources) -> LabelingSettings:
    """The tiny models with their filters off (``ray_address`` None: the session's Ray)."""
    gt_dir, sam_path = tiny_checkpoints
    limits = {k: resources.pop(k) for k in ("max_pixels", "max_bytes", "read_timeout_s") if k in resources}
    return LabelingSettings(
        gtformer=str(gt_dir),
        sam="tiny",
        sam_checkpoint=str(sam_path),
        candidates=CandidateConfig(points_per_side=POINTS_PER_SIDE, pred_iou_thresh=0.0, stability_score_thresh=0.0),
        matching=MatchConfig(),
        resources=Resources(ray_address=ray_address, **resources),
        limits=ReadLimits(**limits),
    )


_RESOURCE_FIELDS = {"actors", "gpus_per_actor", "cpus_per_actor", "batch_size", "wait_for_resources_s",
                    "max_pixels", "max_bytes", "read_timeout_s"}  # fmt: skip


def job_config(tiny_checkpoints, input_: Path | str, output: Path | str, *, gtformer=None, **overrides) -> LabelJobConfig:
    """A labeling run of the tiny models; ``overrides`` may name job, resource or limit fields."""
    labeling = tiny_labeling(tiny_checkpoints, **{k: overrides.pop(k) for k in list(overrides) if k in _RESOURCE_FIELDS})
    if gtformer is not None:
        labeling.gtformer = str(gtformer)
    return LabelJobConfig(input=str(input_), output=str(output), labeling=labeling, **overrides)


def cli_label_args(tiny_checkpoints, input_: Path, output: Path, *extra: str) -> list[str]:
    gt_dir, sam_path = tiny_checkpoints
    return [
        sys.executable, "-m", "pro2sam", "label", "--input", str(input_), "--output", str(output),
        "--gtformer", str(gt_dir), "--sam-checkpoint", str(sam_path), *CLI_MODEL_ARGS, *extra,
    ]  # fmt: skip


OUTPUT_COLUMNS = ["image_id", "uri", "label", "status", "error", "width", "height", "box_xyxy", "run_id"]


def output_rows(output: Path) -> list[dict]:
    return LabelsOutput(str(output)).read_table(OUTPUT_COLUMNS).to_pylist()


def parquet_files(output: Path) -> list[Path]:
    return sorted(output.rglob("*.parquet")) if output.exists() else []


def readable_row_count(output: Path) -> int:
    """Rows in the output's complete Parquet files."""
    rows = 0
    for f in parquet_files(output):
        try:
            rows += pq.ParquetFile(f).metadata.num_rows
        except Exception:
            pass
    return rows


def parse_summary(stdout: str) -> dict[str, int]:
    m = re.search(r"(\d+) inputs: (\d+) ok, (\d+) error, (\d+) skipped", stdout)
    assert m, f"no summary line in:\n{stdout}"
    return dict(zip(("inputs", "ok", "error", "skipped"), map(int, m.groups())))


def assert_each_input_once(output: Path, inputs: list[Path]) -> list[dict]:
    rows = output_rows(output)
    uris = [r["uri"] for r in rows]
    assert sorted(uris) == sorted(str(p) for p in inputs), "every input exactly once, nothing else"
    assert len({r["image_id"] for r in rows}) == len(rows)
    assert all(r["image_id"] == image_id_for(r["uri"]) for r in rows)
    return rows


@contextmanager
def private_ray_tmpdir():
    """Environment for a subprocess whose Ray lives in a folder of its own.

    On exit, any process still running from that folder (a Ray left by a killed run) is killed by
    PID and the folder, with its ``ray_current_cluster`` file, is removed.
    """
    folder = tempfile.mkdtemp(prefix="p2s-labeljob-", dir="/tmp")  # short: Ray puts sockets here
    env = dict(os.environ, RAY_TMPDIR=folder)
    env.pop("RAY_ADDRESS", None)
    try:
        yield env, Path(folder)
    finally:
        for pid in _pids_mentioning(folder):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def local_ray_cluster(**head_node_args):
    """A multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, its head started
    with ``head_node_args``; add nodes with ``cluster.add_node``), its files in a private temp
    folder: yields (cluster, environment for drivers that join it) and shuts it down on exit."""
    from ray.cluster_utils import Cluster

    with private_ray_tmpdir() as (env, ray_tmp):
        saved = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = str(ray_tmp)  # the cluster's nodes keep their files there
        cluster = Cluster(initialize_head=True, connect=False, head_node_args=head_node_args)
        try:
            yield cluster, env
        finally:
            cluster.shutdown()
            if saved is None:
                os.environ.pop("RAY_TMPDIR", None)
            else:
                os.environ["RAY_TMPDIR"] = saved


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if text.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


# ---------------------------------------------------------------- a headless browser

CHROMIUM = Path("/usr/bin/chromium")


def run_chromium(page: Path, tmp_path: Path, *args: str, fragment: str = "") -> str:
    """Run headless Chromium on ``page`` (``--dump-dom``, ``--screenshot=...``) with a fresh
    profile under ``tmp_path`` and the flags that keep it off the network; returns its stdout."""
    import subprocess

    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.iterdir()))}"
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}",
    ]  # fmt: skip
    done = subprocess.run(
        [str(CHROMIUM), *flags, *args, page.resolve().as_uri() + fragment], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


# ---------------------------------------------------------------- an S3-protocol server's content


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def upload_file(endpoint: str, bucket: str, local: Path, key: str) -> str:
    s3_client(endpoint).upload_file(str(local), bucket, key)
    return f"s3://{bucket}/{key}"


def read_s3_output(endpoint: str, prefix: str, *, allow_empty: bool = False) -> pa.Table:
    """Every Parquet file under an s3:// prefix, read with s3fs + pyarrow (not pro2sam's own reader)."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    files = sorted(f for f in fs.find(prefix) if f.endswith(".parquet"))
    if not files and allow_empty:
        return pa.table({"image_id": pa.array([], pa.string()), "uri": pa.array([], pa.string())})
    assert files, f"no Parquet files under {prefix}"
    return pa.concat_tables(pq.read_table(f, filesystem=fs) for f in files)


# ---------------------------------------------------------------- WebDataset shards and Parquet of image bytes


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    """A tar shard of ``members`` (name, bytes) in order, as webdataset's TarWriter writes one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def samples(keys: list[str], *, seed: int = 0) -> dict[str, dict[str, bytes]]:
    """One PNG scene (64x48) and a class label per key: {key: {extension: bytes}}."""
    return {
        key: {"png": encode(scene(64, 48, seed=seed + i)), "cls": str(i % 3).encode(), "json": f'{{"name": "n{i}"}}'.encode()}
        for i, key in enumerate(keys)
    }


def members_of(found: dict[str, dict[str, bytes]]) -> list[tuple[str, bytes]]:
    return [(f"{key}.{ext}", data) for key, exts in found.items() for ext, data in exts.items()]


def hf_table(n: int, *, layout: str = "struct") -> tuple[pa.Table, list[bytes]]:
    """``n`` PNG scenes as Hugging Face ``datasets`` exports an ``Image()`` column ({bytes, path}
    structs) with a ``ClassLabel`` (int64) ``label``, or with plain ``binary`` images."""
    images = [encode(scene(64, 48, seed=100 + i)) for i in range(n)]
    if layout == "struct":
        column = pa.array([{"bytes": b, "path": f"img_{i:03d}.png"} for i, b in enumerate(images)],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())]))  # fmt: skip
    else:
        column = pa.array(images, pa.binary())
    return pa.table({"image": column, "label": pa.array([i % 3 for i in range(n)], pa.int64())}), images
