"""Settings chosen on a held-out split with boxes (``pro2sam tune``), and the file that carries them.

METHOD.md §4: every threshold that produces a box is picked on a held-out split, never on test.
This module holds what ``pro2sam tune`` and ``benchmarks/bench_quality.py`` share; no Ray here
(the job is :mod:`pro2sam.pipeline.tune_job`).

- **The grid** (:class:`TuningGrid`, presets in :data:`GRIDS`): SAM's filter thresholds
  (predicted IoU, stability) x grid pruning give the *candidate settings*, one SAM pass per image
  each; the matching rules (plain IoU, the authors' rule; part-to-object completion at each
  agreement x containment; container-to-object at each object mass x support contrast) are
  matched on those cached candidates. The base settings (those of
  the command line, the package defaults unless changed) are always among them.
- **The objective** (:data:`OBJECTIVES`, ``pro2sam tune --objective``): GT-known Loc on the
  held-out split by default; or the single box's BoxAccV2 (IoU 0.3 / 0.5 / 0.7: rewards tight
  boxes), or the masks' mIoU (held-out masks needed); scored by
  :func:`pro2sam.evaluation.evaluate_predictions` (the evaluation job's code). Every row of the
  table carries all three where the data allows.
- **The choice** (:func:`choose`): the best objective; ties go to the better masks (mask mIoU,
  where the held-out split has masks), then to the setting that changes fewest of the base
  settings, then to plain IoU over the other rules (the simpler rule), then to the earlier row of
  the table.
- **Part absorption** (``MatchConfig.absorb_parts``) is tried after, on the chosen setting, at each
  pair of the grid's ``absorb``: it changes the chosen mask (and its box by little), so the tune
  job labels the held-out images once more, SAM once per image, every pair matched on the same
  candidates.
- **The fallback threshold** is chosen after, on the chosen setting: it changes only the boxes
  of images where no candidate survived (:func:`with_fallback_threshold`), so trying it needs no
  model.
- **The settings file** (:func:`settings_document`, :func:`load_settings`): JSON with the chosen
  settings, the table of every setting tried with its score, the data it was chosen on, the
  confidence calibration fitted on the chosen setting's held-out rows, and the code version. Its
  SHA-256 goes into every label row made with it (``settings_sha256``).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from .candidates import CandidateConfig
from .matching import MatchConfig, coarse_fallback
from .rle import encode_mask

__all__ = [
    "SETTINGS_FORMAT",
    "SHIPPED_SETTINGS",
    "CANDIDATE_SETTINGS",
    "GRIDS",
    "DEFAULT_GRID",
    "OBJECTIVE",
    "OBJECTIVES",
    "TIE_BREAK",
    "ABSORB_GRID",
    "SettingsError",
    "TunedSettings",
    "TuningGrid",
    "choose",
    "code_version",
    "load_settings",
    "settings_document",
    "rule_name",
    "table_row",
    "with_fallback_threshold",
]

SETTINGS_FORMAT = "pro2sam.settings/1"
# What ``--settings`` says to mean the settings shipped with the shipped models.
SHIPPED_SETTINGS = "shipped"
# The CandidateConfig fields a settings file carries (the rest are speed settings of the machine).
CANDIDATE_SETTINGS = (
    "points_per_side", "mode", "pred_iou_thresh", "stability_score_thresh", "prune_with_coarse_map", "relax_filters_when_empty",
)  # fmt: skip
# What the choice can maximise: --objective name -> (the score's key in the Pro2SAM results of
# evaluate_predictions and in the table's rows, what it is).
OBJECTIVES = {
    "gt_known_loc": ("gt_known_loc", "percent of held-out images whose box has IoU >= 0.5 with a GT box"),
    "box_acc_v2": ("BoxAccV2_single_box", "mean over IoU 0.3 / 0.5 / 0.7 of the percent of held-out images whose box "
                   "reaches it with a GT box: rewards tight boxes"),
    "miou": ("mIoU", "mean IoU of the chosen masks with the held-out GT masks"),
}  # fmt: skip
# The default objective: the share of held-out images whose box has IoU >= 0.5 with a GT box.
OBJECTIVE = "gt_known_loc"
PLAIN_IOU = "plain IoU"
PART_TO_OBJECT = "part-to-object"
CONTAINER_TO_OBJECT = "container-to-object"


class SettingsError(ValueError):
    """A settings file that cannot be used; the message names the file and says why, in one line."""


@dataclass(frozen=True)
class TuningGrid:
    """The settings ``pro2sam tune`` tries, besides the base settings (always tried).

    Attributes:
        sam_filters: (pred_iou_thresh, stability_score_thresh) pairs; one SAM pass each.
        prune: grid pruning by the coarse map, on and/or off; one SAM pass each (with each pair).
        part_to_object: (agreement, containment) pairs of part-to-object completion, matched on
            the cached candidates; plain IoU matching (the authors' rule) is always tried too.
        fallback_thresholds: thresholds of the coarse-map fallback box, tried on the chosen setting.
        relax: ``CandidateConfig.relax_filters_when_empty`` off and/or on, with each filter pair
            and pruning; on, SAM decodes again only the images where nothing passed the filters
            (the tune job reuses the other images' candidates).
        completion_sizes: ``MatchConfig.completion_size`` of each part-to-object pair (None: pixel
            by pixel), matched on the cached candidates.
        container_to_object: (object_mass, support_contrast) pairs of container-to-object, matched
            on the cached candidates.
        absorb: (absorb_contrast, absorb_box_growth) pairs of ``MatchConfig.absorb_parts``, tried
            on the chosen setting (one more pass over the held-out images, SAM once per image).
    """

    sam_filters: tuple[tuple[float, float], ...]
    prune: tuple[bool, ...]
    part_to_object: tuple[tuple[float, float], ...]
    fallback_thresholds: tuple[float, ...]
    relax: tuple[bool, ...] = (False, True)
    completion_sizes: tuple[int | None, ...] = (None,)
    container_to_object: tuple[tuple[float, float], ...] = ()
    absorb: tuple[tuple[float, float], ...] = ()

    def candidate_configs(self, base: CandidateConfig) -> list[CandidateConfig]:
        """The base candidate settings first, then every filter pair x pruning with the base's
        relaxing, then the same with relaxing changed, without repeats."""
        configs = [base]
        relaxes = dict.fromkeys((base.relax_filters_when_empty, *self.relax))
        for relax in relaxes:
            for prune in self.prune:
                for pred_iou, stability in ((base.pred_iou_thresh, base.stability_score_thresh), *self.sam_filters):
                    configs.append(replace(base, pred_iou_thresh=pred_iou, stability_score_thresh=stability,
                                           prune_with_coarse_map=prune, relax_filters_when_empty=relax))  # fmt: skip
        return list(dict.fromkeys(configs))

    def match_configs(self, base: MatchConfig) -> list[MatchConfig]:
        """The base matching first, then plain IoU, part-to-object at each pair and completion
        grid, and container-to-object at each pair (with the base's containment), without repeats."""
        configs = [base, replace(base, part_to_object=False, container_to_object=False)]
        configs += [
            replace(base, part_to_object=True, container_to_object=False, agreement=a, containment=c, completion_size=size)
            for size in self.completion_sizes for a, c in self.part_to_object
        ]  # fmt: skip
        configs += [
            replace(base, part_to_object=False, container_to_object=True, object_mass=m, support_contrast=r)
            for m, r in self.container_to_object
        ]  # fmt: skip
        return list(dict.fromkeys(configs))

    def fallback_values(self, base: MatchConfig) -> list[float]:
        return list(dict.fromkeys((base.fallback_threshold, *self.fallback_thresholds)))

    def absorb_configs(self, chosen: MatchConfig) -> list[MatchConfig]:
        """The chosen matching with part absorption at each pair (and off, where it was on),
        without the chosen one itself."""
        configs = [replace(chosen, absorb_parts=True, absorb_contrast=c, absorb_box_growth=g) for c, g in self.absorb]
        configs += [replace(chosen, absorb_parts=False)] if chosen.absorb_parts else []
        return [m for m in dict.fromkeys(configs) if m != chosen]

    def size(self, base_candidates: CandidateConfig, base_matching: MatchConfig) -> tuple[int, int, int, int]:
        """(SAM passes per image, matchings per pass, fallback thresholds, absorption pairs)."""
        return (
            len(self.candidate_configs(base_candidates)),
            len(self.match_configs(base_matching)),
            len(self.fallback_values(base_matching)),
            len(self.absorb),
        )


# "small" keeps a 200-image held-out split to minutes on a CPU with the shipped models (grid 16):
# the variant's own filters, SamAutomaticMaskGenerator's and one between, pruning on and off, plain
# IoU and part-to-object at four agreements x six containments (from no agreement asked and 20 %
# contained up: with the filters relaxed, the part regime's choice on val sat at 30 %, then at this
# edge, 20 %, on a plateau: 10-20 % tie on val, 5 % loses). "full" is bench_quality's grid: it also
# reaches below 20 % and compares candidates on 64- and 32-cell grids (on the part regime's val
# split every grid tied with pixel by pixel at the best rules; benchmarks/README.md). Both try
# container-to-object from a tenth of the map's mass kept up to most of it, and a shed area lit
# from 0.4 of the object's mean up to as much as the object. The object regime's val choice sat at
# that top, contrast 1; past it nothing changed, up to asking nothing of the shed area (inf): the
# mass kept decides (benchmarks/README.md, "Container-to-object").
# Part absorption (contrast, box growth): a part lit from a quarter of the chosen mask's mean up to
# twice it, the box grown by nothing up to a quarter (the part regime's val split, scratch scan:
# growth 1.25 and past lost boxes, 1.1 and under none; benchmarks/README.md, "Absorbing the lit part").
ABSORB_GRID = tuple((c, g) for c in (0.25, 0.5, 1.0, 2.0) for g in (1.0, 1.05, 1.1, 1.25))
GRIDS: dict[str, TuningGrid] = {
    "small": TuningGrid(
        sam_filters=((0.88, 0.95), (0.7, 0.8)),
        prune=(True, False),
        part_to_object=tuple((a, c) for a in (0.0, 0.02, 0.1, 0.35) for c in (0.2, 0.3, 0.4, 0.5, 0.6, 0.9)),
        fallback_thresholds=(0.1, 0.3, 0.5),
        container_to_object=tuple((m, r) for m in (0.1, 0.25, 0.4, 0.6) for r in (0.4, 0.6, 0.8, 1.0)),
        absorb=ABSORB_GRID,
    ),
    "full": TuningGrid(
        sam_filters=((0.88, 0.95), (0.8, 0.9), (0.7, 0.8), (0.6, 0.8), (0.5, 0.7), (0.0, 0.0)),
        prune=(True, False),
        part_to_object=tuple((a, c) for a in (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35) for c in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9)),
        fallback_thresholds=(0.05, 0.1, 0.3, 0.4, 0.5),
        completion_sizes=(None, 64, 32),
        container_to_object=tuple((m, r) for m in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8) for r in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)),
        absorb=ABSORB_GRID,
    ),
}
DEFAULT_GRID = "small"


