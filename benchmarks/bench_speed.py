"""Per-image speed of Pro2SAM's SAM stage, side by side: the authors' flow against ours; and
whether ours picks the same mask as theirs with trained models (``--shipped``).

Timing (default). Seven flows run on the same SAM weights and the same images, interleaved per
image (the order rotates from image to image and repeat to repeat) so that machine noise hits all
of them alike:

    (a) reference  ``SamAutomaticMaskGenerator`` (32x32 grid, official decoder, full-resolution
                   masks, RLE round trip) on segment_anything's own model code, float32, then
                   the authors' matching of every mask against the coarse map
                   (``pro2sam.matching.match_masks`` on the full-resolution masks)
    (b) exact      ``GridCandidateGenerator(mode="exact")``: filters on full-resolution masks
    (c) fast       ``GridCandidateGenerator(mode="fast")``: decodes only the embedding cells over
                   the image, filters and matches SAM's low-res logits, upsamples only the
                   near-best candidates and decides among them as on full-resolution masks
                   (``match_at_full_resolution``, as ``Pro2SAM.choose``)
    (d) fast+prune (c) with ``prune_with_coarse_map=True``: grid points outside the dilated
                   coarse foreground are never decoded
    (f) fast bf16  (c) with ``dtype="bfloat16"`` (SAM under bfloat16 autocast)
    (e) encoder    SAM's image encoder alone, segment_anything's code (preprocessing included):
                   the floor of (a)
    (g) encoder    the same through ``SdpaAttention`` (what (b)-(d) run; (f) runs it in bfloat16)

(b)-(g) run SAM as ``build_sam`` builds it for inference: image-encoder attention through
``F.scaled_dot_product_attention`` (:class:`pro2sam.sam.SdpaAttention`); (a) and (e) run the
unchanged segment_anything modules, as a user of ``SamAutomaticMaskGenerator`` does.

Every flow encodes each image once, as in real use, and ends with the chosen mask at full
resolution and its box (``boxed_mask``); stages are timed separately (embed, decode, filter, match
(ours: with the upsampling of the near-best candidates), finish = the winner's box). The script prints seconds per image and per
stage, milliseconds per decoded prompt, candidate counts, whether (b), (c), (d) and (f) chose the
same mask as (a) (mask IoU, box equality) and the speed-ups against (a), with the target
(a)/(c) >= 3.

Inputs are generated, deterministic scenes: one bright shape on a textured background, at a few
sizes (480x640, 512x512, 600x400, ...). GTFormer is not run. Its coarse map is **planted**: the
object's true mask area-averaged to 14x14, standing for the map of a trained GTFormer (matching
and pruning depend on it; a real map is blurrier, so pruning keeps somewhat more points).

SAM 2.1 (``--sam sam2.1_hiera_*``, the ``sam2`` package): (a) is ``SAM2AutomaticMaskGenerator``
(its own image transforms, decoder and full-resolution masks), (b)-(d), (f) our generator on the
same model through :mod:`pro2sam.segmenters`, (e) the image encoder with SAM 2's transforms
(``SAM2ImagePredictor.set_image``'s work; (g) is the same and is left out).

Without ``--sam-checkpoint`` SAM has random weights (said in the output). Network speed does not
depend on the weights, but the number of candidates (hence filter and match time) does: random
decoders are adjusted as ``build_sam`` adjusts the tiny one (``_make_random_masks_coherent``) so
masks follow image content, and the candidate filters are off by default (the official 0.88 / 0.95
keep nothing; a random SAM's masks are mostly empty or whole-frame, so with filters off hundreds
of mostly empty masks survive NMS, with any filter on one or two). The same thresholds go to every
flow and are printed.

Same answers (``--shipped``): the models shipped with the package (the SAM and GTFormer trained on
synthetic scenes, :mod:`pro2sam.shipped`) on scenes of the synthetic test split (real candidates,
real coarse maps, at the shipped SAM's own filter thresholds). For each image, the reference flow
(a) against ours as the labeling actor runs it (``Pro2SAM.localize_batch``, fast path, batches of
``--batch-size``) in float32, in bfloat16, with the image encoder only in bfloat16
(``dtype="bfloat16-encoder"``) or in float16 (``"float16-encoder"``; ``--variants`` picks
some): the chosen masks are "the same" at mask IoU >= 0.95
(both falling back to the coarse map counts as the same). Target: >= 98 % the same.

    python benchmarks/bench_speed.py                                  # tiny SAM, 3 images, CPU
    python benchmarks/bench_speed.py --sam vit_b --images 1 --warmup 0 --threads 2
    python benchmarks/bench_speed.py --shipped --images 100 --threads 2
    python benchmarks/bench_speed.py --sam sam2.1_hiera_tiny --images 1 --warmup 0 --threads 1
    python benchmarks/bench_speed.py --sam vit_h --sam-checkpoint sam_vit_h_4b8939.pth \\
        --pred-iou-thresh 0.88 --stability-score-thresh 0.95 --stability-score-offset 1.0 \\
        --device cuda --images 20 --json speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
from dataclasses import asdict, replace

import cv2
import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.transforms import ResizeLongestSide

from pro2sam.candidates import CandidateConfig, GridCandidateGenerator
from pro2sam.grid_decoder import GridDecoder
from pro2sam.matching import MatchConfig, boxed_mask, coarse_fallback, match_at_full_resolution, match_masks
from pro2sam.sam import SAM_VARIANTS, _make_random_masks_coherent, build_sam, is_sam2, use_sdpa_attention
from pro2sam.segmenters import segmenter_for

FLOWS = {
    "a": "reference (SamAutomaticMaskGenerator + matching)",
    "b": "ours, exact",
    "c": "ours, fast",
    "d": "ours, fast + grid pruning",
    "f": "ours, fast, bfloat16",
    "e": "image encoder alone, segment_anything",
    "g": "image encoder alone, SDPA",
}
# --shipped: our flows, each against the reference (every grid point decoded, as the reference
# does, in each precision; then the package's default, which prunes the grid by the coarse map: a
# different candidate set by design).
SHIPPED_VARIANTS = {
    "float32": dict(dtype="float32", prune_with_coarse_map=False),
    "bfloat16": dict(dtype="bfloat16", prune_with_coarse_map=False),
    "bfloat16-encoder": dict(dtype="bfloat16-encoder", prune_with_coarse_map=False),
    "float16-encoder": dict(dtype="float16-encoder", prune_with_coarse_map=False),
    "float32, grid pruning (default)": dict(dtype="float32", prune_with_coarse_map=True),
}
SAME_MASK_IOU = 0.95  # chosen masks at least this close count as the same answer
STAGES = ("embed", "decode", "filter", "match", "finish")
IMAGE_SIZES = [(480, 640), (512, 512), (600, 400), (375, 500), (640, 480)]
COARSE_GRID = 14  # GTFormer's 14x14 patch grid (224 / 16)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def make_scene(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A bright shape on a textured background: (H, W, 3) uint8 RGB and its (H, W) bool mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    blotches = cv2.resize(rng.normal(0, 25, (6, 8, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    fx, fy = rng.uniform(0.02, 0.08, 2)
    stripes = 18 * np.sin(2 * np.pi * (fx * xx + fy * yy))[..., None] * rng.uniform(0.5, 1.0, 3)
    background = rng.uniform(50, 110, 3) + blotches + stripes + rng.normal(0, 8, (h, w, 3))

    mask = np.zeros((h, w), np.uint8)
    side = min(h, w)
    cx, cy = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.35, 0.65)
    r = side * rng.uniform(0.18, 0.3)
    kind = seed % 3
    if kind == 0:
        cv2.ellipse(mask, (int(cx), int(cy)), (int(r * 1.3), int(r * 0.8)), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    else:
        n = 5 if kind == 1 else 7
        angles = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False) + rng.uniform(0, np.pi)
        radii = np.where(np.arange(2 * n) % 2 == 0, r, r * (0.45 if kind == 1 else 0.8))
        polygon = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
        cv2.fillPoly(mask, [polygon.round().astype(np.int32)], 1)
    mask = mask.astype(bool)
    shading = 1.0 - 0.25 * ((yy - cy) / max(r, 1))[..., None]
    colour = rng.uniform(190, 255, 3) * shading + rng.normal(0, 4, (h, w, 3))
    image = np.where(mask[..., None], colour, background)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def planted_coarse_map(mask: np.ndarray) -> np.ndarray:
    """(14, 14) float32 in [0, 1]: the fraction of each cell the object covers. Stands for a
    trained GTFormer's coarse map M_b; matching binarises it at > 0.2."""
    return cv2.resize(mask.astype(np.float32), (COARSE_GRID, COARSE_GRID), interpolation=cv2.INTER_AREA)


