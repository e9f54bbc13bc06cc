"""The tuning job: choose the labeling settings on a held-out split with boxes (``pro2sam tune``).

    held-out spec (cub / ilsvrc / wsol / boxed manifest / coco:FILE.json) -> its images
    -> Ray Data: read bytes -> decode -> TuneLabeler actors (GTFormer once per image; SAM once per
       image and candidate setting; every matching rule on those cached candidates)
    -> the driver scores every setting with the evaluation's code (GT-known Loc, BoxAccV2 of the one
       box, mIoU), chooses by the objective
       (:mod:`pro2sam.tuning`), tries the fallback threshold on the choice, fits the confidence
    -> the settings file (JSON, written whole)

The actors are those of the labeling job in all but the loop over settings: one per GPU of the
cluster (``--actors``, ``--gpus-per-actor`` as for ``pro2sam label``), models loaded once each.
Nothing is written but the settings file; a rerun tunes again.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from ..confidence import calibrate
from ..datasets import WSOLDataset, open_dataset
from ..evaluation import SplitResult, evaluate_predictions, index_rows
from ..labels import LABEL_SCHEMA, error_row, ok_row
from ..storage import write_bytes_atomic
from ..tuning import GRIDS, OBJECTIVES, choose, code_version, settings_document, table_row, with_fallback_threshold
from .label_job import classify_batch, load_models
from .ray_env import join_ray
from .settings import LabelingSettings, TuneJobConfig
from .stages import decoded_images, text_or_none

__all__ = ["TuneSummary", "run_tune_job"]

log = logging.getLogger("pro2sam.tune")

RUN_ID = "tune"


@dataclass
class TuneSummary:
    """What a run did and chose."""

    output: str
    images: int
    settings_tried: int
    chosen: dict
    seconds: float
    objective: str = "gt_known_loc"

    def __str__(self) -> str:
        c = self.chosen
        rule = c["matching"]
        if c.get("agreement") is not None:
            rule += f" (agreement {c['agreement']:g}, containment {c['containment']:g})"
        elif c.get("object_mass") is not None:
            rule += f" (object mass {c['object_mass']:g}, support contrast {c['support_contrast']:g})"
        if c.get("absorb_contrast") is not None:
            rule += f", absorbing lit parts (contrast {c['absorb_contrast']:g}, box growth {c['absorb_box_growth']:g})"
        return (
            f"pro2sam tune: {self.settings_tried} settings tried on {self.images} held-out images in {self.seconds:.1f} s; "
            f"chosen: SAM filters {c['pred_iou_thresh']:g} / {c['stability_score_thresh']:g}, pruning "
            f"{'on' if c['prune_with_coarse_map'] else 'off'}, {rule}, fallback threshold {c['fallback_threshold']:g}: "
            f"GT-known Loc {c['gt_known_loc']:.1f} %"
            + (f" (chosen by {self.objective}: {c[OBJECTIVES[self.objective][0]]:.1f})" if self.objective != "gt_known_loc" else "")
            + f"; settings: {self.output}"
        )


class TuneLabeler:
    """Ray Data actor: loads GTFormer and SAM once; for each decoded image, GTFormer and SAM's image
    encoder once, SAM's grid decoding and filters once per candidate setting, and each matching
    rule on those candidates. Maps a batch to a table of labels rows (without the schema's
    metadata; ``coarse_map`` only on fallback rows, the one place the driver needs it) with two
    more columns, ``candidates_index`` and ``matching_index`` (positions in the lists it was given)."""

    def __init__(self, settings: LabelingSettings, candidates: list, matchings: list, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.model = load_models(settings)
        self.generators = [self.model.with_settings(candidates=c) for c in candidates]
        self.choosers = [self.model.with_settings(matching=m) for m in matchings]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        good = [i for i in range(len(batch["uri"])) if not batch["error"][i]]
        # GTFormer once per batch, as the labeling job runs it (the same scores, the same choices).
        classified = dict(zip(good, classify_batch(self.model, [batch["image"][i] for i in good])))
        rows: list[dict] = []
        for i in range(len(batch["uri"])):
            rows += self._image(batch, i, classified.get(i))
        return pa.Table.from_pylist(rows, schema=_TUNE_SCHEMA)

    def _image(self, batch: dict[str, np.ndarray], i: int, classified) -> list[dict]:
        ident = (str(batch["image_id"][i]), str(batch["uri"][i]), text_or_none(batch["label"][i]))
        settings = [(c, m) for c in range(len(self.generators)) for m in range(len(self.choosers))]
        if batch["error"][i]:
            return [self._error(ident, str(batch["error"][i]), str(batch["error_kind"][i]), c, m) for c, m in settings]
        image = batch["image"][i]
        if isinstance(classified, Exception):
            e = classified
            return [self._error(ident, f"labeling failed: {type(e).__name__}: {e}", "model", c, m) for c, m in settings]
        probs, coarse = classified
        try:  # SAM's image encoder once; each candidate setting decodes that embedding
            self.generators[0].generator.set_image(image)
        except Exception as e:
            return [self._error(ident, f"labeling failed: {type(e).__name__}: {e}", "model", c, m) for c, m in settings]
        rows = []
        found_by_config = {}
        for c, generator in enumerate(self.generators):
            try:
                config = generator.generator.config
                # Relaxing the filters changes only the images where nothing passed them.
                strict = found_by_config.get(replace(config, relax_filters_when_empty=False))
                if config.relax_filters_when_empty and strict is not None and len(strict):
                    found = strict
                else:
                    if c:
                        generator.generator.adopt_image(self.generators[0].generator)
                    found = generator.generator.generate(None, coarse_map=coarse)
                found_by_config[config] = found
            except Exception as e:
                rows += [self._error(ident, f"labeling failed: {type(e).__name__}: {e}", "model", c, m) for m in range(len(self.choosers))]
                continue
            for m, chooser in enumerate(self.choosers):
                try:
                    result = chooser.choose(image, probs, coarse, found, label=ident[2])
                    row = ok_row(*ident, result, model_ids=self.model.model_ids, run_id=RUN_ID)
                    if row["box_source"] != "coarse_fallback":  # only a fallback box is redrawn from it
                        row["coarse_map"] = None
                except Exception as e:
                    row = self._error(ident, f"labeling failed: {type(e).__name__}: {e}", "model", c, m)
                rows.append({**row, "candidates_index": c, "matching_index": m})
        return rows

    def _error(self, ident: tuple, error: str, kind: str, c: int, m: int) -> dict:
        row = error_row(*ident, error, kind=kind, run_id=RUN_ID, model_ids=self.model.model_ids)
        return {**row, "candidates_index": c, "matching_index": m}


_TUNE_SCHEMA = pa.schema([*LABEL_SCHEMA.remove_metadata(), pa.field("candidates_index", pa.int32()), pa.field("matching_index", pa.int32())])


def _heldout_inputs(dataset: WSOLDataset) -> pa.Table:
    """The held-out images as the read stage's input (one row per image)."""
    samples = list({s.uri: s for s in dataset.samples}.values())
    n = len(samples)
    return pa.table({
        "image_id": [s.image_id for s in samples],
        "uri": [s.uri for s in samples],
        "label": [dataset.class_names[s.label] if 0 <= s.label < len(dataset.class_names) else str(s.label) for s in samples],
        "input_error": pa.nulls(n, pa.string()),
        "source_fingerprint": pa.nulls(n, pa.string()),
    })  # fmt: skip