# ---------------------------------------------------------------- the table and the choice


def _changes(candidates: CandidateConfig, matching: MatchConfig, base_candidates: CandidateConfig, base_matching: MatchConfig) -> int:
    """How many settings differ from the base ones (what a tie is broken on first)."""
    c = sum(getattr(candidates, k) != getattr(base_candidates, k) for k in CANDIDATE_SETTINGS)
    m = sum(getattr(matching, f.name) != getattr(base_matching, f.name) for f in fields(MatchConfig))
    # A rule's thresholds count only where that rule is on (containment is both rules').
    climbs = matching.part_to_object or base_matching.part_to_object
    descends = matching.container_to_object or base_matching.container_to_object
    unused = [k for k in ("min_growth", "agreement", "completion_size") if not climbs]
    unused += [k for k in ("object_mass", "support_contrast") if not descends]
    unused += ["containment"] if not (climbs or descends) else []
    absorbs = matching.absorb_parts or base_matching.absorb_parts
    unused += [k for k in ("absorb_contrast", "absorb_box_growth", "absorb_area") if not absorbs]
    m -= sum(getattr(matching, k) != getattr(base_matching, k) for k in unused)
    return c + m


def rule_name(matching: MatchConfig) -> str:
    """The matching rule of a setting, as the table names it."""
    if matching.part_to_object:
        return PART_TO_OBJECT
    return CONTAINER_TO_OBJECT if matching.container_to_object else PLAIN_IOU


