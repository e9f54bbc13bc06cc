"""The labeling job against object storage: a real S3-protocol server (moto), a real Ray, real Parquet.

Nothing of fsspec/s3fs is mocked: images, checkpoints and the output all travel over HTTP to the
S3 server that ``tests/conftest.py`` starts. The last test submits the job to a separately started
Ray head with ``ray job submit``, the way it runs on a cluster.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import CLI_MODEL_ARGS, job_config, scene, write_scenes
from helpers import read_s3_output as _read_output
from helpers import s3_client as _s3
from helpers import upload_file as _upload_file

from pro2sam.pipeline.label_job import LabelJobSummary, run_label_job
from pro2sam.pipeline.settings import LabelJobConfig
from pro2sam.rle import decode_mask
from pro2sam.storage import list_inputs

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
BAD_FILE = b"this file is text, not an image"
TINY_ARGS = CLI_MODEL_ARGS


# ---------------------------------------------------------------- helpers


def _upload_folder(endpoint: str, bucket: str, local: Path, prefix: str) -> str:
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        _upload_file(endpoint, bucket, f, f"{prefix}/{f.relative_to(local).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def _upload_images(endpoint: str, bucket: str, folder: Path, count: int) -> dict[str, tuple[int, int]]:
    """Generated PNGs plus one non-image file under s3://bucket/images/; {uri: (width, height)}, bad file (0, 0)."""
    sizes = {}
    for path in write_scenes(folder, count):
        uri = _upload_file(endpoint, bucket, path, f"images/{path.name}")
        sizes[uri] = Image.open(path).size
    _s3(endpoint).put_object(Bucket=bucket, Key="images/not_an_image.jpg", Body=BAD_FILE)
    sizes[f"s3://{bucket}/images/not_an_image.jpg"] = (0, 0)
    return sizes


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, process group) of a live process, from /proc; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[1]), int(fields[2])) if fields[0] != "Z" else None


def _process_tree(root: int) -> list[int]:
    """``root``'s live descendants and the members of its process group (Linux /proc)."""
    stats = {int(d): st for d in os.listdir("/proc") if d.isdigit() and (st := _proc_stat(int(d)))}
    found = {pid for pid, (_, pgid) in stats.items() if pgid == root}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in stats.items() if ppid == parent and pid not in found]
        found.update(children)
        frontier.extend(children)
    found.discard(root)
    return sorted(found)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free a moment ago (all bound at once, then released)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def s3_models(s3_server, tiny_checkpoints):
    """The tiny GTFormer export folder and SAM .pth uploaded to a bucket of their own.

    Returns (gtformer URI, SAM URI, local GTFormer folder). The bucket name is new each session, so
    the actors' checkpoint cache (keyed by URI) never serves a stale copy.
    """
    gt_dir, sam_path = tiny_checkpoints
    bucket = f"models-{uuid.uuid4().hex[:12]}"
    _s3(s3_server).create_bucket(Bucket=bucket)
    gtformer = _upload_folder(s3_server, bucket, gt_dir, f"models/{gt_dir.name}")
    sam = _upload_file(s3_server, bucket, sam_path, f"models/{sam_path.name}")
    return gtformer, sam, gt_dir


@dataclass
class S3Run:
    config: LabelJobConfig
    summary: LabelJobSummary
    sizes: dict[str, tuple[int, int]]  # input uri -> (width, height); (0, 0) for the non-image
    rows: list[dict]  # the output, read back from S3
    gtformer_dir: Path  # the local original of the checkpoint the job read from S3


@pytest.fixture(scope="module")
def s3_run(s3_server, s3_models, ray_local, tmp_path_factory) -> S3Run:
    """One run of the job, in process: images and checkpoints on S3, output to S3."""
    gtformer, sam, gt_dir = s3_models
    bucket = f"job-{uuid.uuid4().hex[:12]}"
    _s3(s3_server).create_bucket(Bucket=bucket)
    sizes = _upload_images(s3_server, bucket, tmp_path_factory.mktemp("s3_images"), count=3)
    config = job_config((gtformer, sam), f"s3://{bucket}/images/", f"s3://{bucket}/labels/run1/", batch_size=2)
    summary = run_label_job(config)
    return S3Run(config, summary, sizes, _read_output(s3_server, config.output).to_pylist(), gt_dir)