def _label_every_setting(cfg: TuneJobConfig, inputs: pa.Table, candidates: list, matchings: list) -> list[dict]:
    """Every held-out image under every (candidate, matching) setting, through Ray Data, on the
    actors the labeling job would start (one per GPU of the cluster by default)."""
    resources = cfg.labeling.resources
    cluster = join_ray(resources.ray_address, cpus_needed=resources.local_cpus)
    actors = resources.resolve(cluster)
    batch_size = resources.batch_size
    # Small blocks: each image costs many SAM passes, so spread the images over every actor.
    ds = decoded_images(cluster.ray, inputs, cfg.labeling.limits, batch_size=batch_size, block_rows=batch_size)
    ds = ds.map_batches(
        TuneLabeler,
        fn_constructor_kwargs={"settings": cfg.labeling, "candidates": candidates, "matchings": matchings,
                               "threads": actors.cpus_per_actor},
        batch_format="numpy", batch_size=batch_size, concurrency=actors.concurrency,
        num_gpus=actors.gpus_per_actor, num_cpus=actors.cpus_per_actor,
    )  # fmt: skip
    rows = []
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows += table.to_pylist()
    return rows


def _heldout_description(cfg: TuneJobConfig, dataset: WSOLDataset) -> dict:
    boxed = [s for s in dataset.samples if s.boxes is not None and len(s.boxes)]
    return {
        "spec": cfg.heldout,
        **({"images_root": cfg.images_root} if cfg.images_root else {}),
        "dataset": dataset.name,
        "split": dataset.split,
        "images": len(dataset.samples),
        "images_with_boxes": len(boxed),
        "boxes": int(sum(len(s.boxes) for s in boxed)),
    }