def table_row(
    candidates: CandidateConfig,
    matching: MatchConfig,
    scores: Mapping,
    *,
    base_candidates: CandidateConfig,
    base_matching: MatchConfig,
    stage: str,
) -> dict:
    """One row of the table: the setting, its held-out scores (percent) and its distance to the base.

    Args:
        scores: the ``Pro2SAM`` part of :func:`pro2sam.evaluation.evaluate_predictions`.
        stage: ``"sam+matching"``, or ``"absorb"`` / ``"fallback"`` (tried on the chosen setting).
    """
    return {
        "stage": stage,
        **{k: getattr(candidates, k) for k in (
            "pred_iou_thresh", "stability_score_thresh", "prune_with_coarse_map", "relax_filters_when_empty",
        )},  # fmt: skip
        "matching": rule_name(matching),
        "agreement": matching.agreement if matching.part_to_object else None,
        "containment": matching.containment if matching.part_to_object or matching.container_to_object else None,
        "completion_size": matching.completion_size if matching.part_to_object else None,
        "object_mass": matching.object_mass if matching.container_to_object else None,
        "support_contrast": matching.support_contrast if matching.container_to_object else None,
        "fallback_threshold": matching.fallback_threshold,
        "absorb_contrast": matching.absorb_contrast if matching.absorb_parts else None,
        "absorb_box_growth": matching.absorb_box_growth if matching.absorb_parts else None,
        **{key: scores.get(key) for key, _ in OBJECTIVES.values()},
        "fallback_rate": scores.get("fallback_rate"),
        "changes_from_base": _changes(candidates, matching, base_candidates, base_matching),
    }


