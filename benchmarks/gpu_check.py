"""Throughput of Pro2SAM's SAM stage on one GPU, the reference flow against ours (issue 14).

What ``benchmarks/gpu_check.sh`` runs; one run, at most ``--time-budget-s`` seconds (default 450,
under the 8 minutes a borrowed GPU gives), one JSON.

Defaults on a CUDA device are the issue's: SAM ViT-H (random weights, the real architecture),
a 32x32 grid, 64 generated images of 1024x768 (W x H). Elsewhere (``--device cpu``) they are a
dry run of the same code: the tiny SAM, an 8x8 grid, images of 256x192; every flow runs, so that
the script is known to work before a GPU is borrowed.

Flows, in this order (later ones are skipped, and said to be, when the budget runs out):

    gtformer           GTFormer (DeiT-S preset, random weights) on batches of the images: the
                       stage before SAM, reported on its own
    ours_bf16          ``Pro2SAM.localize_batch`` as the labeling actor runs it: batches of
                       ``--batch-size`` images, one image-encoder call per batch, fast path, SAM
                       under bfloat16 autocast, matching on the CPU overlapping the next decode
    ours_bf16enc       the same with the image encoder only in bfloat16, its embedding decoded in
                       float32 (``--dtype bfloat16-encoder``)
    ours_fp16enc       the same with the image encoder in float16 (``--dtype float16-encoder``)
    ours_fp32          the same in float32
    reference          ``SamAutomaticMaskGenerator`` (segment_anything's own modules, float32,
                       image by image) + the authors' matching on its full-resolution masks;
                       at most ``--reference-max-s`` seconds of images (its rate is steady)
    sam2_ours_bf16     SAM 2.1 (``--sam2``, default hiera large on CUDA; random weights) through
    sam2_ours_fp32     the same ``localize_batch`` (our generator on SAM 2's modules, fast path);
                       bfloat16 on CUDA only (CPU autocast to bfloat16 is slower, not faster)
    sam2_reference     ``SAM2AutomaticMaskGenerator`` (float32, image by image) + the authors'
                       matching, at most ``--sam2-reference-max-s`` seconds of images
    same_answer        ``bench_speed.py --shipped --settings shipped`` on this device: the shipped
                       trained SAM and GTFormer at the package's shipped settings on
                       ``--same-answer-images`` synthetic scenes, reference flow against ours in
                       float32, bfloat16, bfloat16-encoder and float16-encoder (same chosen
                       mask: IoU >= 0.95)
    ours_bf16_compile  ours_bf16 with ``torch.compile`` (image encoder and decoder pass); the
                       first batch, compiled cold, is timed on its own (``first_batch_s``,
                       ``cold_start_s``)
    ours_fp32_compile  the same in float32

Every SAM flow is timed end to end per image (encode, decode the grid, filter, match, the chosen
mask and its box at full resolution), after one untimed warm-up, and reports images/s, the
device's memory peak, and the fraction of its time in the image encoder, the grid decoder and
filtering (``other``: matching, the winner's upsampling and what the three do not hold; ours
matches in a worker thread, overlapping the next image's decoding, so its fractions are of the
wall time and ``other`` holds only what was not overlapped). SAM 2's encoder has one
implementation, so SAM 2 runs without the SDPA swap of SAM v1. Random weights: the candidate filters
are off (as in ``bench_speed.py``: a random SAM's masks would fail the official thresholds), the
heavy end for the reference's full-resolution work; the coarse map is planted from the generated
object's mask (it stands for a trained GTFormer's).

    bash benchmarks/gpu_check.sh                              # on the GPU machine
    bash benchmarks/gpu_check.sh --device cpu --images 1      # dry run
    python benchmarks/gpu_check.py --help
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import resource
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_speed, beside this file

from bench_speed import Clock, make_scene, planted_coarse_map, run_reference  # noqa: E402

from pro2sam.candidates import CandidateConfig  # noqa: E402
from pro2sam.gtformer import create_gtformer  # noqa: E402
from pro2sam.matching import MatchConfig  # noqa: E402
from pro2sam.model import Pro2SAM  # noqa: E402
from pro2sam.sam import SAM_VARIANTS, _make_random_masks_coherent, build_sam, is_sam2, use_sdpa_attention  # noqa: E402

# The issue's configuration (CUDA) and the dry run's (any other device).
DEFAULTS = {
    "cuda": dict(sam="vit_h", sam2="sam2.1_hiera_large", points_per_side=32, images=64, height=768, width=1024,
                 same_answer_images=100),
    "dry_run": dict(sam="tiny", sam2="sam2.1_hiera_tiny", points_per_side=8, images=1, height=192, width=256,
                    same_answer_images=1),
}
GTFORMER_PRESET = "gtformer_deit_small_patch16_224"
GTFORMER_CLASSES = 1000
TARGET_IMAGES_PER_S = 25.0
STAGES = ("encoder", "decoder", "filtering", "other")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sam", choices=["tiny", "vit_b", "vit_l", "vit_h"], help="default: vit_h on CUDA, tiny elsewhere")
    parser.add_argument("--sam2", choices=[*(v for v in SAM_VARIANTS if is_sam2(v)), "none"],
                        help="SAM 2.1 variant of the sam2_* flows (default: hiera large on CUDA, hiera tiny elsewhere; "
                        "none: skip them; needs the sam2 package)")
    parser.add_argument("--sam2-reference-max-s", type=float, default=45.0,
                        help="SAM2AutomaticMaskGenerator: stop after the image that passes this many seconds")
    parser.add_argument("--points-per-side", type=int, help="default: 32 on CUDA, 8 elsewhere")
    parser.add_argument("--images", type=int, help="default: 64 on CUDA, 1 elsewhere")
    parser.add_argument("--height", type=int, help="image height, px (default: 768 on CUDA, 192 elsewhere)")
    parser.add_argument("--width", type=int, help="image width, px (default: 1024 on CUDA, 256 elsewhere)")
    parser.add_argument("--batch-size", type=int, default=8, help="ours: images per localize_batch")
    parser.add_argument("--points-per-batch", type=int, default=256, help="ours: prompts per decoder pass, at most")
    parser.add_argument("--reference-max-s", type=float, default=90.0,
                        help="the reference flow stops after the image that crosses this many seconds")
    parser.add_argument("--same-answer-images", type=int, help="default: 100 on CUDA, 1 elsewhere; 0 skips")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile flows")
    parser.add_argument("--time-budget-s", type=float, default=450.0,
                        help="flows not started by then are skipped; timed passes stop at it")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", default="gpu_check.json", help="written after every flow (default %(default)s)")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    defaults = DEFAULTS["cuda" if torch.device(args.device).type == "cuda" else "dry_run"]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def machine(device: torch.device) -> dict:
    out = dict(host=platform.node(), cpu=platform.processor() or platform.machine(), torch=torch.__version__,
               cpu_threads=torch.get_num_threads(), device=str(device), python=platform.python_version())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, gpu_memory_mb=props.total_memory >> 20, cuda=torch.version.cuda,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return out


class Flow:
    """One flow's measurements, device memory peak included."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    def memory(self) -> dict:
        if self.device.type == "cuda":
            return dict(device_memory_peak_mb=torch.cuda.max_memory_allocated(self.device) / 2**20,
                        device_memory_reserved_peak_mb=torch.cuda.max_memory_reserved(self.device) / 2**20)
        # No device memory: the process's peak resident set (all flows so far), for the record.
        return dict(device_memory_peak_mb=None, process_rss_peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def rates(images: int, seconds: float, stages: dict[str, float]) -> dict:
    """images/s, s/image and stage fractions of ``seconds`` (``other``: the rest)."""
    stages = dict(stages)
    stages["other"] = max(0.0, seconds - sum(stages.values()))
    return dict(images=images, seconds=seconds, images_per_s=images / seconds, s_per_image=seconds / images,
                stage_seconds=stages, stage_fraction={k: v / seconds for k, v in stages.items()})


def run_gtformer(gtformer_model: Pro2SAM, images, batch_size: int, clock: Clock) -> dict:
    flow = Flow(clock.device)
    gtformer_model.classify(images[:batch_size])  # warm-up
    t0 = clock()
    for first in range(0, len(images), batch_size):
        gtformer_model.classify(images[first : first + batch_size])
    seconds = clock() - t0
    return dict(preset=GTFORMER_PRESET, random_weights=True, batch_size=batch_size, images=len(images),
                seconds=seconds, images_per_s=len(images) / seconds, **flow.memory())


def run_ours(model: Pro2SAM, images, probs, coarse_maps, batch_size: int, clock: Clock, deadline: float) -> dict:
    """``localize_batch`` over the images in batches; the first batch once before, untimed (on a
    compiled model: its cold start, timed apart)."""
    flow = Flow(clock.device)
    t0 = clock()
    model.localize_batch(images[:batch_size], probs[:batch_size], coarse_maps[:batch_size])
    first_batch = clock() - t0
    stages = dict.fromkeys(("encoder", "decoder", "filtering"), 0.0)
    candidates, fallbacks, done, batches = [], 0, 0, 0
    t0 = clock()
    for first in range(0, len(images), batch_size):
        sl = slice(first, first + batch_size)
        for result in model.localize_batch(images[sl], probs[sl], coarse_maps[sl]):
            stages["encoder"] += result.timings.get("embed", 0.0)
            stages["decoder"] += result.timings.get("decode", 0.0)
            stages["filtering"] += result.timings.get("filter", 0.0)
            candidates.append(result.num_candidates)
            fallbacks += result.box_source == "coarse_fallback"
            done += 1
        batches += 1
        if time.monotonic() > deadline:
            break
    seconds = clock() - t0
    out = rates(done, seconds, stages)
    steady_batch = seconds / batches
    out.update(first_batch_s=first_batch, cold_start_s=max(0.0, first_batch - steady_batch),
               candidates_mean=float(np.mean(candidates)), fallback_rate=fallbacks / done,
               images_per_encoder_call=min(batch_size, model.generator._images_per_pass),
               prompts_per_decoder_pass=model.generator.decoder.batch_size, **flow.memory())
    return out


def run_reference_flow(sam, amg: dict, images, coarse_maps, match_config: MatchConfig, clock: Clock,
                       max_seconds: float, deadline: float) -> dict:
    flow = Flow(clock.device)
    run_reference(sam, {**amg, "points_per_side": 4}, images[0], coarse_maps[0], match_config, clock)  # warm-up
    stages = dict.fromkeys(("encoder", "decoder", "filtering"), 0.0)
    candidates, fallbacks, done = [], 0, 0
    t0 = clock()
    for image, coarse_map in zip(images, coarse_maps):
        rec = run_reference(sam, amg, image, coarse_map, match_config, clock)
        stages["encoder"] += rec["times"]["embed"]
        stages["decoder"] += rec["times"]["decode"]
        stages["filtering"] += rec["times"]["filter"]  # AMG's filters, NMS, RLE round trip
        candidates.append(rec["candidates"])
        fallbacks += rec["fallback"]
        done += 1
        if clock() - t0 > max_seconds or time.monotonic() > deadline:
            break
    out = rates(done, clock() - t0, stages)
    out.update(candidates_mean=float(np.mean(candidates)), fallback_rate=fallbacks / done, **flow.memory())
    return out


def run_same_answer(args: argparse.Namespace, json_path: Path) -> dict:
    """``bench_speed.py --shipped`` on this device; its JSON."""
    import bench_speed

    bench_speed.main(["--shipped", "--settings", "shipped", "--device", args.device, "--images", str(args.same_answer_images),
                      "--batch-size", str(args.batch_size), "--json", str(json_path)]
                     + (["--threads", str(args.threads)] if args.threads else []))
    report = json.loads(json_path.read_text())
    return dict(images=report["images"], seconds_per_image=report["seconds_per_image"],
                same_rate={k: v["same_rate"] for k, v in report["flows"].items()},
                fallback_rate={k: v["fallback_rate"] for k, v in report["flows"].items()})


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.time_budget_s
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = Clock(device)
    json_path = Path(args.json)
    dry_run = device.type != "cuda"

    report = dict(
        check="gpu_check", issue=14, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(sys.argv), dry_run=dry_run, machine=machine(device),
        config=dict(sam=args.sam, sam2=args.sam2, random_weights=True, points_per_side=args.points_per_side, images=args.images,
                    image_hw=[args.height, args.width], batch_size=args.batch_size,
                    points_per_batch=args.points_per_batch, reference_max_s=args.reference_max_s,
                    time_budget_s=args.time_budget_s),
        flows={}, skipped={}, errors={},
    )

    def write() -> None:
        report["elapsed_s"] = time.monotonic() - started
        json_path.write_text(json.dumps(report, indent=1, default=float))

    print(f"gpu_check: SAM {args.sam} (random weights), grid {args.points_per_side}x{args.points_per_side}, "
          f"{args.images} images {args.width}x{args.height}, device {device}"
          + (" -- DRY RUN (the issue's configuration runs on CUDA)" if dry_run else ""), flush=True)
    print(json.dumps(report["machine"]), flush=True)

    # Random weights; a random decoder made coherent (as build_sam does for the tiny SAM) so that
    # masks follow the image and the filters and matching have work to do.
    sam = build_sam(args.sam, device=device, seed=0, sdpa=False)
    sam.requires_grad_(False)
    if args.sam != "tiny":
        _make_random_masks_coherent(sam)
    ours_sam = use_sdpa_attention(copy.deepcopy(sam))
    thresholds = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, stability_score_offset=1.0, box_nms_thresh=0.7)
    # Every grid point decoded, as the reference flow does (grid pruning, on by default, is a
    # separate lever: bench_quality.py measures what it costs).
    config = CandidateConfig(points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
                             prune_with_coarse_map=False, **thresholds)
    torch.manual_seed(0)
    gtformer = create_gtformer(GTFORMER_PRESET, num_classes=GTFORMER_CLASSES)
    model = Pro2SAM(gtformer, ours_sam, candidates=config, device=device)
    match_config = model.match_config
    report["config"].update(thresholds=thresholds, matching=asdict(match_config))

    scenes = [make_scene(args.height, args.width, seed=i) for i in range(args.images)]
    images = [image for image, _ in scenes]
    coarse_maps = [planted_coarse_map(mask) for _, mask in scenes]
    print(f"set up in {time.monotonic() - started:.1f} s", flush=True)

    def attempt(name: str, run, *, min_left_s: float = 0.0) -> None:
        left = deadline - time.monotonic()
        if left < min_left_s:
            report["skipped"][name] = f"time budget: {left:.0f} s left, wanted {min_left_s:.0f}"
            print(f"{name}: skipped ({report['skipped'][name]})", flush=True)
            write()
            return
        t = time.monotonic()
        try:
            report["flows"][name] = result = run()
        except Exception as e:  # one flow's failure (say, compile on a machine without a compiler) ends only it
            report["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            print(f"{name}: FAILED ({report['errors'][name]})", flush=True)
        else:
            shown = {k: result[k] for k in ("images_per_s", "s_per_image", "cold_start_s", "same_rate") if k in result}
            if "stage_fraction" in result:
                shown["stage_fraction"] = {k: round(v, 3) for k, v in result["stage_fraction"].items()}
            print(f"{name} ({time.monotonic() - t:.0f} s): {json.dumps(shown, default=float)}", flush=True)
        write()

    probs, _ = model.classify(images[: args.batch_size])  # GTFormer's outputs; its maps are not used
    probs = list(np.resize(probs, (len(images), probs.shape[1])))
    attempt("gtformer", lambda: run_gtformer(model, images, args.batch_size, clock))
    for name, dtype in (("bf16", "bfloat16"), ("bf16enc", "bfloat16-encoder"), ("fp16enc", "float16-encoder"), ("fp32", "float32")):
        flow = model.with_settings(candidates=replace(config, dtype=dtype))
        attempt(f"ours_{name}", lambda flow=flow: run_ours(flow, images, probs, coarse_maps, args.batch_size, clock, deadline))
    amg = dict(points_per_side=args.points_per_side, **thresholds)
    attempt("reference", lambda: run_reference_flow(sam, amg, images, coarse_maps, match_config, clock,
                                                     args.reference_max_s, deadline), min_left_s=30)
    if args.sam2 != "none":
        try:
            sam2 = build_sam(args.sam2, device=device, seed=0).requires_grad_(False)
        except ImportError as e:  # the sam2 package is an optional install
            report["skipped"]["sam2"] = f"{e}; install it as the README's set-up does"
            print(f"sam2 flows: skipped ({report['skipped']['sam2']})", flush=True)
        else:
            attempt_sam2(args, sam2, gtformer, config, thresholds, images, probs, coarse_maps, clock, deadline, attempt)
    if args.same_answer_images > 0:
        attempt("same_answer", lambda: run_same_answer(args, json_path.with_name(json_path.stem + "_same_answer.json")),
                min_left_s=60)
    if not args.no_compile:
        for dtype in ("bfloat16", "float32"):
            flow = model.with_settings(candidates=replace(config, dtype=dtype, compile=True))
            attempt(f"ours_{'bf16' if dtype == 'bfloat16' else 'fp32'}_compile",
                    lambda flow=flow: run_ours(flow, images, probs, coarse_maps, args.batch_size, clock, deadline),
                    min_left_s=90)

    summarize(report)
    write()
    print(f"wrote {json_path} ({report['elapsed_s']:.0f} s)", flush=True)
    return 1 if report["errors"] else 0


def attempt_sam2(args, sam2, gtformer, config: CandidateConfig, thresholds: dict, images, probs, coarse_maps,
                 clock: Clock, deadline: float, attempt) -> None:
    """The sam2_* flows: SAM 2.1 (random weights) through our ``localize_batch`` and through
    ``SAM2AutomaticMaskGenerator``, on the same images, grid and filters as the SAM v1 flows."""
    device = clock.device
    model = Pro2SAM(gtformer, sam2, candidates=config, device=device)
    for dtype in ("bfloat16", "float32") if device.type == "cuda" else ("float32",):
        flow = model.with_settings(candidates=replace(config, dtype=dtype))
        attempt(f"sam2_ours_{'bf16' if dtype == 'bfloat16' else 'fp32'}",
                lambda flow=flow: run_ours(flow, images, probs, coarse_maps, args.batch_size, clock, deadline),
                min_left_s=30)
    amg = dict(points_per_side=args.points_per_side, **thresholds)
    attempt("sam2_reference", lambda: run_reference_flow(sam2, amg, images, coarse_maps, model.match_config, clock,
                                                          args.sam2_reference_max_s, deadline), min_left_s=30)


def summarize(report: dict) -> None:
    """Speed-ups against the reference, GPU-hours per million images, the target."""
    flows = report["flows"]
    sam_flows = {k: v for k, v in flows.items() if "images_per_s" in v and k != "gtformer"}
    # each SAM's flows against its own reference flow: SAM v1's (reference), SAM 2's (sam2_reference)
    speedups = {}
    for prefix, reference in (("", sam_flows.get("reference")), ("sam2_", sam_flows.get("sam2_reference"))):
        if reference:
            speedups.update({k: v["images_per_s"] / reference["images_per_s"] for k, v in sam_flows.items()
                             if k.startswith(prefix + "ours")})
    if speedups:
        report["speedup_vs_reference"] = speedups
    # SAM stage alone, and with GTFormer's time added (the whole model, one device).
    gtformer = flows.get("gtformer")
    hours = {}
    for k, v in sam_flows.items():
        per_image = v["s_per_image"] + (gtformer["seconds"] / gtformer["images"] if gtformer else 0.0)
        hours[k] = dict(sam_stage=1e6 / v["images_per_s"] / 3600, with_gtformer=1e6 * per_image / 3600)
    report["device_hours_per_million_images"] = hours
    ours = {k: v["images_per_s"] for k, v in sam_flows.items() if k.startswith(("ours", "sam2_ours"))}
    if ours:
        best = max(ours, key=ours.get)
        report["target"] = dict(images_per_s=TARGET_IMAGES_PER_S, best_flow=best, best_images_per_s=ours[best],
                                met=bool(ours[best] >= TARGET_IMAGES_PER_S and not report["dry_run"]),
                                note="same-mask rate in that precision: flows.same_answer")


if __name__ == "__main__":
    sys.exit(main())