# ---------------------------------------------------------------- in-process job on S3


@pytest.mark.timeout(240)
def test_s3_job_writes_one_row_per_input_image(s3_run):
    assert sorted(r["uri"] for r in s3_run.rows) == sorted(s3_run.sizes)
    assert len({r["image_id"] for r in s3_run.rows}) == len(s3_run.rows)
    s = s3_run.summary
    assert (s.inputs, s.ok, s.error, s.skipped) == (4, 3, 1, 0)


@pytest.mark.timeout(240)
def test_s3_job_marks_images_ok_and_the_non_image_error(s3_run):
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in s3_run.rows}
    bad = rows.pop("not_an_image.jpg")
    assert bad["status"] == "error" and bad["error"] and bad["mask_rle"] is None
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert all(r["error"] is None for r in rows.values())


@pytest.mark.timeout(240)
def test_s3_job_rows_name_their_images_by_s3_uri(s3_run):
    assert all(r["uri"].startswith(s3_run.config.input) for r in s3_run.rows)


@pytest.mark.timeout(240)
def test_s3_job_masks_decode_to_the_image_size(s3_run):
    for r in (r for r in s3_run.rows if r["status"] == "ok"):
        mask = decode_mask(r["mask_rle"])
        assert (r["width"], r["height"]) == s3_run.sizes[r["uri"]]
        assert mask.shape == (r["height"], r["width"]) and mask.dtype == bool
        assert int(mask.sum()) == r["mask_area"]
        x0, y0, x1, y1 = r["box_xyxy"]
        assert 0 <= x0 <= x1 < r["width"] and 0 <= y0 <= y1 < r["height"]


@pytest.mark.timeout(240)
def test_s3_job_uses_the_checkpoints_fetched_from_s3(s3_run):
    ok = [r for r in s3_run.rows if r["status"] == "ok"]
    assert {r["gtformer_sha256"] for r in ok} == {_sha256(s3_run.gtformer_dir / "model.safetensors")}


@pytest.mark.timeout(240)
def test_s3_job_run_again_labels_nothing_new(s3_run, s3_server):
    again = run_label_job(replace(s3_run.config, run_id="again"))
    n = len(s3_run.sizes)
    assert (again.inputs, again.ok, again.error, again.skipped) == (n, 0, 0, n)
    assert _read_output(s3_server, s3_run.config.output).num_rows == n


# ---------------------------------------------------------------- manifests on S3


def _put_manifest(endpoint: str, bucket: str, kind: str, rows: list[tuple[str, str | None]]) -> str:
    """A manifest (uri, label) at s3://bucket/data/manifest.<kind>; an empty CSV cell is a missing label."""
    if kind == "csv":
        body = ("uri,label\n" + "".join(f"{u},{label or ''}\n" for u, label in rows)).encode()
    else:
        buf = io.BytesIO()
        pq.write_table(pa.table({"uri": [u for u, _ in rows], "label": [label for _, label in rows]}), buf)
        body = buf.getvalue()
    _s3(endpoint).put_object(Bucket=bucket, Key=f"data/manifest.{kind}", Body=body)
    return f"s3://{bucket}/data/manifest.{kind}"


@pytest.mark.timeout(240)
def test_s3_csv_manifest_labels_reach_the_output(s3_server, s3_bucket, s3_models, ray_local, tmp_path):
    """A CSV manifest on S3 with an absolute and a relative URI; its label (and a missing one) are kept."""
    gtformer, sam, _ = s3_models
    a, b = write_scenes(tmp_path / "images", 2)
    for path in (a, b):
        _upload_file(s3_server, s3_bucket, path, f"data/images/{path.name}")
    manifest = _put_manifest(s3_server, s3_bucket, "csv", [(f"s3://{s3_bucket}/data/images/{a.name}", "disc"), (f"images/{b.name}", None)])
    output = f"s3://{s3_bucket}/labels/"
    summary = run_label_job(job_config((gtformer, sam), manifest, output))
    rows = _read_output(s3_server, output).to_pylist()
    assert {r["uri"]: r["label"] for r in rows} == {
        f"s3://{s3_bucket}/data/images/{a.name}": "disc",
        f"s3://{s3_bucket}/data/images/{b.name}": None,
    }
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert (summary.ok, summary.error) == (2, 0)