TIE_BREAK = "the better mask mIoU where the held-out split has masks, then fewest changes from the base settings, then plain IoU over the other rules, then table order"


def choose(table: Sequence[Mapping], objective: str = OBJECTIVE) -> int:
    """Index of the chosen row: the highest ``objective`` (a key of :data:`OBJECTIVES`); ties to
    the better masks (the higher ``mIoU``, where the held-out split has masks: equal boxes, better
    labels), then the fewest changes from the base settings, then plain IoU over the other rules,
    then the earlier row. A row without the score (no held-out masks for ``miou``) is never
    preferred."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    column = OBJECTIVES[objective][0]

    def key(i: int):
        row = table[i]
        score, masks = row.get(column), row.get("mIoU")
        return (-(score if score is not None else -1.0), -(masks if masks is not None else -1.0), row["changes_from_base"],
                row["matching"] != PLAIN_IOU, i)  # fmt: skip

    if not table:
        raise ValueError("nothing to choose from: the table is empty")
    return min(range(len(table)), key=key)


def with_fallback_threshold(rows: Sequence[Mapping], threshold: float) -> list[dict]:
    """Labels rows as they would be with another fallback threshold: the rows whose box came from
    the coarse-map fallback get the box and mask of :func:`~pro2sam.matching.coarse_fallback` at
    ``threshold`` (from the row's own coarse map); the others are returned as they are."""
    out = []
    for row in rows:
        if row.get("box_source") != "coarse_fallback" or row.get("coarse_map") is None:
            out.append(dict(row))
            continue
        side = int(round(len(row["coarse_map"]) ** 0.5))
        coarse = np.asarray(row["coarse_map"], dtype=np.float32).reshape(side, side)
        mask, box = coarse_fallback(coarse, (row["height"], row["width"]), threshold)
        out.append({**row, "box_xyxy": list(box), "mask_rle": encode_mask(mask), "mask_area": int(mask.sum())})
    return out


# ---------------------------------------------------------------- the settings file


def code_version() -> dict:
    """The package version and, where the package sits in a git work tree, its commit and whether
    tracked files differ from it (``git_dirty``)."""
    from . import __version__

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    sha = git("rev-parse", "HEAD") or None
    dirty = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"pro2sam": __version__, "git_sha": sha, "git_dirty": None if dirty is None else bool(dirty)}


