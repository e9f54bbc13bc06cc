"""The ``pro2sam`` command: every subcommand and every option, a thin layer over the library and
the jobs.

Option defaults are read from the settings they fill (:class:`~pro2sam.candidates.CandidateConfig`,
:class:`~pro2sam.matching.MatchConfig`, the jobs' configs), so a default is declared once and the
help shows the true one. Every subcommand ends with one line on failure (``pro2sam CMD: error:
...``, exit status 2 for a bad option, input or checkpoint), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import MISSING, fields

__all__ = ["build_parser", "main", "parse_args"]

log = logging.getLogger("pro2sam")


def _defaults(cls) -> dict:
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


# ---------------------------------------------------------------- shared option groups


def _add_settings_option(p: argparse.ArgumentParser, *, confidence: bool = True, default: str | None = None) -> None:
    p.add_argument("--settings", metavar="FILE", default=default,
                   help="settings file of pro2sam tune (local or URI; 'shipped': those chosen for the shipped "
                   "models; 'none': the package's defaults): its SAM filters, pruning, grid, matching "
                   "rule and fallback threshold become the defaults (options given here still override them)"
                   + ("; its confidence calibration fills the rows' confidence unless --confidence-calibration "
                      "is given; the rows record its SHA-256 (settings_sha256)" if confidence else "")
                   + (f" (default: {default})" if default else ""))  # fmt: skip


# What --settings says to mean no file (the package's defaults), and demo's default: the settings
# pro2sam tune chose for the shipped models of its --regime (pro2sam.shipped.settings_file).
NO_SETTINGS = "none"
DEMO_SETTINGS = "the shipped models' for --regime"

# A settings file's values -> the options they are defaults of (dest, and how the value maps).
_SETTINGS_OPTIONS = {
    ("candidates", "points_per_side"): ("points_per_side", None),
    ("candidates", "mode"): ("mode", None),
    ("candidates", "pred_iou_thresh"): ("pred_iou_thresh", None),
    ("candidates", "stability_score_thresh"): ("stability_score_thresh", None),
    ("candidates", "prune_with_coarse_map"): ("prune", None),
    ("matching", "similarity"): ("similarity", None),
    ("matching", "coarse_threshold"): ("coarse_threshold", None),
    ("matching", "match_size"): ("match_size", None),
    ("matching", "min_component_area"): ("min_component_area", None),
    ("matching", "reject_full_frame"): ("keep_full_frame", lambda v: not v),
    ("matching", "fallback_threshold"): ("fallback_threshold", None),
    ("matching", "part_to_object"): ("part_to_object", None),
    ("matching", "containment"): ("containment", None),
    ("matching", "min_growth"): ("min_growth", None),
    ("matching", "agreement"): ("agreement", None),
    ("matching", "completion_size"): ("completion_size", None),
    ("matching", "container_to_object"): ("container_to_object", None),
    ("matching", "object_mass"): ("object_mass", None),
    ("matching", "support_contrast"): ("support_contrast", None),
    ("matching", "absorb_parts"): ("absorb_parts", None),
    ("matching", "absorb_contrast"): ("absorb_contrast", None),
    ("matching", "absorb_box_growth"): ("absorb_box_growth", None),
    ("matching", "absorb_area"): ("absorb_area", None),
}


def _settings_defaults(tuned, parser: argparse.ArgumentParser) -> dict:
    """The option defaults a settings file gives ``parser`` (only options it has)."""
    dests = {a.dest for a in parser._actions}
    values = {"candidates": tuned.candidates, "matching": tuned.matching}
    out = {}
    for (group, key), (dest, convert) in _SETTINGS_OPTIONS.items():
        if key in values[group] and dest in dests:
            out[dest] = convert(values[group][key]) if convert else values[group][key]
    return out


def _add_model_options(p: argparse.ArgumentParser) -> None:
    from ..sam import DEFAULT_SAM_VARIANT, SAM_VARIANTS

    g = p.add_argument_group("models")
    g.add_argument("--gtformer", required=True, help="GTFormer export folder (model.safetensors + config.json; local "
                   "or URI); 'shipped': the model in the package")  # fmt: skip
    g.add_argument("--sam", default=DEFAULT_SAM_VARIANT, help=f"SAM variant: {', '.join(SAM_VARIANTS)} (default %(default)s)")
    g.add_argument("--sam-checkpoint", help="SAM weights file (local or URI; official sam_vit_*.pth are checked by "
                   "SHA-256); default for --sam synthetic: the shipped one")  # fmt: skip
    g.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of official SAM files")


def _variant_default(name: str) -> str:
    """``CandidateConfig``'s default of a setting (a filter threshold, the grid), per SAM variant
    where they differ."""
    from ..candidates import CandidateConfig
    from ..sam import SAM_VARIANTS

    by_value: dict[float, list[str]] = {}
    for variant in SAM_VARIANTS:
        by_value.setdefault(getattr(CandidateConfig.for_variant(variant), name), []).append(variant)
    return "; ".join(f"{', '.join(v)}: {value:g}" for value, v in by_value.items())


def _add_candidate_options(p: argparse.ArgumentParser) -> None:
    from ..candidates import DEFAULT_MEMORY_BUDGET_MB, DTYPES, CandidateConfig

    d = _defaults(CandidateConfig)
    g = p.add_argument_group("SAM candidates (stage 2)")
    g.add_argument("--mode", choices=("fast", "exact"), default=d["mode"], help="candidate path (default %(default)s)")
    g.add_argument("--points-per-side", type=int, help=f"grid N x N (default: {_variant_default('points_per_side')})")
    g.add_argument("--prune", action=argparse.BooleanOptionalAction, default=d["prune_with_coarse_map"],
                   help="drop grid points outside the dilated coarse foreground (default %(default)s)")  # fmt: skip
    g.add_argument("--pred-iou-thresh", type=float,
                   help=f"SAM predicted-IoU filter (default: {_variant_default('pred_iou_thresh')})")  # fmt: skip
    g.add_argument("--stability-score-thresh", type=float,
                   help=f"SAM stability filter (default: {_variant_default('stability_score_thresh')})")  # fmt: skip
    g.add_argument("--relax-filters-when-empty", action=argparse.BooleanOptionalAction,
                   default=d["relax_filters_when_empty"],
                   help="when no mask of an image passes SAM's filters, decode its grid again with them off instead of "
                   "falling back to the coarse map's box (default %(default)s; pro2sam tune chooses it)")  # fmt: skip
    g.add_argument("--dtype", choices=sorted(DTYPES), default=d["dtype"],
                   help="SAM's networks under autocast in this dtype (bfloat16: GPUs of compute capability 8 and "
                   "up; *-encoder: the image encoder only, the decoder in float32; default %(default)s)")  # fmt: skip
    g.add_argument("--compile", action="store_true", default=d["compile"],
                   help="torch.compile SAM's image encoder and decoder pass (a cold start of minutes, then faster)")  # fmt: skip
    g.add_argument("--memory-budget-mb", type=int, default=d["memory_budget_mb"],
                   help="activation memory one batch of prompts may take on the device, MB (default: half the GPU's "
                   f"memory, {DEFAULT_MEMORY_BUDGET_MB} on a CPU)")  # fmt: skip


def _candidates(args: argparse.Namespace, sam: str):
    from ..candidates import CandidateConfig

    return CandidateConfig.for_variant(
        sam,
        mode=args.mode,
        points_per_side=args.points_per_side,
        prune_with_coarse_map=args.prune,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
        relax_filters_when_empty=args.relax_filters_when_empty,
        dtype=args.dtype,
        compile=args.compile,
        memory_budget_mb=args.memory_budget_mb,
    )


def _add_matching_options(p: argparse.ArgumentParser) -> None:
    from ..matching import SIMILARITIES, MatchConfig

    d = _defaults(MatchConfig)
    g = p.add_argument_group("mask matching (stage 3)")
    g.add_argument("--similarity", choices=sorted(SIMILARITIES), default=d["similarity"],
                   help="candidate vs coarse map (default %(default)s)")  # fmt: skip
    g.add_argument("--coarse-threshold", type=float, default=d["coarse_threshold"],
                   help="the coarse map is foreground above this (default %(default)s)")  # fmt: skip
    g.add_argument("--match-size", type=int, default=d["match_size"],
                   help="side of the grid masks are compared on (default: the coarse map's own)")  # fmt: skip
    g.add_argument("--min-component-area", type=float, default=d["min_component_area"],
                   help="smallest component a candidate needs and the chosen mask keeps, px at 224 (default %(default)s)")  # fmt: skip
    g.add_argument("--keep-full-frame", action="store_true", help="do not reject candidates spanning the whole image")
    g.add_argument("--fallback-threshold", type=float, default=d["fallback_threshold"],
                   help="threshold of the coarse-map box used when no candidate survives (default %(default)s)")  # fmt: skip
    g.add_argument("--part-to-object", action=argparse.BooleanOptionalAction, default=d["part_to_object"],
                   help="when the best match lies inside a larger candidate that still agrees with the map, take "
                   "that object (default %(default)s)")  # fmt: skip
    g.add_argument("--containment", type=float, default=d["containment"],
                   help="share of the best match inside the object (default %(default)s)")  # fmt: skip
    g.add_argument("--min-growth", type=float, default=d["min_growth"],
                   help="the object is at least this many times the best match's area (default %(default)s)")  # fmt: skip
    g.add_argument("--agreement", type=float, default=d["agreement"],
                   help="the object's similarity to the map, at least this share of the best match's (default %(default)s)")  # fmt: skip
    g.add_argument("--completion-size", type=int, default=d["completion_size"],
                   help="side of the square grid part-to-object compares candidates on (default: pixel by pixel)")  # fmt: skip
    g.add_argument("--container-to-object", action=argparse.BooleanOptionalAction, default=d["container_to_object"],
                   help="when the best match is a container (object + support) and a smaller candidate inside it keeps "
                   "the map's mass while the area it sheds is weakly lit, take that object; not with --part-to-object "
                   "(default %(default)s)")  # fmt: skip
    g.add_argument("--object-mass", type=float, default=d["object_mass"],
                   help="share of the map's mass over the best match that the object keeps (default %(default)s)")  # fmt: skip
    g.add_argument("--support-contrast", type=float, default=d["support_contrast"],
                   help="the shed area's mean map value, at most this times the object's (default %(default)s)")  # fmt: skip
    g.add_argument("--absorb-parts", action=argparse.BooleanOptionalAction, default=d["absorb_parts"],
                   help="the stored mask also takes the smaller candidates the map lights that lie in its box (a part "
                   "SAM split from the object) (default %(default)s)")  # fmt: skip
    g.add_argument("--absorb-contrast", type=float, default=d["absorb_contrast"],
                   help="a part's mean map value, at least this times the chosen mask's (default %(default)s)")  # fmt: skip
    g.add_argument("--absorb-box-growth", type=float, default=d["absorb_box_growth"],
                   help="the chosen box with a part's pixels, at most this times its area (default %(default)s)")  # fmt: skip
    g.add_argument("--absorb-area", type=float, default=d["absorb_area"],
                   help="a part's area, at most this share of the chosen mask's (default %(default)s)")  # fmt: skip


def _matching(args: argparse.Namespace):
    from ..matching import MatchConfig

    return MatchConfig(
        similarity=args.similarity,
        coarse_threshold=args.coarse_threshold,
        match_size=args.match_size,
        min_component_area=args.min_component_area,
        reject_full_frame=not args.keep_full_frame,
        fallback_threshold=args.fallback_threshold,
        part_to_object=args.part_to_object,
        containment=args.containment,
        min_growth=args.min_growth,
        agreement=args.agreement,
        completion_size=args.completion_size,
        container_to_object=args.container_to_object,
        object_mass=args.object_mass,
        support_contrast=args.support_contrast,
        absorb_parts=args.absorb_parts,
        absorb_contrast=args.absorb_contrast,
        absorb_box_growth=args.absorb_box_growth,
        absorb_area=args.absorb_area,
    )


def _add_labeling_options(p: argparse.ArgumentParser, *, confidence: bool = True) -> None:
    """Models, candidates, matching, the actors' resources and the read limits; with
    ``confidence``, the calibration file that fills the rows' confidence."""
    from ..pipeline.settings import ReadLimits, Resources

    _add_model_options(p)
    _add_candidate_options(p)
    _add_matching_options(p)
    r, lim = _defaults(Resources), _defaults(ReadLimits)
    g = p.add_argument_group("resources")
    g.add_argument("--actors", type=int, help="labeling actors (default: one per GPU of the cluster, else 1)")
    g.add_argument("--gpus-per-actor", type=float, help="GPUs per actor (default 1 on a GPU cluster, else 0)")
    g.add_argument("--cpus-per-actor", type=float,
                   help="CPUs per actor (default 1 with a GPU, else 2, or 1 where the cluster has fewer than 3 CPUs)")  # fmt: skip
    g.add_argument("--batch-size", type=int, default=r["batch_size"], help="images per model batch (default %(default)s)")
    g.add_argument("--ray-address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")
    g.add_argument("--wait-for-resources", type=float, default=r["wait_for_resources_s"], dest="wait_for_resources_s",
                   help="on a cluster, seconds to wait for the autoscaler to add the first actor's CPUs/GPUs "
                   "(default %(default)s)")  # fmt: skip
    g = p.add_argument_group("input limits (larger or slower inputs become error rows)")
    g.add_argument("--max-pixels", type=int, default=lim["max_pixels"], help="pixels per image (default %(default)s)")
    g.add_argument("--max-bytes", type=int, default=lim["max_bytes"], help="bytes per file (default %(default)s)")
    g.add_argument("--read-timeout", type=float, default=lim["read_timeout_s"], dest="read_timeout_s",
                   help="seconds one file's read may take (default %(default)s)")  # fmt: skip
    if confidence:
        p.add_argument("--confidence-calibration", metavar="FILE",
                       help="confidence.json of pro2sam evaluate (local or URI): every row gets a confidence")  # fmt: skip