# --------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------


class Clock:
    """Wall-clock seconds that wait for the device before reading the time."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


@contextlib.contextmanager
def timed_modules(modules, clock: Clock, totals: dict[str, float], key: str):
    """Add the forward time of ``modules`` to ``totals[key]`` while the context is open."""
    handles, starts = [], {}

    def pre(module, args):
        starts[id(module)] = clock()

    def post(module, args, output):
        totals[key] += clock() - starts.pop(id(module))

    for m in modules:
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------
# The flows
# --------------------------------------------------------------------------------------------


def finish(match, masks_full_res, coarse_map, image_size, match_config):
    """The chosen (H, W) mask and its box, or the coarse-map fallback (as ``Pro2SAM.localize``)."""
    boxed = None
    if match.index is not None:
        boxed = boxed_mask(masks_full_res(match.index), match_config.min_component_area)
    if boxed is None:
        mask, box = coarse_fallback(coarse_map, image_size, match_config.fallback_threshold)
        return mask, box, True
    return *boxed, False


def run_reference(sam, amg_kwargs, image, coarse_map, match_config, clock, *, relax_filters_when_empty=False):
    """The reference flow on one image: the official generator, then our matching on its masks.
    With ``relax_filters_when_empty``, an image none of whose masks passes the predicted-IoU and
    stability filters is generated again with both filters off (what
    ``CandidateConfig.relax_filters_when_empty`` asks of our generator)."""
    times = dict.fromkeys(STAGES, 0.0)
    if hasattr(sam, "sam_mask_decoder"):  # SAM 2: its own generator, on its own modules
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        generator = SAM2AutomaticMaskGenerator(sam, output_mode="binary_mask", **amg_kwargs)
        decoder_modules = [sam.sam_prompt_encoder, sam.sam_mask_decoder]
    else:
        generator = SamAutomaticMaskGenerator(sam, output_mode="binary_mask", **amg_kwargs)
        decoder_modules = [sam.prompt_encoder, sam.mask_decoder]
    set_image = generator.predictor.set_image

    def timed_set_image(*args, **kwargs):
        t = clock()
        set_image(*args, **kwargs)
        times["embed"] += clock() - t

    generator.predictor.set_image = timed_set_image
    t0 = clock()
    with timed_modules(decoder_modules, clock, times, "decode"):
        anns = generator.generate(image)
        if not anns and relax_filters_when_empty:
            generator.pred_iou_thresh = generator.stability_score_thresh = 0.0
            anns = generator.generate(image)
    t1 = clock()
    times["filter"] = (t1 - t0) - times["embed"] - times["decode"]
    if anns:
        masks = np.stack([a["segmentation"] for a in anns])
        pred_ious = np.array([a["predicted_iou"] for a in anns], np.float32)
    else:
        masks, pred_ious = np.zeros((0, *image.shape[:2]), bool), np.zeros(0, np.float32)
    match = match_masks(coarse_map, masks, pred_ious, match_config)
    t2 = clock()
    mask, box, fallback = finish(match, lambda i: masks[i], coarse_map, image.shape[:2], match_config)
    t3 = clock()
    times.update(match=t2 - t1, finish=t3 - t2)
    prompts = amg_kwargs["points_per_side"] ** 2
    return dict(times=times, total=t3 - t0, prompts=prompts, candidates=len(anns), mask=mask, box=box,
                fallback=fallback, match_score=match.match_score)


def run_ours(generator, image, coarse_map, match_config, clock):
    t0 = clock()
    cands = generator.generate(image, coarse_map=coarse_map)
    t1 = clock()
    # As Pro2SAM.choose decides: the fast path's near-best candidates rescored at full resolution.
    if cands.mode == "fast":
        match, chosen = match_at_full_resolution(coarse_map, cands.masks, cands.pred_ious, cands.full_resolution_mask,
                                                 match_config)
    else:
        match = match_masks(coarse_map, cands.masks, cands.pred_ious, match_config)
        chosen = cands.masks[match.index] if match.index is not None else None
    t2 = clock()
    mask, box, fallback = finish(match, lambda i: chosen, coarse_map, image.shape[:2], match_config)
    t3 = clock()
    times = {**{k: cands.timings[k] for k in ("embed", "decode")}, "filter": (t1 - t0) - cands.timings["embed"]
             - cands.timings["decode"], "match": t2 - t1, "finish": t3 - t2}
    return dict(times=times, total=t3 - t0, prompts=cands.num_grid_points, candidates=len(cands), mask=mask,
                box=box, fallback=fallback, match_score=match.match_score)


def run_encoder(sam, image, clock):
    t0 = clock()
    if hasattr(sam, "sam_mask_decoder"):  # SAM 2: its transforms and features (pro2sam.segmenters)
        segmenter = segmenter_for(sam)
        with torch.inference_mode():
            segmenter.encode([segmenter.prepare(image, image.shape[:2])[0]])
    else:
        resized = ResizeLongestSide(sam.image_encoder.img_size).apply_image(image)
        x = torch.as_tensor(resized, device=sam.device).permute(2, 0, 1).contiguous()[None]
        with torch.inference_mode():
            sam.image_encoder(sam.preprocess(x))
    t1 = clock()
    return dict(times={**dict.fromkeys(STAGES, 0.0), "embed": t1 - t0}, total=t1 - t0, prompts=0, candidates=0,
                mask=None, box=None, fallback=False, match_score=float("nan"))


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def decoder_flops(sam, image, prompts: int = 64) -> dict[str, float]:
    """GFLOP per prompt of SAM's own decoder and of GridDecoder (image-shared work included)."""
    from torch.utils.flop_counter import FlopCounterMode

    segmenter = segmenter_for(sam)
    with torch.inference_mode():
        embedding = segmenter.encode([segmenter.prepare(image, image.shape[:2])[0]])[0]
    side = int(round(prompts**0.5))
    xs = (torch.arange(side, device=sam.device) + 0.5) * segmenter.input_size / side
    coords = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 1, 2)
    labels = torch.ones(len(coords), 1, dtype=torch.int, device=sam.device)
    out = {}
    for name, fast in (("official", False), ("grid_decoder", True)):
        decoder = GridDecoder(sam, fast=fast)
        with FlopCounterMode(display=False) as counter:
            decoder.set_image_embedding(embedding.embedding, embedding.high_res)
            shared = counter.get_total_flops()
            decoder.decode(coords, labels, multimask_output=True)
        out[name] = dict(per_prompt=(counter.get_total_flops() - shared) / len(coords) / 1e9,
                         per_image=shared / 1e9)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sam", choices=["tiny", "vit_b", "vit_l", "vit_h", *(v for v in SAM_VARIANTS if is_sam2(v))],
                        default="tiny")
    parser.add_argument("--sam-checkpoint", help="SAM state dict; random weights without it")
    parser.add_argument("--no-verify", action="store_true", help="skip the official checkpoint's SHA-256 check")
    parser.add_argument("--shipped", action="store_true",
                        help="same-answer check with the shipped trained SAM and GTFormer on synthetic test scenes")
    parser.add_argument("--images", type=int, default=None, help="images (default: 3; 100 with --shipped)")
    parser.add_argument("--batch-size", type=int, default=8, help="--shipped: images per localize_batch")
    parser.add_argument("--variants", nargs="+", choices=list(SHIPPED_VARIANTS), default=list(SHIPPED_VARIANTS),
                        metavar="NAME", help=f"--shipped: our flows to compare (default: all of {list(SHIPPED_VARIANTS)})")
    parser.add_argument("--flows", default="".join(FLOWS), help="which flows to time (default %(default)s)")
    parser.add_argument("--points-per-side", type=int, default=None,
                        help="default 32; with --shipped, the settings' or the shipped SAM's own")
    parser.add_argument("--settings", help="--shipped: a settings file of `pro2sam tune` ('shipped': the package's); "
                        "default: the package's defaults for the shipped SAM")
    parser.add_argument("--points-per-batch", type=int, default=256, help="ours, at most; the reference keeps its 64")
    parser.add_argument("--memory-budget-mb", type=int, default=None, help="ours (CandidateConfig.memory_budget_mb)")
    parser.add_argument("--pred-iou-thresh", type=float, default=None, help="default: see THRESHOLDS")
    parser.add_argument("--stability-score-thresh", type=float, default=None)
    parser.add_argument("--stability-score-offset", type=float, default=None)
    parser.add_argument("--box-nms-thresh", type=float, default=0.7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="ours through torch.compile (cold start in warmup)")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds over all images (median taken)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of every flow (4x4 grid, image 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-flops", action="store_true", help="skip counting decoder FLOPs")
    parser.add_argument("--json", help="write every number to this file")
    args = parser.parse_args(argv)
    if args.images is None:
        args.images = 100 if args.shipped else 3
    if args.points_per_side is None and not args.shipped:
        args.points_per_side = 32
    if args.settings and not args.shipped:
        parser.error("--settings goes with --shipped")
    unknown = set(args.flows) - set(FLOWS)
    if unknown or "a" not in args.flows and not args.shipped:
        parser.error(f"--flows: letters of {''.join(FLOWS)}, with a (the reference); got {args.flows!r}")
    if is_sam2(args.sam):  # SAM 2's encoder has one implementation: (g) would be (e) again
        args.flows = args.flows.replace("g", "")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.shipped:
        shipped_agreement(args)
    else:
        timing(args)


def describe_machine(device: torch.device) -> str:
    return (f"device {device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} CPU threads")


def timing(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    clock = Clock(device)

    # Trained weights take the official thresholds. A random SAM's masks are mostly empty or cover
    # the whole frame (NMS then keeps one or two when any filter is on), so by default its filters
    # are off: every mask reaches NMS and the empty ones survive it, the heavy end for the
    # reference's full-resolution and RLE work. --pred-iou-thresh 0.5 is a lighter setting.
    trained = args.sam_checkpoint is not None
    defaults = (0.88, 0.95, 1.0) if trained else (0.0, 0.0, 1.0)
    thresholds = dict(
        pred_iou_thresh=defaults[0] if args.pred_iou_thresh is None else args.pred_iou_thresh,
        stability_score_thresh=defaults[1] if args.stability_score_thresh is None else args.stability_score_thresh,
        stability_score_offset=defaults[2] if args.stability_score_offset is None else args.stability_score_offset,
        box_nms_thresh=args.box_nms_thresh,
    )

    # The reference runs segment_anything's modules as they are; ours, SAM as build_sam builds it
    # for inference (SDPA attention in the image encoder), on the same weights.
    sam = build_sam(args.sam, args.sam_checkpoint, verify=not args.no_verify, device=device, seed=0, sdpa=False)
    sam.requires_grad_(False)  # frozen; FlopCounterMode's module tracker also needs it
    if is_sam2(args.sam):  # one model for both (its attention is SDPA already); random weights as drawn
        ours_sam = sam
    else:
        if not trained and args.sam != "tiny":  # build_sam does this for tiny already
            _make_random_masks_coherent(sam)
        ours_sam = use_sdpa_attention(copy.deepcopy(sam))

    match_config = MatchConfig()
    pps = args.points_per_side
    # Grid pruning (on by default since the quality benchmark) is flow (d) only: (b), (c), (f)
    # decode every grid point, as the reference does.
    ours_config = CandidateConfig(points_per_side=pps, points_per_batch=args.points_per_batch, prune_with_coarse_map=False,
                                  memory_budget_mb=args.memory_budget_mb, compile=args.compile, **thresholds)
    specs = {"b": dict(mode="exact"), "c": dict(mode="fast"), "d": dict(mode="fast", prune_with_coarse_map=True),
             "f": dict(mode="fast", dtype="bfloat16")}

    def flows(points_per_side: int):
        amg = dict(points_per_side=points_per_side, **thresholds)
        ours = {k: GridCandidateGenerator(ours_sam, replace(ours_config, points_per_side=points_per_side, **spec))
                for k, spec in specs.items() if k in args.flows}
        runs = {
            "a": lambda img, cm: run_reference(sam, amg, img, cm, match_config, clock),
            **{k: (lambda img, cm, g=g: run_ours(g, img, cm, match_config, clock)) for k, g in ours.items()},
            "e": lambda img, cm: run_encoder(sam, img, clock),
            "g": lambda img, cm: run_encoder(ours_sam, img, clock),
        }
        return {k: v for k, v in runs.items() if k in args.flows}

    scenes = [make_scene(*IMAGE_SIZES[i % len(IMAGE_SIZES)], seed=i) for i in range(args.images)]
    coarse_maps = [planted_coarse_map(mask) for _, mask in scenes]

    n_params = sum(p.numel() for p in sam.parameters())
    print(f"SAM {args.sam} ({n_params / 1e6:.2f} M parameters), "
          + (f"weights {args.sam_checkpoint}" if trained else
             "RANDOM weights (seed 0" + (", as drawn" if is_sam2(args.sam) else
                                         ", decoder made coherent as build_sam does for tiny" if args.sam != "tiny"
                                         else ", tiny's coherent random init") + "): speed only, masks mean nothing"))
    print(describe_machine(device))
    print(f"{args.images} generated image(s) {[s[0].shape[:2] for s in scenes]}, coarse map planted from the true "
          f"object mask ({COARSE_GRID}x{COARSE_GRID} area fractions, stands for a trained GTFormer)")
    probe = GridCandidateGenerator(ours_sam, ours_config)
    print(f"grid {pps}x{pps} = {pps * pps} points; thresholds (every flow): {thresholds}; prompts per decoder pass "
          f"ours {probe.decoder.batch_size} (points_per_batch {args.points_per_batch}, memory budget "
          f"{probe._budget >> 20} MB), reference 64; compile {args.compile}; repeats {args.repeats}, warmup {args.warmup}")
    print(f"matching: {asdict(match_config)}")
    print()

    cold = {}
    for _ in range(args.warmup):
        for key, run in flows(4).items():
            t = time.perf_counter()
            run(*scenes[0][:1], coarse_maps[0])
            cold.setdefault(key, time.perf_counter() - t)
    if args.compile and cold:
        print("first (warm-up) call per flow, s (compile's cold start): "
              + ", ".join(f"({k}) {v:.1f}" for k, v in cold.items()))

    runs = flows(pps)
    keys = [k for k in FLOWS if k in runs]
    records: dict[str, list[list[dict]]] = {k: [[] for _ in scenes] for k in keys}
    for rep in range(args.repeats):
        for i, ((image, _), coarse_map) in enumerate(zip(scenes, coarse_maps)):
            shift = (i + rep) % len(keys)
            for key in keys[shift:] + keys[:shift]:
                rec = runs[key](image, coarse_map)
                records[key][i].append(rec)
                print(f"  rep {rep} image {i} {image.shape[:2]} ({key}) {rec['total']:8.3f} s, "
                      f"{rec['candidates']:4d} candidates", flush=True)
    print()

    # Median over repeats per image, then mean over images.
    def per_image(key: str, get) -> list[float]:
        return [statistics.median(get(r) for r in recs) for recs in records[key]]

    summary = {}
    for key in keys:
        s = {"total": float(np.mean(per_image(key, lambda r: r["total"])))}
        for stage in STAGES:
            s[stage] = float(np.mean(per_image(key, lambda r, st=stage: r["times"][st])))
        s["prompts"] = float(np.mean(per_image(key, lambda r: r["prompts"])))
        s["candidates"] = float(np.mean(per_image(key, lambda r: r["candidates"])))
        s["decode_ms_per_prompt"] = 1e3 * s["decode"] / s["prompts"] if s["prompts"] else float("nan")
        s["after_embed_ms_per_prompt"] = 1e3 * (s["total"] - s["embed"]) / s["prompts"] if s["prompts"] else float("nan")
        summary[key] = s

    header = f"{'flow':36s} {'s/image':>8s} " + " ".join(f"{s:>7s}" for s in STAGES) + \
        f" {'prompts':>7s} {'ms/prompt':>9s} {'ms/prompt':>9s} {'cands':>6s} {'(a)/x':>6s}"
    print("seconds per image (mean over images of the median over repeats); ms/prompt: decode only, all but embed")
    print(header)
    for key in keys:
        s = summary[key]
        print(f"({key}) {FLOWS[key][:32]:32s} {s['total']:8.3f} " + " ".join(f"{s[st]:7.3f}" for st in STAGES)
              + f" {s['prompts']:7.0f} {s['decode_ms_per_prompt']:9.3f} {s['after_embed_ms_per_prompt']:9.3f}"
              f" {s['candidates']:6.1f} {summary['a']['total'] / s['total']:6.2f}")
    print()

    # Same answer as the reference? Compared on the last repeat (outputs do not depend on it).
    agreement = {}
    compared = [k for k in "bcdf" if k in keys]
    print("chosen mask vs (a), per image: mask IoU / same box / fallback used")
    for key in compared:
        rows = []
        for i in range(len(scenes)):
            ref, ours = records["a"][i][-1], records[key][i][-1]
            rows.append(dict(mask_iou=mask_iou(ref["mask"], ours["mask"]), same_box=tuple(ref["box"]) == tuple(ours["box"]),
                             box_max_diff=int(np.abs(np.subtract(ref["box"], ours["box"])).max()),
                             fallback=(ref["fallback"], ours["fallback"])))
        agreement[key] = rows
        print(f"  ({key}) " + "  ".join(f"img{i}: {r['mask_iou']:.3f}/{'yes' if r['same_box'] else 'no'}"
                                        f"(max |dbox| {r['box_max_diff']})" + ("/fallback" if any(r['fallback']) else "")
                                        for i, r in enumerate(rows)))
    truth_iou = {k: [mask_iou(records[k][i][-1]["mask"], scenes[i][1]) for i in range(len(scenes))]
                 for k in ["a", *compared]}
    print("  chosen mask vs true object mask (meaningful with trained weights only): "
          + ", ".join(f"({k}) {np.mean(v):.3f}" for k, v in truth_iou.items()))
    print()

    ratios = {f"a/{k}": summary["a"]["total"] / summary[k]["total"] for k in keys if k != "a"}
    per_image_ratios = {f"a/{k}": [ra / rk for ra, rk in zip(per_image("a", lambda r: r["total"]),
                                                              per_image(k, lambda r: r["total"]))] for k in compared}
    print("speed-ups (mean s/image ratio; per image in brackets):")
    for k in compared:
        print(f"  (a)/({k}) = {ratios[f'a/{k}']:.2f}x  [" + ", ".join(f"{v:.2f}" for v in per_image_ratios[f"a/{k}"]) + "]")
    for enc in "eg":
        if enc in keys:
            print(f"  encoder ({enc}) share of " + ", ".join(f"({k}): {summary[enc]['total'] / summary[k]['total']:.1%}"
                                                          for k in ["a", *compared]))
    targets = {}
    for k in "cf":
        if k in keys:
            same = all(r["mask_iou"] >= SAME_MASK_IOU for r in agreement[k])
            targets[f"a/{k} >= 3" + (" (chosen masks: see --shipped for the same-answer rate)" if not trained else
                                     " with the same chosen mask")] = bool(ratios[f"a/{k}"] >= 3.0 and (same or not trained))
    for name, ok in targets.items():
        print(f"  target {name}: {'MET' if ok else 'NOT MET'}")

    flops = None
    if not args.no_flops:
        flops = decoder_flops(ours_sam, scenes[0][0])
        print("decoder GFLOP per prompt (3 masks) / per image (shared work): "
              + ", ".join(f"{n} {f['per_prompt']:.4f} / {f['per_image']:.3f}" for n, f in flops.items()))

    if args.json:
        out = dict(
            sam=args.sam, checkpoint=args.sam_checkpoint, random_weights=not trained, device=str(device),
            threads=torch.get_num_threads(), images=[list(s[0].shape[:2]) for s in scenes],
            points_per_side=pps, thresholds=thresholds, repeats=args.repeats, compile=args.compile, cold_start_s=cold,
            summary=summary, ratios=ratios, per_image_ratios=per_image_ratios, agreement=agreement,
            truth_iou=truth_iou, targets=targets, decoder_gflops=flops,
            runs={k: [[{kk: vv for kk, vv in r.items() if kk not in ("mask",)} | {"box": list(map(int, r["box"]))
                        if r["box"] is not None else None} for r in recs] for recs in v] for k, v in records.items()},
        )
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=float)
        print(f"wrote {args.json}")


def shipped_agreement(args: argparse.Namespace) -> None:
    """Reference flow against ours (float32 and bfloat16) with the shipped trained models."""
    from pro2sam import shipped
    from pro2sam.model import Pro2SAM
    from pro2sam.synthetic import make_scene

    from pro2sam.tuning import load_settings

    device = torch.device(args.device)
    clock = Clock(device)
    overrides = dict(pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
                     stability_score_offset=args.stability_score_offset, box_nms_thresh=args.box_nms_thresh,
                     points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
                     memory_budget_mb=args.memory_budget_mb, compile=args.compile)
    if args.settings:  # the tuned settings (candidates and matching), options given here first
        settings = load_settings(args.settings)
        config = settings.candidate_config(shipped.SAM_VARIANT, **overrides)
        matching = settings.match_config()
        print(f"settings: {settings.source} (sha256 {settings.sha256[:12]})")
    else:  # the package's defaults for the shipped SAM
        config, matching = CandidateConfig.for_variant(shipped.SAM_VARIANT, **overrides), None
    pps = config.points_per_side
    model = Pro2SAM.from_checkpoints(shipped.gtformer_dir(), sam=shipped.SAM_VARIANT, sam_checkpoint=shipped.sam_checkpoint(),
                                     device=device, candidates=config, matching=matching)
    reference_sam = build_sam(shipped.SAM_VARIANT, shipped.sam_checkpoint(), device=device, sdpa=False)
    amg = dict(points_per_side=pps, pred_iou_thresh=config.pred_iou_thresh,
               stability_score_thresh=config.stability_score_thresh,
               stability_score_offset=config.stability_score_offset, box_nms_thresh=config.box_nms_thresh)
    match_config = model.match_config
    scenes = [make_scene(shipped.SYNTHETIC_SEED, "test", i) for i in range(args.images)]
    images = [s.image for s in scenes]
    print(f"shipped SAM ({shipped.SAM_VARIANT}) and GTFormer on {len(scenes)} synthetic test scenes "
          f"(seed {shipped.SYNTHETIC_SEED}), sizes {min(i.shape[0] for i in images)}..{max(i.shape[0] for i in images)}"
          f" x {min(i.shape[1] for i in images)}..{max(i.shape[1] for i in images)}")
    print(describe_machine(device))
    print(f"grid {pps}x{pps}; filters (every flow): {amg}"
          f"{', off again for an image none passes' if config.relax_filters_when_empty else ''}; matching: {asdict(match_config)}")
    print(f"same answer: chosen masks with IoU >= {SAME_MASK_IOU}")

    probs, maps = [], []
    for first in range(0, len(images), 32):
        p, m = model.classify(images[first : first + 32])
        probs += list(p)
        maps += list(m)

    t0 = clock()
    reference = []
    for i, (image, cm) in enumerate(zip(images, maps)):
        reference.append(run_reference(reference_sam, amg, image, cm, match_config, clock,
                                       relax_filters_when_empty=config.relax_filters_when_empty))
        if i % 10 == 9:
            print(f"  reference: {i + 1} images, {(clock() - t0) / (i + 1):.3f} s/image", flush=True)
    seconds = {"reference": (clock() - t0) / len(images)}
    ours = {}
    variants = {name: settings for name, settings in SHIPPED_VARIANTS.items() if name in args.variants}
    for dtype, settings in variants.items():
        flow = model.with_settings(candidates=replace(config, **settings))
        t0 = clock()
        results = []
        for first in range(0, len(images), args.batch_size):
            sl = slice(first, first + args.batch_size)
            results += flow.localize_batch(images[sl], probs[sl], maps[sl])
        seconds[dtype] = (clock() - t0) / len(images)
        ours[dtype] = results

    report = {"images": len(images), "points_per_side": pps, "filters": amg, "seconds_per_image": seconds,
              "same_mask_iou": SAME_MASK_IOU, "flows": {}}
    truth = [mask_iou(r["mask"], s.object_mask) for r, s in zip(reference, scenes)]
    print(f"\n(a) reference: {seconds['reference']:.3f} s/image, fallback {np.mean([r['fallback'] for r in reference]):.1%}, "
          f"mean IoU with the true object {np.mean(truth):.3f}")
    for dtype, results in ours.items():
        ious = [mask_iou(r["mask"], o.mask) for r, o in zip(reference, results)]
        same = [iou >= SAME_MASK_IOU for iou in ious]
        fallbacks = [o.box_source == "coarse_fallback" for o in results]
        truth = [mask_iou(o.mask, s.object_mask) for o, s in zip(results, scenes)]
        print(f"ours {dtype}: {seconds[dtype]:.3f} s/image ({seconds['reference'] / seconds[dtype]:.2f}x), "
              f"same answer {np.mean(same):.1%} ({sum(same)}/{len(same)}), fallback {np.mean(fallbacks):.1%}, "
              f"mean IoU with the true object {np.mean(truth):.3f}; target >= 98%: "
              f"{'MET' if np.mean(same) >= 0.98 else 'NOT MET'}")
        for i in np.flatnonzero(~np.array(same)):
            print(f"    image {i}: mask IoU {ious[i]:.3f}; reference {'fallback' if reference[i]['fallback'] else 'sam'} "
                  f"score {reference[i]['match_score']:.3f}, {reference[i]['candidates']} candidates; ours "
                  f"{results[i].box_source} score {results[i].match_score:.3f}, {results[i].num_candidates} candidates")
        report["flows"][dtype] = dict(same_rate=float(np.mean(same)), mask_iou=ious, fallback_rate=float(np.mean(fallbacks)),
                                      truth_iou=float(np.mean(truth)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=float)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
