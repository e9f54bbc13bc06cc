"""Scale benchmark of the labeling job: throughput, overhead against a plain loop, driver memory.

    python benchmarks/bench_label_job.py --sizes 500 1000 2000 --points-per-side 4

For each size N it generates N small images (deterministic), then measures, side by side:

- **loop**: read bytes + decode + ``Pro2SAM.predict`` in a plain Python loop (the core library,
  no Ray), same models, same settings, same torch threads as the actor;
- **job**: ``run_label_job`` with one actor on a local Ray started before the clock (its start-up
  is reported apart), timed from submission to the last Parquet file, in a fresh subprocess so
  that the driver's peak RSS (``ru_maxrss``) is the job's alone.

It prints images/s of both, the job's overhead (job time / loop time - 1; target < 15% with one
actor) and the driver's peak memory per size (streaming: it should stay flat as N grows).
Models are the shipped small ones (``pro2sam.shipped``) on synthetic scenes (``pro2sam.synthetic``)
of 64..128 px: the numbers measure the plumbing more than SAM; with official models the per-image
model time grows and the relative overhead shrinks.
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


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    from PIL import Image

    from pro2sam.synthetic import make_scene

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(make_scene(seed, "test", i, size_range=(64, 128)).image).save(folder / f"img_{i:06d}.png")


def labeling(points_per_side: int, threads: int | None = None):
    from pro2sam import shipped
    from pro2sam.pipeline.settings import LabelingSettings, Resources
    from pro2sam.candidates import CandidateConfig

    return LabelingSettings(
        gtformer=str(shipped.gtformer_dir()),
        sam=shipped.SAM_VARIANT,
        sam_checkpoint=str(shipped.sam_checkpoint()),
        candidates=CandidateConfig.for_variant(shipped.SAM_VARIANT, points_per_side=points_per_side),
        resources=Resources(actors=1, cpus_per_actor=threads),
    )


def run_loop(images: Path, points_per_side: int, threads: int) -> dict:
    import torch

    from pro2sam.images import decode_image
    from pro2sam.pipeline.label_job import load_models

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_models(labeling(points_per_side), device="cpu")
    loaded = time.perf_counter()
    paths = sorted(images.iterdir())
    for p in paths:
        model.predict([decode_image(p.read_bytes())])
    end = time.perf_counter()
    return {"images": len(paths), "load_s": loaded - start, "label_s": end - loaded}


def run_job(images: Path, output: Path, points_per_side: int, threads: int) -> dict:
    import ray

    from pro2sam.pipeline.label_job import run_label_job
    from pro2sam.pipeline.settings import LabelJobConfig

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False)
    ray_start = time.perf_counter() - t0
    cfg = LabelJobConfig(input=str(images), output=str(output), labeling=labeling(points_per_side, threads), overwrite=True)
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
    parser.add_argument("--_job", nargs=2, metavar=("IMAGES", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._job:  # child process: the job alone, so ru_maxrss is the job driver's
        images, output = map(Path, args._job)
        print(json.dumps(run_job(images, output, args.points_per_side, args.threads)))
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_label_job_"))
    results = []
    for n in args.sizes:
        images = work / f"images_{n}"
        if not images.exists():
            make_images(images, n)
        loop = run_loop(images, args.points_per_side, args.threads)
        child = subprocess.run(
            [sys.executable, __file__, "--points-per-side", str(args.points_per_side), "--threads", str(args.threads),
             "--_job", str(images), str(work / f"out_{n}")],
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
    print(f"models: the shipped GTFormer + SAM, grid {args.points_per_side}x{args.points_per_side}, "
          f"{args.threads} torch threads, one actor; machine: {os.cpu_count()} CPUs")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