def _labeling(args: argparse.Namespace):
    from ..pipeline.settings import LabelingSettings, ReadLimits, Resources
    from ..shipped import resolve_model_options

    gtformer, sam, sam_checkpoint = resolve_model_options(args.gtformer, args.sam, args.sam_checkpoint)
    return LabelingSettings(
        gtformer=gtformer,
        sam=sam,
        sam_checkpoint=sam_checkpoint,
        verify=not args.no_verify,
        candidates=_candidates(args, sam),
        matching=_matching(args),
        resources=Resources(
            actors=args.actors,
            gpus_per_actor=args.gpus_per_actor,
            cpus_per_actor=args.cpus_per_actor,
            batch_size=args.batch_size,
            ray_address=args.ray_address,
            wait_for_resources_s=args.wait_for_resources_s,
        ),
        limits=ReadLimits(max_pixels=args.max_pixels, max_bytes=args.max_bytes, read_timeout_s=args.read_timeout_s),
        confidence_calibration=getattr(args, "confidence_calibration", None),
        tuned=getattr(args, "tuned", None),
    )


# ---------------------------------------------------------------- running a subcommand


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The stop signals received during the running subcommand, first first.
_received: list[int] = []


def _stop_on_signals() -> None:
    """Make SIGINT and SIGTERM raise :class:`~pro2sam.pipeline.label_job.JobInterrupted`, and
    remember them: a library may turn the interrupt into an error of its own (Ray's start-up
    fails when the same Ctrl-C reached the processes it was starting)."""
    from ..pipeline.label_job import JobInterrupted

    def handler(signum, frame):
        _received.append(signum)
        raise JobInterrupted(signum)

    for signum in _STOP_SIGNALS:
        signal.signal(signum, handler)


