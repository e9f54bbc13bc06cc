"""The labeling job on a multi-node Ray cluster: three nodes on this machine
(``ray.cluster_utils.Cluster``), each declaring one GPU; the actors compute on the CPU.

The job is the ``pro2sam label`` command joined to the cluster (``--ray-address``), as a driver
on a cluster's head runs it. A node is lost while it labels, or the driver is killed and the job
run again: every image ends up in the output exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import (
    cli_label_args,
    local_ray_cluster,
    output_rows,
    parse_summary,
    readable_row_count,
    write_scenes,
)

NODES = 3
# Enough work at a 16x16 grid (slower than the tests' usual 4x4) that the pool has grown to an
# actor per node while most images are still to label.
IMAGES = 160


@contextmanager
def gpu_cluster():
    """A Ray cluster of ``NODES`` nodes (the head and two workers), each with 2 CPUs and 1 GPU:
    (cluster, environment for drivers)."""
    with local_ray_cluster(num_cpus=2, num_gpus=1) as (cluster, env):
        for _ in range(NODES - 1):
            cluster.add_node(num_cpus=2, num_gpus=1)
        cluster.wait_for_nodes()
        yield cluster, env


def labeling_actors(cluster) -> dict[str, dict]:
    """The labeling actors the cluster's GCS knows, by actor id (any state)."""
    actors = cluster.global_state.actor_table(None)
    return {aid: a for aid, a in actors.items() if "Pro2SAMLabeler" in a["ActorClassName"]}


def label_command(tiny_checkpoints, images: Path, output: Path, cluster) -> list[str]:
    # Small files, so that some are committed while the rest is still being labeled.
    return cli_label_args(
        tiny_checkpoints, images, output, "--ray-address", cluster.address, "--gpus-per-actor", "1",
        "--actors", str(NODES), "--cpus-per-actor", "1", "--batch-size", "2", "--rows-per-file", "4",
        "--wait-for-resources", "0", "--points-per-side", "16",
    )  # fmt: skip


def wait_for_actors_on_every_node(cluster, job: subprocess.Popen, output: Path, timeout_s: float) -> dict[str, str]:
    """Wait until ``NODES`` labeling actors are alive, and the first label file is committed;
    return {actor id: node id}."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and job.poll() is None:
        alive = {aid: a["Address"]["NodeID"] for aid, a in labeling_actors(cluster).items() if a["State"] == "ALIVE"}
        if len(alive) == NODES and readable_row_count(output) > 0:
            return alive
        time.sleep(0.5)
    raise AssertionError(f"not {NODES} labeling actors while the job ran (job exit status {job.poll()})")


@pytest.mark.timeout(300)
def test_a_node_lost_mid_run_loses_and_duplicates_no_image(tiny_checkpoints, tmp_path):
    images = write_scenes(tmp_path / "images", IMAGES)
    output = tmp_path / "labels"
    with gpu_cluster() as (cluster, env):
        log = open(tmp_path / "job.log", "w+")
        job = subprocess.Popen(label_command(tiny_checkpoints, tmp_path / "images", output, cluster),
                               stdout=log, stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
        try:
            placed = wait_for_actors_on_every_node(cluster, job, output, timeout_s=200)
            assert len(set(placed.values())) == NODES, f"one actor per GPU node: {placed}"
            rows_before = readable_row_count(output)
            lost = next(n for n in cluster.worker_nodes if n.node_id in placed.values())
            cluster.remove_node(lost, allow_graceful=False)  # the machine is gone, its actor and blocks with it
            job.wait(timeout=200)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
        log.seek(0)
        stdout = log.read()
    assert job.returncode == 0, stdout[-4000:]
    assert rows_before < IMAGES, "the node was lost part way through the job"
    assert parse_summary(stdout) == {"inputs": IMAGES, "ok": IMAGES, "error": 0, "skipped": 0}
    rows = output_rows(output)
    assert sorted(r["uri"] for r in rows) == sorted(str(p) for p in images)
    assert all(r["status"] == "ok" for r in rows)


@pytest.mark.timeout(300)
def test_a_killed_driver_run_again_labels_each_image_once(tiny_checkpoints, tmp_path):
    images = write_scenes(tmp_path / "images", IMAGES)
    output = tmp_path / "labels"
    command = None
    with gpu_cluster() as (cluster, env):
        command = label_command(tiny_checkpoints, tmp_path / "images", output, cluster)
        first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            placed = wait_for_actors_on_every_node(cluster, first, output, timeout_s=200)
            assert len(set(placed.values())) == NODES, f"one actor per GPU node: {placed}"
        finally:
            os.kill(first.pid, signal.SIGKILL)  # the driver only: the cluster stays up
            first.wait()
        kept = readable_row_count(output)
        second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=200)
    assert 0 < kept < IMAGES, "the first driver was killed part way through the job"
    assert second.returncode == 0, second.stderr[-4000:]
    assert parse_summary(second.stdout) == {"inputs": IMAGES, "ok": IMAGES - kept, "error": 0, "skipped": kept}
    rows = output_rows(output)
    assert sorted(r["uri"] for r in rows) == sorted(str(p) for p in images)
    assert all(r["status"] == "ok" for r in rows)


@pytest.mark.timeout(300)
def test_a_small_cluster_that_cannot_grow_fits_the_cpu_actors_default_and_starts_at_once(tiny_checkpoints, tmp_path):
    """A fixed 2-CPU cluster (no autoscaler) and no --cpus-per-actor: the default of 2 CPUs per
    CPU actor (plus 1 for decoding) would wait for resources that never come; it runs with 1."""
    images = write_scenes(tmp_path / "images", 4)
    output = tmp_path / "labels"
    with local_ray_cluster(num_cpus=2, num_gpus=0) as (cluster, env):
        args = cli_label_args(tiny_checkpoints, tmp_path / "images", output, "--ray-address", cluster.address)
        start = time.monotonic()
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the cluster has 2 CPUs: 1 CPU(s) per labeling actor" in proc.stderr
    assert "waiting" not in proc.stderr, "fitted at once, not waited for"
    assert sorted(r["uri"] for r in output_rows(output)) == sorted(str(p) for p in images)
    assert time.monotonic() - start < 200
