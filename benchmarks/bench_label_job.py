"""Scale benchmark of the labeling job: throughput, overhead against a plain loop, driver memory.

    python benchmarks/bench_label_job.py --sizes 500 1000 2000 --points-per-side 4

For each size N it generates N small images (deterministic), then measures, side by side:

- **loop**: read bytes + decode + ``Pro2SAM.predict`` in a plain Python loop (the core library,
  no Ray), same tiny models, same settings, same torch threads as the actor;
- **job**: ``run_label_job`` with one actor on a local Ray started before the clock (its start-up
  is reported apart), timed from submission to the last Parquet file, in a fresh subprocess so
  that the driver's peak RSS (``ru_maxrss``) is the job's alone.

It prints images/s of both, the job's overhead (job time / loop time - 1; target < 15% with one
actor) and the driver's peak memory per size (streaming: it should stay flat as N grows).
Models are the tiny random-weight ones (``pro2sam.example``): the numbers measure the plumbing,
not SAM; with real models the per-image model time grows and the relative overhead shrinks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = int(rng.integers(64, 128)), int(rng.integers(64, 128))
        img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        img[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(150, 255, size=3, dtype=np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:06d}.png")


def candidate_config(points_per_side: int):
    from pro2sam.candidates import CandidateConfig

    return CandidateConfig(points_per_side=points_per_side, pred_iou_thresh=0.0, stability_score_thresh=0.0)


def run_loop(images: Path, models: Path, points_per_side: int, threads: int) -> dict:
    import torch

    from pro2sam.images import decode_image
    from pro2sam.model import Pro2SAM

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = Pro2SAM.from_checkpoints(
        models / "gtformer_test_tiny", sam="tiny", sam_checkpoint=models / "sam_tiny.pth",
        device="cpu", candidates=candidate_config(points_per_side),
    )  # fmt: skip
    loaded = time.perf_counter()
    paths = sorted(images.iterdir())
    for p in paths:
        model.predict([decode_image(p.read_bytes())])
    end = time.perf_counter()
    return {"images": len(paths), "load_s": loaded - start, "label_s": end - loaded}


def run_job(images: Path, models: Path, output: Path, points_per_side: int, threads: int) -> dict:
    import ray

    from pro2sam.pipeline.label_job import LabelJobConfig, run_label_job

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False)
    ray_start = time.perf_counter() - t0
    cfg = LabelJobConfig(
        input=str(images), output=str(output), gtformer=str(models / "gtformer_test_tiny"), sam="tiny",
        sam_checkpoint=str(models / "sam_tiny.pth"), points_per_side=points_per_side, pred_iou_thresh=0.0,
        stability_score_thresh=0.0, actors=1, cpus_per_actor=threads, overwrite=True,
    )  # fmt: skip
    start = time.perf_counter()
    summary = run_label_job(cfg)
    seconds = time.perf_counter() - start
    ray.shutdown()
    return {
        "images": summary.ok + summary.error, "ok": summary.ok, "error": summary.error, "job_s": seconds,
        "ray_start_s": ray_start, "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000])
    parser.add_argument("--points-per-side", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the loop and the actor")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--_job", nargs=3, metavar=("IMAGES", "MODELS", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._job:  # child process: the job alone, so ru_maxrss is the job driver's
        images, models, output = map(Path, args._job)
        print(json.dumps(run_job(images, models, output, args.points_per_side, args.threads)))
        return

    from pro2sam.example import make_tiny_checkpoints

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_label_job_"))
    models = work / "models"
    make_tiny_checkpoints(models)
    results = []
    for n in args.sizes:
        images = work / f"images_{n}"
        if not images.exists():
            make_images(images, n)
        loop = run_loop(images, models, args.points_per_side, args.threads)
        child = subprocess.run(
            [sys.executable, __file__, "--points-per-side", str(args.points_per_side), "--threads", str(args.threads),
             "--_job", str(images), str(models), str(work / f"out_{n}")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        job = json.loads(child.stdout.strip().splitlines()[-1])
        row = {"n": n, **{f"loop_{k}": v for k, v in loop.items()}, **job}
        row["loop_images_per_s"] = n / (loop["load_s"] + loop["label_s"])
        row["job_images_per_s"] = job["images"] / job["job_s"]
        row["overhead"] = job["job_s"] / (loop["load_s"] + loop["label_s"]) - 1
        results.append(row)
        print(
            f"N={n:6d}  loop {row['loop_images_per_s']:7.2f} img/s (load {loop['load_s']:.1f} s)  "
            f"job {row['job_images_per_s']:7.2f} img/s (Ray start {job['ray_start_s']:.1f} s apart)  "
            f"overhead {100 * row['overhead']:+.1f}%  driver peak RSS {job['driver_peak_rss_mb']:.0f} MB",
            flush=True,
        )
    print(f"models: tiny random-weight GTFormer + SAM, grid {args.points_per_side}x{args.points_per_side}, "
          f"{args.threads} torch threads, one actor; machine: {os.cpu_count()} CPUs")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