def one_line(e: BaseException) -> str:
    """The useful line of an error, also when Ray wrapped it in a long remote traceback."""
    cause = e
    while getattr(cause, "cause", None) is not None or cause.__cause__ is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(cause).__name__
    return last if type(cause).__name__ in last else f"{type(cause).__name__}: {last}"


def _run(prog: str, work: Callable[[], int], *, resume_hint: str | None = None) -> int:
    """Run a subcommand: its exit status, or one line and 2 (bad input), 3 (a labeling run that
    could not write all its rows), 130/143 (stopped: SIGINT or Ctrl-C wherever it lands, also
    before the handlers are in place or inside Ray's start-up; SIGTERM, also inside Ray's
    start-up, whose handler exits with the signal's number), 1.

    The signal handlers the subcommand installs are put back when it returns."""
    from ..checkpoints import CheckpointError
    from ..pipeline.label_job import JobInterrupted
    from ..storage import StorageError

    def stopped(signum: int) -> int:
        name = signal.Signals(signum).name
        print(f"{prog}: stopped by {name}" + (f": {resume_hint}" if resume_hint else ""), file=sys.stderr, flush=True)
        return 128 + signum

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # asyncio logs the connection errors of aiohttp tasks nobody awaits (s3fs while object storage
    # is down) with a traceback each; the run reports what it could not do in its own lines.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    in_main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in _STOP_SIGNALS} if in_main else {}
    _received.clear()
    try:
        return work()
    except JobInterrupted as e:
        return stopped(e.signum)
    except KeyboardInterrupt:  # Python's own SIGINT handler, before ours is in place or after a library reset it
        return stopped(signal.SIGINT)
    except SystemExit as e:
        if e.code == signal.SIGTERM:  # Ray's driver handler while ray.init runs: sys.exit(SIGTERM)
            return stopped(signal.SIGTERM)
        raise
    except (StorageError, ValueError, CheckpointError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError) as e:  # fmt: skip
        if _received:
            return stopped(_received[0])
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return getattr(e, "exit_status", 2)  # 3: the run went on but did not write all its rows
    except Exception as e:  # a failure inside Ray: its last line, not 200 lines of remote traceback
        if _received:  # the signal made it (Ray's processes were stopped by the same Ctrl-C)
            return stopped(_received[0])
        log.debug("%s failed", prog, exc_info=True)
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 1
    finally:
        for signum, handler in handlers.items():
            if handler is not None:
                signal.signal(signum, handler)