def settings_document(
    *,
    candidates: CandidateConfig,
    matching: MatchConfig,
    table: Sequence[Mapping],
    chosen: int,
    heldout: Mapping,
    grid: str,
    models: Mapping[str, str],
    confidence: Mapping | None = None,
    code: Mapping | None = None,
    objective: str = OBJECTIVE,
) -> dict:
    """The settings file's content (JSON-ready).

    Args:
        candidates, matching: the chosen settings.
        table: every setting tried (:func:`table_row`); ``chosen`` is the index of the choice.
        heldout: what they were chosen on: ``spec``, ``images``, ``images_with_boxes``, ``boxes``.
        grid: the grid's name; models: ``gtformer`` / ``sam`` ids of the models used.
        confidence: the confidence calibration fitted on the chosen setting's held-out rows
            (:meth:`pro2sam.confidence.ConfidenceModel.to_dict`), or None.
        code: :func:`code_version` taken when the run started (default: now).
        objective: what the choice maximised (a key of :data:`OBJECTIVES`).
    """
    return {
        "format": SETTINGS_FORMAT,
        "settings": {
            "candidates": {k: getattr(candidates, k) for k in CANDIDATE_SETTINGS},
            "matching": asdict(matching),
        },
        "confidence": dict(confidence) if confidence is not None else None,
        "objective": f"{objective}: {OBJECTIVES[objective][0]} ({OBJECTIVES[objective][1]})",
        "tie_break": TIE_BREAK,
        "chosen": chosen,
        "heldout": dict(heldout),
        "grid": grid,
        "models": dict(models),
        "code_version": dict(code) if code is not None else code_version(),
        "table": [dict(r) for r in table],
    }


@dataclass(frozen=True)
class TunedSettings:
    """A settings file, read and checked.

    Attributes:
        source: where it was read from; sha256: SHA-256 of its bytes.
        candidates: :data:`CANDIDATE_SETTINGS` -> value; matching: :class:`MatchConfig` fields.
        confidence: the confidence calibration it carries (a dict), or None.
        document: the whole file.
    """

    source: str
    sha256: str
    candidates: dict
    matching: dict
    confidence: dict | None
    document: dict

    def candidate_config(self, variant: str, **overrides) -> CandidateConfig:
        """The candidate settings for a SAM variant, ``overrides`` (None values left out) first."""
        return CandidateConfig.for_variant(variant, **{**self.candidates, **{k: v for k, v in overrides.items() if v is not None}})

    def match_config(self) -> MatchConfig:
        return MatchConfig(**self.matching)


def load_settings(uri: str) -> TunedSettings:
    """Read and check a settings file of ``pro2sam tune`` (local path or URI; ``"shipped"``: the
    settings chosen for the shipped models, :func:`pro2sam.shipped.settings_file`).

    Raises:
        SettingsError: missing or unreadable, not JSON, not a settings file, or settings the
            package refuses; the message is one line naming the file.
    """
    from .storage import StorageError, read_bytes

    if uri == SHIPPED_SETTINGS:
        from . import shipped

        try:
            uri = str(shipped.settings_file())
        except FileNotFoundError as e:
            raise SettingsError(str(e)) from None

    def bad(why: str) -> SettingsError:
        return SettingsError(f"settings file {uri}: {why}")

    try:
        data = read_bytes(str(uri))
    except FileNotFoundError:
        raise bad("not found") from None
    except (OSError, StorageError) as e:
        raise bad(f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"not JSON ({e})") from None
    if not isinstance(document, dict) or document.get("format") != SETTINGS_FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise bad(f"not a pro2sam settings file (format {found!r}, expected {SETTINGS_FORMAT!r}); write one with pro2sam tune")
    settings = document.get("settings")
    if not isinstance(settings, dict) or not isinstance(settings.get("candidates"), dict) or not isinstance(settings.get("matching"), dict):
        raise bad("no 'settings' with 'candidates' and 'matching'")
    candidates, matching = dict(settings["candidates"]), dict(settings["matching"])
    unknown = sorted(set(candidates) - set(CANDIDATE_SETTINGS)) + sorted(set(matching) - {f.name for f in fields(MatchConfig)})
    if unknown:
        raise bad(f"unknown settings {', '.join(unknown)}")
    try:
        CandidateConfig(**candidates)
        MatchConfig(**matching)
    except (TypeError, ValueError) as e:
        raise bad(str(e)) from None
    confidence = document.get("confidence")
    if confidence is not None:
        from .confidence import ConfidenceModel

        try:
            ConfidenceModel.from_dict(confidence)
        except (AttributeError, TypeError, ValueError) as e:
            raise bad(f"its confidence calibration: {e}") from None
    return TunedSettings(
        source=str(uri), sha256=hashlib.sha256(data).hexdigest(), candidates=candidates, matching=matching,
        confidence=confidence, document=document,
    )  # fmt: skip