@pytest.mark.timeout(300)
def test_an_object_replaced_under_an_s3_manifest_is_relabeled_when_asked(s3_server, s3_bucket, s3_models, ray_local, tmp_path):
    """The manifest's objects are fingerprinted by HEAD as a prefix listing would: an unchanged
    object is not relabeled, a replaced one is."""
    gtformer, sam, _ = s3_models
    for path in write_scenes(tmp_path / "images", 2):
        _upload_file(s3_server, s3_bucket, path, f"data/images/{path.name}")
    manifest = _put_manifest(s3_server, s3_bucket, "csv", [("images/scene_000.png", None), ("images/scene_001.png", None)])
    output = f"s3://{s3_bucket}/labels/"
    run_label_job(job_config((gtformer, sam), manifest, output))
    unchanged = run_label_job(job_config((gtformer, sam), manifest, output, relabel_changed=True))
    assert (unchanged.skipped, unchanged.changed) == (2, 0)
    buf = io.BytesIO()
    scene(100, 60, seed=5).save(buf, format="PNG")  # another picture, another size
    _s3(s3_server).put_object(Bucket=s3_bucket, Key="data/images/scene_000.png", Body=buf.getvalue())
    changed = run_label_job(job_config((gtformer, sam), manifest, output, relabel_changed=True))
    assert (changed.ok, changed.skipped, changed.changed) == (1, 1, 1)
    widths = {r["uri"].rsplit("/", 1)[1]: r["width"] for r in _read_output(s3_server, output).to_pylist()}
    assert widths == {"scene_000.png": 100, "scene_001.png": 72}


@pytest.mark.timeout(60)
def test_s3_parquet_manifest_gives_the_job_its_uris_and_labels(s3_server, s3_bucket):
    """The Parquet manifest is read the same way (listing only: the job run is covered above)."""
    manifest = _put_manifest(s3_server, s3_bucket, "parquet", [(f"s3://{s3_bucket}/x/a.png", "disc"), ("images/b.png", None)])
    inputs = list_inputs(manifest)
    assert inputs.column("uri").to_pylist() == [f"s3://{s3_bucket}/x/a.png", f"s3://{s3_bucket}/data/images/b.png"]
    assert inputs.column("label").to_pylist() == ["disc", None]


# ---------------------------------------------------------------- unreachable storage


@pytest.mark.timeout(120)
def test_unreachable_s3_endpoint_ends_the_job_with_a_clear_message(tmp_path, tiny_checkpoints):
    gt_dir, sam_path = tiny_checkpoints
    (closed_port,) = _free_ports(1)  # nothing listens there once the probe socket is closed
    endpoint = f"http://127.0.0.1:{closed_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        PRO2SAM_CACHE=str(tmp_path / "cache"),
    )
    cmd = [str(VENV_BIN / "pro2sam"), "label", "--input", "s3://nowhere/images/", "--output", "s3://nowhere/labels/",
           "--gtformer", str(gt_dir), "--sam-checkpoint", str(sam_path), *TINY_ARGS]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    seconds = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert seconds < 90
    assert "cannot access s3://nowhere/images/" in proc.stderr
    assert endpoint in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- ray job submit