# ---------------------------------------------------------------- subcommands


def cmd_predict(args: argparse.Namespace) -> int:
    from ..images import ImageDecodeError, to_rgb_array
    from ..labels import json_record
    from ..model import Pro2SAM
    from ..shipped import resolve_model_options

    def work() -> int:
        gtformer, sam, sam_checkpoint = resolve_model_options(args.gtformer, args.sam, args.sam_checkpoint)
        model = Pro2SAM.from_checkpoints(
            gtformer, sam=sam, sam_checkpoint=sam_checkpoint, verify=not args.no_verify, device=args.device,
            candidates=_candidates(args, sam), matching=_matching(args),
        )  # fmt: skip
        start = time.perf_counter()
        ok = failed = 0
        out = open(args.output, "w") if args.output != "-" else sys.stdout
        try:
            for path in args.images:
                try:
                    image = to_rgb_array(path)
                except (ImageDecodeError, OSError) as e:
                    out.write(json.dumps({"path": path, "status": "error", "error": str(e)}) + "\n")
                    failed += 1
                    continue
                (result,) = model.predict([image])
                out.write(json.dumps(json_record(path, result)) + "\n")
                out.flush()
                ok += 1
        finally:
            if out is not sys.stdout:
                out.close()
        print(f"{ok} ok, {failed} error, {time.perf_counter() - start:.1f} s -> {args.output}", file=sys.stderr)
        return 0 if ok or not failed else 1

    return _run("pro2sam predict", work)


def cmd_label(args: argparse.Namespace) -> int:
    from ..pipeline.label_job import RowsNotWritten, run_label_job
    from ..pipeline.settings import LabelJobConfig

    def work() -> int:
        cfg = LabelJobConfig(
            input=args.input,
            output=args.output,
            labeling=_labeling(args),
            overwrite=args.overwrite,
            force=args.force,
            retry_errors=args.retry_errors,
            relabel_changed=args.relabel_changed,
            shard_label=None if args.shard_label == "none" else args.shard_label,
            rows_per_file=args.rows_per_file,
            commit_seconds=args.commit_seconds,
            lease_ttl_s=args.lease_ttl,
        )
        _stop_on_signals()
        try:
            print(run_label_job(cfg), flush=True)
        except RowsNotWritten as e:
            print(e.summary, flush=True)
            raise
        return 0

    hint = f"the rows committed so far are in {args.output}; run the same command again to label the rest"
    return _run("pro2sam label", work, resume_hint=hint)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..pipeline.evaluate_job import run_evaluate_job
    from ..pipeline.settings import EvaluateJobConfig
    from ..report import report_markdown
    from ..storage import join_uri

    def work() -> int:
        cfg = EvaluateJobConfig(
            test=args.test, heldout=args.heldout, output=args.output, labeling=_labeling(args),
            classifier=_classifier(args), overwrite=args.overwrite, cam_curve_interval=args.cam_curve_interval,
            overlays=args.overlays,
        )  # fmt: skip
        _stop_on_signals()
        report = run_evaluate_job(cfg)
        print(report_markdown(report), flush=True)
        print(f"report: {join_uri(args.output, 'report.json')}", flush=True)
        return 0

    return _run("pro2sam evaluate", work, resume_hint="run the same command again to resume the labeling")


def cmd_tune(args: argparse.Namespace) -> int:
    from ..pipeline.settings import TuneJobConfig
    from ..pipeline.tune_job import run_tune_job

    def work() -> int:
        cfg = TuneJobConfig(
            heldout=args.heldout, output=args.output, labeling=_labeling(args), grid=args.grid,
            images_root=args.images_root, calibrate_confidence=not args.no_confidence, objective=args.objective,
        )  # fmt: skip
        _stop_on_signals()
        print(run_tune_job(cfg), flush=True)
        return 0

    return _run("pro2sam tune", work)


def _add_classifier_options(p: argparse.ArgumentParser) -> None:
    from ..classifier import GTFORMER_CLASSIFIER, ClassifierConfig

    d = _defaults(ClassifierConfig)
    g = p.add_argument_group("class scores (Top-1 / Top-5 Cls and Loc; GTFormer + SAM still give every box)")
    g.add_argument("--classifier", help="take the classes from this classifier instead of GTFormer, as the paper's "
                   "Table 1 does (EfficientNet-B7): a timm model name (e.g. tf_efficientnet_b7; name.tag picks the "
                   f"preprocessing of that tag) or '{GTFORMER_CLASSIFIER}' for a GTFormer export")  # fmt: skip
    g.add_argument("--classifier-checkpoint", help="its weights, local or URI: a state-dict file (.safetensors, or a "
                   f".pth/.bin of tensors only) for a timm model, the export folder for '{GTFORMER_CLASSIFIER}'")  # fmt: skip
    g.add_argument("--classifier-batch-size", type=int, default=d["batch_size"], help="(default %(default)s)")


def _classifier(args: argparse.Namespace):
    from ..classifier import ClassifierConfig

    if not args.classifier:
        if args.classifier_checkpoint:
            raise ValueError("--classifier-checkpoint needs --classifier (a timm model name or 'gtformer')")
        return None
    config = ClassifierConfig(model=args.classifier, checkpoint=args.classifier_checkpoint or "",
                              batch_size=args.classifier_batch_size)  # fmt: skip
    config.validate()
    return config


