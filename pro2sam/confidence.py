"""A confidence per row that means something: the probability that its box is right.

"Right" is GT-known Loc's criterion: the box's IoU with a ground-truth box is at least 0.5
(:data:`pro2sam.metrics.LOC_IOU_THRESHOLD`). The confidence combines what a row already holds
(:data:`CONFIDENCE_FEATURES`): the match score, SAM's predicted IoU and stability, GTFormer's
top-1 probability, whether the box came from the coarse-map fallback (whose SAM scores are then
0) and the mask's share of the image. It is a logistic regression on the standardised features,
fitted with numpy (Newton's method, an L2 penalty on the weights) on the rows of a held-out split
whose boxes are known (``pro2sam evaluate`` does it), and saved as a small JSON calibration file
(:meth:`ConfidenceModel.save`) that the labeling job applies to new rows
(``pro2sam label --confidence-calibration FILE``).

How good it is, on a split it was not fitted on: :func:`auroc` (how well it ranks right boxes
above wrong ones) and :func:`risk_coverage` (GT-known Loc of the most confident 50 / 80 / 90 /
100 % of the images). Images without a confidence (error rows, images without a row) rank last
and count as wrong, as they do in every other number of the evaluation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from .labels import LABEL_SCHEMA, STATUS_OK
from .metrics import LOC_IOU_THRESHOLD
from .storage import read_bytes, write_bytes_atomic

__all__ = [
    "CONFIDENCE_FEATURES",
    "FEATURE_COLUMNS",
    "RISK_COVERAGES",
    "CALIBRATION_KIND",
    "DEFAULT_L2",
    "ConfidenceModel",
    "feature_matrix",
    "auroc",
    "risk_coverage",
    "risk_coverage_curve",
    "calibrate",
    "score_confidence",
]

CONFIDENCE_FEATURES = (
    "match_score",  # null (the fallback) -> 0
    "pred_iou",  # null -> 0
    "stability_score",  # null -> 0
    "class_score",  # topk_scores[0]
    "coarse_fallback",  # 1 when box_source is the coarse-map fallback
    "mask_area_fraction",  # mask_area / (width * height)
)
# The labels-table columns the features are computed from.
FEATURE_COLUMNS = (
    "status", "match_score", "pred_iou", "stability_score", "topk_scores", "box_source", "mask_area", "width", "height",
)  # fmt: skip
# Shares of the images, most confident first, whose GT-known Loc the evaluation reports.
RISK_COVERAGES = (0.5, 0.8, 0.9, 1.0)
CALIBRATION_KIND = "pro2sam.confidence.logistic/1"
# Penalty on the standardised weights: a held-out split of 50 images fits 7 numbers steadily.
DEFAULT_L2 = 1.0
_NEWTON_STEPS = 100
_FALLBACK = "coarse_fallback"


def feature_matrix(rows: pa.Table | pa.RecordBatch | Iterable[Mapping]) -> np.ndarray:
    """The features of labels-table rows.

    Args:
        rows: a table or record batch with (at least) :data:`FEATURE_COLUMNS`, or row dicts.

    Returns:
        (N, len(CONFIDENCE_FEATURES)) float64, in the order of :data:`CONFIDENCE_FEATURES`; the
        row of an image that has none (status not ok, no mask) is NaN.
    """
    if not isinstance(rows, (pa.Table, pa.RecordBatch)):
        wanted = pa.schema([LABEL_SCHEMA.field(c) for c in FEATURE_COLUMNS])
        rows = pa.Table.from_pylist([{c: r.get(c) for c in FEATURE_COLUMNS} for r in rows], schema=wanted)

    def column(name: str) -> np.ndarray:
        return np.asarray(rows.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)

    def null_to_zero(x: np.ndarray) -> np.ndarray:
        return np.where(np.isnan(x), 0.0, x)

    status = rows.column("status").to_pylist()
    class_score = [s[0] if s else math.nan for s in rows.column("topk_scores").to_pylist()]
    fallback = [source == _FALLBACK for source in rows.column("box_source").to_pylist()]
    with np.errstate(invalid="ignore", divide="ignore"):
        area = column("mask_area") / (column("width") * column("height"))
    x = np.stack(
        [
            null_to_zero(column("match_score")),
            null_to_zero(column("pred_iou")),
            null_to_zero(column("stability_score")),
            np.asarray(class_score, dtype=np.float64),
            np.asarray(fallback, dtype=np.float64),
            area,
        ],
        axis=1,
    ).reshape(len(status), len(CONFIDENCE_FEATURES))
    unusable = np.array([s != STATUS_OK for s in status], dtype=bool) | ~np.isfinite(x).all(axis=1)
    x[unusable] = np.nan
    return x


@dataclass(frozen=True)
class ConfidenceModel:
    """A fitted logistic regression from :data:`CONFIDENCE_FEATURES` to P(box right).

    ``confidence = sigmoid(bias + sum(weights * (x - mean) / scale))``.

    Attributes:
        features: the feature names, :data:`CONFIDENCE_FEATURES` when fitted here.
        mean, scale: per feature, the standardisation of the split it was fitted on.
        weights, bias: the regression's coefficients (on standardised features).
        fitted_on: ``"<dataset>:<split>"`` of the rows it was fitted on.
        num_images: rows it was fitted on; num_correct: those whose box was right.
        l2: the penalty used.
        model_ids: ``gtformer_sha256`` / ``sam_model`` of the rows it was fitted on: a confidence
            holds for the models that gave those scores.
    """

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    fitted_on: str = ""
    num_images: int = 0
    num_correct: int = 0
    l2: float = DEFAULT_L2
    model_ids: tuple[str, ...] = ()

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        correct: np.ndarray,
        *,
        l2: float = DEFAULT_L2,
        fitted_on: str = "",
        model_ids: Sequence[str] = (),
    ) -> ConfidenceModel:
        """Fit on features ``x`` ((N, F) from :func:`feature_matrix`; NaN rows are left out) and
        ``correct`` ((N,) bool: the box's IoU >= 0.5). With no right box or no wrong one among
        them, every weight is 0 and the confidence is the (smoothed) share of right boxes."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(correct, dtype=np.float64)
        usable = np.isfinite(x).all(axis=1)
        x, y = x[usable], y[usable]
        n, f = x.shape if x.ndim == 2 else (0, len(CONFIDENCE_FEATURES))
        mean = x.mean(axis=0) if n else np.zeros(f)
        scale = x.std(axis=0) if n else np.ones(f)
        scale = np.where(scale > 1e-12, scale, 1.0)
        positives = int(y.sum())
        w = np.zeros(f + 1)
        if 0 < positives < n:
            z = np.column_stack([np.ones(n), (x - mean) / scale])
            penalty = np.diag([0.0] + [l2] * f)
            for _ in range(_NEWTON_STEPS):
                p = _sigmoid(z @ w)
                gradient = z.T @ (p - y) + penalty @ w
                hessian = (z * (p * (1 - p))[:, None]).T @ z + penalty + 1e-9 * np.eye(f + 1)
                step = np.linalg.solve(hessian, gradient)
                w -= step
                if np.abs(step).max() < 1e-10:
                    break
        else:
            w[0] = math.log((positives + 1) / (n - positives + 1))
        return cls(
            features=tuple(CONFIDENCE_FEATURES),
            mean=tuple(float(v) for v in mean),
            scale=tuple(float(v) for v in scale),
            weights=tuple(float(v) for v in w[1:]),
            bias=float(w[0]),
            fitted_on=fitted_on,
            num_images=n,
            num_correct=positives,
            l2=l2,
            model_ids=tuple(sorted(model_ids)),
        )

    def predict(self, rows: pa.Table | pa.RecordBatch | Iterable[Mapping]) -> np.ndarray:
        """(N,) float64 confidences in [0, 1] of labels-table rows; NaN for a row without
        features (an error row)."""
        x = feature_matrix(rows)
        z = self.bias + ((x - np.asarray(self.mean)) / np.asarray(self.scale)) @ np.asarray(self.weights)
        return _sigmoid(z)

    def fill(self, table: pa.Table) -> pa.Table:
        """``table`` (labels rows) with its ``confidence`` column set (added where it lacks one;
        null for error rows)."""
        values = self.predict(table)
        column = pa.array(np.where(np.isnan(values), None, values).tolist(), LABEL_SCHEMA.field("confidence").type)
        if "confidence" in table.column_names:
            return table.set_column(table.column_names.index("confidence"), LABEL_SCHEMA.field("confidence"), column)
        return table.append_column(LABEL_SCHEMA.field("confidence"), column)

    def to_dict(self) -> dict:
        return {"kind": CALIBRATION_KIND, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping) -> ConfidenceModel:
        if data.get("kind") != CALIBRATION_KIND:
            raise ValueError(f"not a pro2sam confidence calibration (kind {data.get('kind')!r}, expected {CALIBRATION_KIND!r})")
        fields = {k: v for k, v in data.items() if k != "kind"}
        for key in ("features", "mean", "scale", "weights", "model_ids"):
            fields[key] = tuple(fields.get(key, ()))
        model = cls(**fields)
        if model.features != CONFIDENCE_FEATURES or not (len(model.mean) == len(model.scale) == len(model.weights) == len(model.features)):
            raise ValueError(f"the calibration's features {list(model.features)} are not {list(CONFIDENCE_FEATURES)}")
        return model

    def save(self, uri: str) -> None:
        """Write the calibration file (JSON), whole, to a local path or URI."""
        write_bytes_atomic(uri, (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    @classmethod
    def load(cls, uri: str) -> ConfidenceModel:
        """Read a calibration file written by :meth:`save`.

        Raises:
            ValueError: the file is not such a calibration.
        """
        try:
            data = json.loads(read_bytes(str(uri)))
        except json.JSONDecodeError as e:
            raise ValueError(f"confidence calibration {uri} is not JSON: {e}") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"confidence calibration {uri}: {e}") from None


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


# ---------------------------------------------------------------- how good a confidence is


def _ranked(scores: np.ndarray) -> np.ndarray:
    """Scores with NaN (no confidence) below every other, for ranking."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.where(np.isnan(scores), -np.inf, scores)


def auroc(scores: Sequence[float], correct: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for telling right boxes (``correct``) from wrong
    ones: the probability that a right one scores above a wrong one, ties counted half (the
    Mann-Whitney statistic). NaN scores rank lowest. None when either kind is missing."""
    s = _ranked(scores)
    y = np.asarray(correct, dtype=bool)
    positives, negatives = int(y.sum()), int((~y).sum())
    if not positives or not negatives:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1  # 1-based rank of each distinct value's first
    ranks = (first_rank + (counts - 1) / 2.0)[inverse]  # ties get the mean of their ranks
    return float((ranks[y].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def risk_coverage_curve(scores: Sequence[float], correct: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Coverage k/N and the accuracy (percent) of the k most confident images, k = 1..N.

    Returns:
        (coverage, accuracy): (N,) float64 each. Ties are broken by the input order; NaN scores
        come last.
    """
    y = np.asarray(correct, dtype=np.float64)
    order = np.argsort(-_ranked(scores), kind="stable")
    k = np.arange(1, len(y) + 1)
    return k / max(len(y), 1), 100.0 * np.cumsum(y[order]) / k


def risk_coverage(
    scores: Sequence[float], correct: Sequence[bool], coverages: Sequence[float] = RISK_COVERAGES
) -> dict[str, float | None]:
    """Accuracy (percent) of the most confident ``round(c * N)`` images for each coverage ``c``,
    keyed by the coverage in percent (``"80"``)."""
    coverage, accuracy = risk_coverage_curve(scores, correct)
    n = len(accuracy)
    out: dict[str, float | None] = {}
    for c in coverages:
        k = int(round(c * n))
        out[f"{100 * c:g}"] = float(accuracy[k - 1]) if k >= 1 else None
    return out


# ---------------------------------------------------------------- with the evaluation


def _correct(records: Sequence[Mapping]) -> np.ndarray:
    iou = [r.get("pro2sam_iou") for r in records]
    return np.array([v is not None and not math.isnan(v) and v >= LOC_IOU_THRESHOLD for v in iou], dtype=bool)


def _scored(records: Sequence[Mapping]) -> list[Mapping]:
    """The per-image records of images with GT boxes (those whose box can be right or wrong)."""
    return [r for r in records if r.get("gt_boxes_224") is not None or r.get("status") != STATUS_OK]


def calibrate(records: Sequence[Mapping], rows_by_uri: Mapping[str, Mapping], *, fitted_on: str, l2: float = DEFAULT_L2) -> ConfidenceModel:
    """Fit the confidence on a scored split: ``records`` are the per-image records of
    :func:`pro2sam.evaluation.evaluate_predictions` (their ``pro2sam_iou`` says whether the box
    is right), ``rows_by_uri`` the labels rows they were scored from."""
    records = _scored(records)
    rows = [rows_by_uri.get(r["uri"]) or {"status": "missing"} for r in records]
    model_ids = {v for row in rows for v in (row.get("gtformer_sha256"), row.get("sam_model")) if v}
    return ConfidenceModel.fit(feature_matrix(rows), _correct(records), l2=l2, fitted_on=fitted_on, model_ids=model_ids)


def score_confidence(model: ConfidenceModel, records: Sequence[Mapping], rows_by_uri: Mapping[str, Mapping]) -> dict:
    """How well ``model`` predicts the boxes of another scored split (same arguments as
    :func:`calibrate`); sets each record's ``confidence`` (None without one).

    Returns:
        ``num_images``, ``auroc``, ``risk_coverage`` (:func:`risk_coverage`, percent) and
        ``curve`` (``coverage`` and ``gt_known_loc``: the whole risk-coverage curve).
    """
    scored = _scored(records)
    rows = [rows_by_uri.get(r["uri"]) or {"status": "missing"} for r in scored]
    confidence = model.predict(rows)
    for record, value in zip(scored, confidence):
        record["confidence"] = None if np.isnan(value) else float(value)
    correct = _correct(scored)
    coverage, accuracy = risk_coverage_curve(confidence, correct)
    return {
        "num_images": len(scored),
        "auroc": auroc(confidence, correct),
        "risk_coverage": risk_coverage(confidence, correct),
        "curve": {"coverage": coverage.tolist(), "gt_known_loc": accuracy.tolist()},
    }