class _RayHead:
    """``ray start --head --block`` as a child process: we own its PID and so everything it starts.

    Token authentication is on, with a token of our own passed through the environment
    (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``), so neither ``~/.ray/auth_token`` nor any other
    Ray on this machine is touched. ``--temp-dir`` is a short folder of its own (Unix socket paths
    must stay under ~107 bytes).
    """

    def __init__(self, env: dict[str, str], log: Path):
        self.temp_dir = tempfile.mkdtemp(prefix="p2s-ray-", dir="/tmp")
        gcs, self.dashboard_port, client, agent_http, agent_grpc, metrics, runtime_env = _free_ports(7)
        self.gcs_port = gcs
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = env
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus=4", "--num-gpus=0",
             "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
             f"--temp-dir={self.temp_dir}", "--disable-usage-stats"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def wait_until_up(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"ray start exited with {self.proc.returncode}"
            try:
                urllib.request.urlopen(f"{self.address}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:  # 401 without a token: up, and asking for one
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"Ray head at {self.address} not up after {timeout_s} s")

    def stop(self) -> None:
        """SIGTERM to ``ray start --block`` (it stops what it started), then SIGKILL to stragglers by PID."""
        started = _process_tree(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 15
        while (alive := [p for p in started if _proc_stat(p)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()
        self._remove_stale_cluster_file()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _remove_stale_cluster_file(self) -> None:
        # Ray records the last head in <temp dir>/ray_current_cluster; remove it where it names ours.
        for folder in (self.temp_dir, os.path.join(tempfile.gettempdir(), "ray")):
            f = Path(folder) / "ray_current_cluster"
            try:
                if f.read_text().strip().endswith(f":{self.gcs_port}"):
                    f.unlink()
            except OSError:
                pass

    def ray(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(VENV_BIN / "ray"), *args], env=env or self.env, capture_output=True, text=True, timeout=timeout
        )


@pytest.mark.timeout(400)
def test_ray_job_submit_labels_every_image_once(s3_server, s3_bucket, s3_models, tmp_path):
    gtformer, sam, _ = s3_models
    sizes = _upload_images(s3_server, s3_bucket, tmp_path / "images", count=3)
    output = f"s3://{s3_bucket}/labels/submitted/"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM stops the head at once (default: drain 30 s)
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in the entrypoint is the venv's
        PRO2SAM_CACHE=str(tmp_path / "cache"),
    )  # the AWS_* settings of the S3 server are inherited from this process
    head = _RayHead(env, tmp_path / "ray_head.log")
    try:
        head.wait_until_up(timeout_s=150)
        wrong = head.ray("job", "list", "--address", head.address, env={**env, "RAY_AUTH_TOKEN": "0" * 64})
        assert wrong.returncode != 0, "the head accepted a wrong token"
        assert "authentication failed" in (wrong.stdout + wrong.stderr).lower(), wrong.stdout + wrong.stderr

        job_id = f"pro2sam-label-{uuid.uuid4().hex[:8]}"
        # The head answers before its job agent is up on a loaded machine ("No available agent to
        # submit job, please try again later"); nothing is submitted then, so asking again is safe.
        deadline = time.monotonic() + 120
        while True:
            submit = head.ray(
                "job", "submit", "--address", head.address, "--submission-id", job_id, "--working-dir", str(REPO), "--",
                "python", "jobs/label.py", "--input", f"s3://{s3_bucket}/images/", "--output", output,
                "--gtformer", gtformer, "--sam-checkpoint", sam, "--batch-size", "2", *TINY_ARGS,
                timeout=300,
            )  # fmt: skip
            if "no available agent" not in (submit.stdout + submit.stderr).lower() or time.monotonic() > deadline:
                break
            time.sleep(5)
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
        status = head.ray("job", "status", "--address", head.address, job_id)
        assert "succeeded" in (status.stdout + status.stderr).lower(), status.stdout + status.stderr
        logs = head.ray("job", "logs", "--address", head.address, job_id)  # all of it, unlike submit's tail
        assert "4 inputs: 3 ok, 1 error, 0 skipped" in logs.stdout, logs.stdout[-4000:] + logs.stderr[-2000:]
    finally:
        head.stop()
    table = _read_output(s3_server, output)
    assert sorted(table.column("uri").to_pylist()) == sorted(sizes)
    assert table.num_rows == len(set(table.column("image_id").to_pylist()))