def cmd_train(args: argparse.Namespace) -> int:
    from ..pipeline.train_job import TrainJobConfig, run_train_job
    from ..train.gtformer import TrainConfig

    def work() -> int:
        train = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "amp"},
                            amp=not args.no_amp)  # fmt: skip
        job = TrainJobConfig(
            data=args.data, output=args.output, train=train, eval_data=args.eval_data, num_workers=args.num_workers,
            use_gpu=args.gpu, cpus_per_worker=args.cpus_per_worker, storage_path=args.storage_path,
            run_name=args.run_name, ray_address=args.ray_address, resume=not args.restart,
            max_failures=args.max_failures, keep_checkpoints=args.keep_checkpoints,
        )  # fmt: skip
        print(f"pro2sam train: exported GTFormer to {run_train_job(job)}", flush=True)
        return 0

    return _run("pro2sam train", work)


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import LabelFilter, export_coco, export_yolo
    from ..gtformer import gtformer_class_names
    from ..label_studio import ImageLocations, export_label_studio

    def work() -> int:
        class_names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
        if class_names is None and args.gtformer:
            class_names = gtformer_class_names(args.gtformer)
        filters = LabelFilter(
            status=None if args.status == "all" else args.status,
            min_match_score=args.min_match_score,
            min_confidence=args.min_confidence,
            classes=_parse_classes(args.classes),
            image_ids=_selected_ids(args),
        )
        common = dict(filters=filters, class_names=class_names, category=args.category, batch_size=args.batch_size)
        if args.format == "coco":
            summary = export_coco(args.input, args.output, **common)
        elif args.format == "yolo":
            summary = export_yolo(args.input, args.output, task=args.yolo_task, **common)
        else:
            locations = ImageLocations.parse(args.map_uri or (), args.local_files_root)
            summary = export_label_studio(args.input, args.output, image_url=locations, **common)
        print(f"pro2sam export ({args.format}): {summary}", file=sys.stderr)
        return 0

    return _run("pro2sam export", work)


def _selected_ids(args: argparse.Namespace):
    """The image ids of ``--where`` / ``--order-by`` / ``--limit`` / ``--offset`` (DuckDB), or None."""
    if not (args.where or args.order_by or args.limit is not None or args.offset):
        return None
    from .query import select_image_ids

    return select_image_ids(
        args.input, where=args.where, order_by=args.order_by, ascending=args.ascending, limit=args.limit,
        offset=args.offset,
    )  # fmt: skip


def _parse_classes(text: str | None) -> list[int | str] | None:
    if not text:
        return None
    return [int(c) if c.strip().lstrip("-").isdigit() else c.strip() for c in text.split(",") if c.strip()]


def cmd_show(args: argparse.Namespace) -> int:
    from .query import build_gallery

    def work() -> int:
        count = build_gallery(
            args.input, args.output, where=args.where, limit=args.limit, sample=args.sample, seed=args.seed,
            thumb_size=args.thumb_size, coarse_map=args.coarse_map, order_by=args.order_by,
            ascending=args.ascending, offset=args.offset,
        )  # fmt: skip
        print(f"pro2sam show: {count} images -> {args.output}", file=sys.stderr)
        return 0

    return _run("pro2sam show", work)


def cmd_report(args: argparse.Namespace) -> int:
    from ..qa import write_qa_report

    def work() -> int:
        data = write_qa_report(
            args.input, args.output, json_output=args.json, doubtful=args.doubtful, thumb_size=args.thumb_size,
            batch_size=args.batch_size,
        )  # fmt: skip
        c = data["counts"]
        print(
            f"pro2sam report: {c['images']} images: {c['ok']} ok, {c['error']} error, {c['coarse_fallback']} coarse-map "
            f"fallback, {c['with_confidence']} with a confidence -> {args.output}",
            file=sys.stderr,
        )
        return 0

    return _run("pro2sam report", work)


def cmd_synthetic(args: argparse.Namespace) -> int:
    from ..synthetic import write_wsol_dataset

    def work() -> int:
        out = write_wsol_dataset(
            args.output, num_train=args.num_train, num_val=args.num_val, num_test=args.num_test,
            image_size=(args.min_size, args.max_size), seed=args.seed, num_classes=args.num_classes,
            regime=args.regime,
        )  # fmt: skip
        for split, count in out.counts.items():
            print(f"{split}: {count} images  {out.spec(split)}")
        return 0

    return _run("pro2sam synthetic", work)


def cmd_schema(args: argparse.Namespace) -> int:
    from ..labels import describe_schema

    print(describe_schema())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    def work() -> int:
        run_demo(
            args.workdir, num_test=args.num_test, num_val=args.num_val, points_per_side=args.points_per_side,
            seed=args.seed, gtformer=args.gtformer, sam=args.sam, sam_checkpoint=args.sam_checkpoint,
            ray_address=args.ray_address, gallery_limit=args.gallery_limit, settings=getattr(args, "tuned", None),
            regime=args.regime,
        )  # fmt: skip
        return 0

    return _run("pro2sam demo", work)