def run_tune_job(cfg: TuneJobConfig) -> TuneSummary:
    """Label the held-out split under every setting of the grid, score, choose, write the file.

    Raises:
        ValueError: a bad option, a held-out split without boxes, resources the cluster cannot give.
        DatasetError: malformed held-out metadata or manifest.
        CheckpointError: a checkpoint that cannot be loaded (found on the driver, before Ray).
        StorageError: storage cannot be reached or the settings file not written.
    """
    start = time.perf_counter()
    cfg.validate()
    code = code_version()  # the code that runs, before anything can change it
    dataset = open_dataset(cfg.heldout, images_root=cfg.images_root)
    if not dataset.has_boxes:
        raise ValueError(f"--heldout {cfg.heldout}: no image has a box; tuning needs boxes (x0,y0,x1,y1 columns, COCO bbox)")
    if cfg.objective == "miou" and not dataset.has_masks:
        raise ValueError(f"--objective miou: --heldout {cfg.heldout} has no masks; choose gt_known_loc or box_acc_v2")
    model = load_models(cfg.labeling, device="cpu")  # a bad checkpoint ends the run here, before Ray
    base_candidates, base_matching = cfg.labeling.candidate_config(), cfg.labeling.matching
    grid = GRIDS[cfg.grid]
    candidates, matchings = grid.candidate_configs(base_candidates), grid.match_configs(base_matching)
    log.info(
        "tuning on %d held-out images: %d SAM passes per image x %d matching rules, then %d part absorptions and %d "
        "fallback thresholds", len(dataset.samples), len(candidates), len(matchings), len(grid.absorb),
        len(grid.fallback_values(base_matching)),
    )  # fmt: skip
    rows = _label_every_setting(cfg, _heldout_inputs(dataset), candidates, matchings)

    by_setting: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for row in rows:
        by_setting[row.pop("candidates_index"), row.pop("matching_index")].append(row)

    def score(setting_rows: list[dict]) -> SplitResult:
        return evaluate_predictions(dataset, setting_rows, methods=("Pro2SAM",))

    # Each row of the table, and beside it in ``settings``: (candidate settings, matching, the
    # held-out rows it labelled).
    table, settings = [], []
    for c, cand in enumerate(candidates):
        for m, match in enumerate(matchings):
            labelled = by_setting.get((c, m), [])
            table.append(table_row(cand, match, score(labelled).results["Pro2SAM"], base_candidates=base_candidates,
                                   base_matching=base_matching, stage="sam+matching"))  # fmt: skip
            settings.append((cand, match, labelled))
    first = choose(table, cfg.objective)
    absorbing = grid.absorb_configs(settings[first][1])
    if absorbing:  # on the chosen setting: one more pass, SAM once per image, every pair on its candidates
        log.info("part absorption: %d settings on the chosen one", len(absorbing))
        more: dict[int, list[dict]] = defaultdict(list)
        for row in _label_every_setting(cfg, _heldout_inputs(dataset), [settings[first][0]], absorbing):
            row.pop("candidates_index")
            more[row.pop("matching_index")].append(row)
        for a, match in enumerate(absorbing):
            scores = score(more.get(a, [])).results["Pro2SAM"]
            table.append(table_row(settings[first][0], match, scores, base_candidates=base_candidates, base_matching=base_matching, stage="absorb"))
            settings.append((settings[first][0], match, more.get(a, [])))
    second = choose(table, cfg.objective)
    cand, match, labelled = settings[second]
    for threshold in grid.fallback_values(base_matching):
        if threshold == match.fallback_threshold:
            continue
        scores = score(with_fallback_threshold(labelled, threshold)).results["Pro2SAM"]
        table.append(table_row(cand, replace(match, fallback_threshold=threshold), scores, base_candidates=base_candidates,
                               base_matching=base_matching, stage="fallback"))  # fmt: skip
        settings.append((cand, replace(match, fallback_threshold=threshold), labelled))
    chosen = choose(table, cfg.objective)
    chosen_candidates, chosen_matching, labelled = settings[chosen]
    threshold = chosen_matching.fallback_threshold
    table[chosen]["chosen"] = True

    confidence = None
    if cfg.calibrate_confidence:
        chosen_rows = with_fallback_threshold(labelled, threshold)
        records = score(chosen_rows).images
        fitted_on = f"{dataset.name}:{dataset.split}"
        confidence = calibrate(records, index_rows(chosen_rows), fitted_on=fitted_on).to_dict()
    document = settings_document(
        candidates=chosen_candidates, matching=chosen_matching, table=table, chosen=chosen,
        heldout=_heldout_description(cfg, dataset), grid=cfg.grid, models=model.model_ids, confidence=confidence,
        code=code, objective=cfg.objective,
    )  # fmt: skip
    write_bytes_atomic(cfg.output, (json.dumps(document, indent=2) + "\n").encode())
    return TuneSummary(cfg.output, len(dataset.samples), len(table), table[chosen], time.perf_counter() - start, cfg.objective)