# ---------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    from ..export import CATEGORY_SOURCES, DEFAULT_BATCH_SIZE, YOLO_TASKS
    from ..gallery import DEFAULT_LIMIT, DEFAULT_THUMB_SIZE
    from ..labels import STATUS_ERROR, STATUS_OK
    from ..pipeline.settings import EvaluateJobConfig, LabelJobConfig
    from ..qa import DEFAULT_DOUBTFUL

    parser = argparse.ArgumentParser(prog="pro2sam", description="Pro2SAM: image-level labels to boxes and masks.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="label image files with a GTFormer + SAM pair, one JSON line per image")
    _add_model_options(p)
    _add_candidate_options(p)
    _add_matching_options(p)
    _add_settings_option(p, confidence=False)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--output", "-o", default="-", help="JSON-lines output file (default stdout)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("label", help="the labeling job: images in object storage -> Parquet (Ray Data)")
    _add_label_options(p, _defaults(LabelJobConfig))
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("evaluate", help="label a held-out and a test split (Ray Data), score GTFormer-only and Pro2SAM")
    d = _defaults(EvaluateJobConfig)
    p.add_argument("--test", required=True, help="split to report: cub:ROOT:test, ilsvrc:ROOT:val, wsol:META:DATA:test, or a manifest")
    p.add_argument("--heldout", required=True, help="split the thresholds are chosen on, e.g. wsol:META:DATA:val (never test)")
    p.add_argument("--output", required=True, help="output folder (local or URI); a rerun resumes the labeling")
    _add_labeling_options(p)
    _add_classifier_options(p)
    p.add_argument("--overwrite", action="store_true", help="label again from scratch (replaces only the label files)")
    p.add_argument("--cam-curve-interval", type=float, default=d["cam_curve_interval"], help="tau grid step (default %(default)s)")
    p.add_argument("--overlays", type=int, default=d["overlays"], help="overlay PNGs of best and worst cases (default %(default)s)")
    _add_settings_option(p)
    p.set_defaults(func=cmd_evaluate)

    _add_tune_parser(sub)

    p = sub.add_parser("train", help="train GTFormer on image-level labels (Ray Train, DDP), export a checkpoint")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="labels table -> COCO JSON, YOLO labels or Label Studio tasks")
    p.add_argument("--input", required=True, help="labels table: a Parquet file or folder (local or URI)")
    p.add_argument("--format", choices=("coco", "yolo", "label-studio"), required=True,
                   help="coco: one JSON; yolo: a folder; label-studio: one JSON of tasks with predictions")  # fmt: skip
    p.add_argument("--output", required=True, help="COCO / Label Studio: the .json file; YOLO: the output folder (written whole)")
    p.add_argument("--yolo-task", choices=YOLO_TASKS, default=YOLO_TASKS[0], help="YOLO boxes or polygons (default %(default)s)")
    p.add_argument("--gtformer", help="GTFormer export whose config.json names the classes")
    p.add_argument("--class-names", help="comma-separated class names, index-aligned (overrides --gtformer)")
    p.add_argument("--category", choices=CATEGORY_SOURCES, default=CATEGORY_SOURCES[0],
                   help="top1: GTFormer's class; label: the manifest label (default %(default)s)")  # fmt: skip
    p.add_argument("--min-match-score", type=float, help="keep rows with match_score >= this (drops the fallback)")
    p.add_argument("--status", type=str.lower, choices=(STATUS_OK, STATUS_ERROR, "all"), default=STATUS_OK,
                   help="keep rows with this status, or all of them (default %(default)s)")  # fmt: skip
    p.add_argument("--min-confidence", type=float, help="keep rows with confidence >= this")
    p.add_argument("--classes", help="keep these top-1 classes: comma-separated indices or names")
    _add_selection_options(p, limit=None)
    g = p.add_argument_group("Label Studio")
    g.add_argument("--map-uri", action="append", metavar="FROM=TO",
                   help="image URIs starting with FROM get TO instead (repeatable), e.g. "
                   "s3://bucket/=https://bucket.s3.amazonaws.com/; s3:// URIs are kept by default (Label Studio "
                   "opens them through a cloud source storage)")  # fmt: skip
    g.add_argument("--local-files-root", metavar="DIR",
                   help="local images under DIR become /data/local-files/?d=<path under DIR> URLs "
                   "(Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="rows per record batch read (default %(default)s)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("show", help="labels table -> self-contained HTML gallery of overlays")
    p.add_argument("--input", required=True, help="labels table: a Parquet file or folder (local or URI)")
    p.add_argument("--output", default="gallery.html", help="the HTML file to write (default %(default)s)")
    _add_selection_options(p, limit=DEFAULT_LIMIT)
    p.add_argument("--sample", action="store_true", help="a random sample instead of the first rows of the order")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample")
    p.add_argument("--thumb-size", type=int, default=DEFAULT_THUMB_SIZE, help="thumbnail's longer side in pixels (default %(default)s)")
    p.add_argument("--coarse-map", action="store_true", help="show each row's GTFormer coarse map beside its overlay")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("report", help="labels table -> QA report: one HTML page with plots, and its numbers as JSON")
    p.add_argument("input", help="labels table: a Parquet file or output folder (local or URI)")
    p.add_argument("--output", default="qa_report.html", help="the HTML page (local or URI; default %(default)s)")
    p.add_argument("--json", help="the numbers as JSON (default: --output with .json)")
    p.add_argument("--doubtful", type=int, default=DEFAULT_DOUBTFUL,
                   help="the most doubtful rows shown with overlays (default %(default)s)")  # fmt: skip
    p.add_argument("--thumb-size", type=int, default=DEFAULT_THUMB_SIZE, help="thumbnail's longer side in pixels (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="rows per record batch read (default %(default)s)")
    p.set_defaults(func=cmd_report)

    _add_synthetic_parser(sub)

    p = sub.add_parser("schema", help="print the labels table's Parquet schema")
    p.set_defaults(func=cmd_schema)

    _add_demo_parser(sub)
    return parser


def _add_selection_options(p: argparse.ArgumentParser, *, limit: int | None) -> None:
    """``--where``, ``--order-by``, ``--ascending``, ``--limit``, ``--offset`` (DuckDB, apps/query.py)."""
    from .query import DEFAULT_ORDER, ORDER_COLUMNS

    g = p.add_argument_group("selection (DuckDB SQL over the table's columns and class_score)")
    g.add_argument("--where", help="SQL condition, e.g. \"confidence < 0.5 AND status='ok'\"")
    g.add_argument("--order-by", choices=ORDER_COLUMNS, metavar="COLUMN",
                   help=f"order of the rows, highest first (default {DEFAULT_ORDER}); rows without a value last")  # fmt: skip
    g.add_argument("--ascending", action="store_true", help="lowest first: the most doubtful rows of a score")
    g.add_argument("--limit", type=int, default=limit,
                   help="at most this many rows of the order" + (" (default %(default)s)" if limit else " (default: all)"))  # fmt: skip
    g.add_argument("--offset", type=int, default=0, help="skip this many rows of the order first (default 0)")


def _add_label_options(p: argparse.ArgumentParser, d: dict) -> None:
    p.add_argument("--input", required=True,
                   help="image prefix (local or fsspec URI), manifest .csv/.parquet file, WebDataset shard .tar, "
                   "folder or brace pattern of shards (s3://b/shards/{000000..000009}.tar), Parquet file of "
                   "image bytes (an 'image' column), or one image file")  # fmt: skip
    p.add_argument("--shard-label", default=d["shard_label"],
                   help="the member of a shard's sample its label is read from: an extension (cls, txt) or "
                   "json:FIELD; 'none' for no label (default %(default)s)")  # fmt: skip
    p.add_argument("--output", required=True, help="output prefix for the Parquet files (resumes if it exists)")
    _add_settings_option(p)
    _add_labeling_options(p)
    g = p.add_argument_group("the output")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the output's label files (only those; nothing else under --output is touched)")  # fmt: skip
    g.add_argument("--retry-errors", action="store_true", help="relabel every error row (by default only read failures)")
    g.add_argument("--relabel-changed", action="store_true", help="relabel images whose file changed (size, mtime or ETag; a manifest's files are looked up: a stat or HEAD each)")
    g.add_argument("--force", action="store_true", help="take the output over from a run that holds it (if that run is dead)")
    g.add_argument("--rows-per-file", type=int, default=d["rows_per_file"],
                   help="rows per Parquet file; a kill loses at most the rows not yet in a file (default %(default)s)")  # fmt: skip
    g.add_argument("--commit-seconds", type=float, default=d["commit_seconds"],
                   help="commit a file at least this often, full or not (default %(default)s)")  # fmt: skip
    g.add_argument("--lease-ttl", type=float, default=d["lease_ttl_s"],
                   help="seconds the output's lease lives without a renewal; renewed every quarter of it and "
                   "before each commit. A run on another host waits this long for a dead run's lease "
                   "(default %(default)s)")  # fmt: skip


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from ..gtformer import AREA_LOSSES, GTFORMER_PRESETS
    from ..pipeline.train_job import TrainJobConfig
    from ..train.gtformer import TrainConfig
    from ..train.schedule import SCHEDULES

    d, job = _defaults(TrainConfig), _defaults(TrainJobConfig)
    p.add_argument("--data", required=True, help="training data: cub:ROOT:SPLIT, ilsvrc:ROOT:SPLIT, "
                   "wsol:METADATA_ROOT:DATA_ROOT:SPLIT, or a manifest .csv/.parquet (uri,label)")  # fmt: skip
    p.add_argument("--output", required=True, help="output folder or URI: gtformer/ export (+ ray_train/ checkpoints)")
    p.add_argument("--eval-data", help="held-out data evaluated after every epoch (same spec forms)")
    g = p.add_argument_group("recipe")
    g.add_argument("--preset", default=d["preset"], choices=sorted(GTFORMER_PRESETS), help="(default %(default)s)")
    g.add_argument("--epochs", type=int, default=d["epochs"], help="(default %(default)s)")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="global batch size (default %(default)s)")
    g.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate (default %(default)s; ILSVRC: 1.5e-5)")
    g.add_argument("--min-lr", type=float, default=d["min_lr"], help="(default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="(default %(default)s)")
    g.add_argument("--warmup-epochs", type=float, default=d["warmup_epochs"], help="(default %(default)s)")
    g.add_argument("--schedule", choices=SCHEDULES, default=d["schedule"], help="(default %(default)s)")
    g.add_argument("--tau", type=float, default=d["tau"], help="area-loss target: 0.25 CUB-like, 0.35 ImageNet-like (default %(default)s)")
    g.add_argument("--area-loss", choices=AREA_LOSSES, default=d["area_loss"],
                   help="area loss over the batch (the authors') or per image ([ours]; for backbones that already "
                        "tell the classes apart, see pro2sam.gtformer.area_loss) (default %(default)s)")  # fmt: skip
    g.add_argument("--seed", type=int, default=d["seed"], help="(default %(default)s)")
    g.add_argument("--loader-workers", type=int, default=d["loader_workers"], help="DataLoader processes per worker (default %(default)s)")
    g.add_argument("--no-amp", action="store_true", help="train in float32 on GPUs too")
    weights = g.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="ImageNet DeiT backbone through timm")
    weights.add_argument("--backbone-checkpoint", help="DeiT checkpoint file (local or URI) for the backbone")
    g = p.add_argument_group("Ray Train")
    g.add_argument("--num-workers", type=int, default=job["num_workers"], help="data-parallel workers (default %(default)s)")
    g.add_argument("--gpu", action="store_true", help="one GPU per training worker")
    g.add_argument("--cpus-per-worker", type=float, default=job["cpus_per_worker"], help="(default %(default)s)")
    g.add_argument("--storage-path", help="checkpoint storage (default OUTPUT/ray_train; shared on clusters)")
    g.add_argument("--run-name", default=job["run_name"], help="run folder under the storage path; same name resumes")
    g.add_argument("--restart", action="store_true", help="delete the run's checkpoints and start over")
    g.add_argument("--max-failures", type=int, default=job["max_failures"], help="worker failures retried (default %(default)s)")
    g.add_argument("--keep-checkpoints", type=int, default=job["keep_checkpoints"], help="(default %(default)s)")
    g.add_argument("--ray-address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")


def _add_synthetic_parser(sub) -> None:
    from ..synthetic import DEFAULT_SIZE_RANGE, REGIMES, SYNTHETIC_CLASSES

    p = sub.add_parser("synthetic", help="write a synthetic WSOL data set (wsolevaluation layout), deterministic by seed")
    p.add_argument("--output", required=True, help="root folder of the data set (metadata and images)")
    p.add_argument("--num-train", type=int, default=2000, help="training images (default %(default)s)")
    p.add_argument("--num-val", type=int, default=500, help="held-out images with boxes and masks (default %(default)s)")
    p.add_argument("--num-test", type=int, default=1000, help="test images with boxes and masks (default %(default)s)")
    p.add_argument("--min-size", type=int, default=DEFAULT_SIZE_RANGE[0], help="smallest image side, px (default %(default)s)")
    p.add_argument("--max-size", type=int, default=DEFAULT_SIZE_RANGE[1], help="largest image side, px (default %(default)s)")
    p.add_argument("--num-classes", type=int, default=len(SYNTHETIC_CLASSES), help="classes in play (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--regime", choices=REGIMES, default=REGIMES[0],
                   help="class evidence on the part alone, or over the whole object on a support (default %(default)s)")  # fmt: skip
    p.set_defaults(func=cmd_synthetic)


def _add_tune_parser(sub) -> None:
    from ..tuning import DEFAULT_GRID, GRIDS, OBJECTIVE, OBJECTIVES

    p = sub.add_parser(
        "tune",
        help="choose SAM's filters, grid pruning, the matching rule and the fallback threshold on a held-out split "
        "with boxes (Ray Data); write a settings file for label / evaluate / predict / demo --settings",
    )
    p.add_argument("--heldout", required=True,
                   help="held-out images with boxes: a manifest .csv/.parquet (uri, label, x0, y0, x1, y1 in pixels; "
                   "one row per box), coco:FILE.json (COCO instances), cub:ROOT:SPLIT, ilsvrc:ROOT:SPLIT or "
                   "wsol:META:DATA:SPLIT (never the test split)")  # fmt: skip
    p.add_argument("--output", required=True, help="the settings file to write (JSON; local or URI)")
    p.add_argument("--images-root", help="folder of a COCO file's images (default: the JSON's folder)")
    sizes = "; ".join(
        f"{name}: {len(g.sam_filters) + 1} SAM filter pairs x pruning {'/'.join('on' if v else 'off' for v in g.prune)}, "
        f"plain IoU + {len(g.part_to_object)} part-to-object + {len(g.container_to_object)} container-to-object rules, "
        f"{len(g.fallback_thresholds) + 1} fallback thresholds, {len(g.absorb)} part absorptions"
        for name, g in GRIDS.items()
    )
    p.add_argument("--grid", choices=sorted(GRIDS), default=DEFAULT_GRID,
                   help=f"the settings tried besides the base ones given by the options below ({sizes}; "
                   "default %(default)s)")  # fmt: skip
    p.add_argument("--objective", choices=list(OBJECTIVES), default=OBJECTIVE,
                   help="what the choice maximises on the held-out split: gt_known_loc (boxes with IoU >= 0.5), "
                   "box_acc_v2 (the mean over IoU 0.3 / 0.5 / 0.7: tight boxes), miou (the masks; needs held-out "
                   "masks); default %(default)s")  # fmt: skip
    p.add_argument("--no-confidence", action="store_true", help="do not fit a confidence calibration into the file")
    _add_labeling_options(p, confidence=False)
    p.set_defaults(func=cmd_tune)


def _add_demo_parser(sub) -> None:
    from .. import shipped
    from ..synthetic import REGIMES
    from . import demo

    p = sub.add_parser(
        "demo",
        help="offline end to end: the shipped models on generated synthetic scenes; labeling job on a local Ray, "
        "report of GTFormer-only vs Pro2SAM, HTML gallery with coarse maps",
    )
    p.add_argument("--workdir", default="pro2sam-demo", help="where the data, labels, report and demo.html go")
    p.add_argument("--num-test", type=int, default=demo.DEFAULT_NUM_TEST, help="test images (default %(default)s)")
    p.add_argument("--num-val", type=int, default=demo.DEFAULT_NUM_VAL, help="held-out images (default %(default)s)")
    p.add_argument("--points-per-side", type=int, default=demo.DEFAULT_POINTS_PER_SIDE, help="SAM grid N x N (default %(default)s)")
    p.add_argument("--seed", type=int, default=shipped.SYNTHETIC_SEED, help="synthetic data set seed (default %(default)s)")
    p.add_argument("--gallery-limit", type=int, default=demo.DEFAULT_GALLERY_LIMIT, help="images in demo.html (default %(default)s)")
    p.add_argument("--gtformer", help="GTFormer export folder (default: the model shipped for --regime)")
    p.add_argument("--sam", help="SAM variant (default: the shipped 'synthetic' SAM)")
    p.add_argument("--sam-checkpoint", help="SAM weights file (default: the shipped one, with the default --sam)")
    p.add_argument("--ray-address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--regime", choices=REGIMES, default=REGIMES[0],
                   help="synthetic world: class evidence on the part alone, or over the object on a support (default %(default)s)")  # fmt: skip
    _add_settings_option(p, default=DEMO_SETTINGS)
    p.set_defaults(func=cmd_demo)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with a ``--settings`` file's values as the subcommand's defaults (an
    option given explicitly still wins; ``args.tuned`` is the file read).

    Raises:
        SettingsError: the settings file is missing, unreadable or not one of ``pro2sam tune``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "settings", None) == NO_SETTINGS:
        args.settings = None
    elif getattr(args, "settings", None) == DEMO_SETTINGS:
        from .. import shipped
        from ..tuning import SettingsError

        try:
            args.settings = str(shipped.settings_file(args.regime))
        except FileNotFoundError as e:
            raise SettingsError(str(e)) from None
    args.tuned = None
    if getattr(args, "settings", None):
        from ..tuning import load_settings

        tuned = load_settings(args.settings)
        subparser = _subparsers(parser)[args.command]
        subparser.set_defaults(**_settings_defaults(tuned, subparser))
        settings = args.settings
        args = parser.parse_args(argv)  # parsed again: explicit options over the file's defaults
        args.settings, args.tuned = settings, tuned
    return args


def main(argv: list[str] | None = None) -> int:
    from ..tuning import SettingsError

    try:
        args = parse_args(argv)
    except SettingsError as e:
        command = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), "")
        print(f"pro2sam {command}: error: {e}", file=sys.stderr, flush=True)
        return 2
    return args.func(args)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


if __name__ == "__main__":
    sys.exit(main())
