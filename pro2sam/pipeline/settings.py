"""The settings of the Ray jobs (label, evaluate, tune), in one place: what each run is given.

    LabelingSettings: the models, the library's candidate and matching settings,
        Resources (the actors' share of the cluster) and ReadLimits (per-image read limits)
    LabelJobConfig / EvaluateJobConfig / TuneJobConfig: one run of each job, around them

The command line reads its option defaults from these dataclasses; each ``validate`` names the
option of a setting no run could use. :meth:`Resources.resolve` is the one place that turns the
settings and the cluster into what the actors take (:class:`ActorResources`).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..candidates import CandidateConfig
from ..classifier import ClassifierConfig
from ..evaluation import DEFAULT_CAM_CURVE_INTERVAL
from ..images import DEFAULT_MAX_PIXELS
from ..inputs import DEFAULT_SHARD_LABEL, is_manifest
from ..matching import MatchConfig
from ..output import COMMIT_SECONDS, ROWS_PER_FILE
from ..sam import DEFAULT_SAM_VARIANT, SAM_VARIANTS
from ..storage import DEFAULT_MAX_BYTES, DEFAULT_READ_TIMEOUT_S, join_uri, location_contains
from ..tuning import GRIDS, OBJECTIVE, OBJECTIVES, TunedSettings

if TYPE_CHECKING:
    from .ray_env import RayCluster

__all__ = [
    "Resources",
    "ActorResources",
    "ReadLimits",
    "LabelingSettings",
    "LabelJobConfig",
    "EvaluateJobConfig",
    "TuneJobConfig",
]

log = logging.getLogger("pro2sam.resources")

# How long the resource check waits for Ray's first autoscaler status before it asks for nodes.
_FIRST_STATUS_S = 10.0


@dataclass(frozen=True)
class ActorResources:
    """What a job's actors take, worked out for one cluster by :meth:`Resources.resolve`.

    Attributes:
        actors: the most actors of the pool (it starts with one on a cluster and grows to this).
        gpus_per_actor, cpus_per_actor: what each actor pins; its torch threads follow the CPUs.
    """

    actors: int
    gpus_per_actor: float
    cpus_per_actor: float

    @property
    def concurrency(self) -> int | tuple[int, int]:
        """Ray Data's ``concurrency`` of the actor pool: one actor, or a pool that grows from one
        to ``actors`` as an autoscaler adds nodes."""
        return self.actors if self.actors == 1 else (1, self.actors)


@dataclass(kw_only=True)
class Resources:
    """What the labeling actors take from the cluster.

    Attributes:
        actors: labeling actors (default: one per GPU of the cluster, else 1); on a cluster the
            pool starts with one and grows to this many as nodes arrive.
        gpus_per_actor: GPUs pinned by each actor (default 1 when the cluster has GPUs, else 0).
        cpus_per_actor: CPUs (and torch threads) per actor (default 1 with a GPU, else 2).
        batch_size: images per model batch.
        ray_address: Ray cluster to join; default $RAY_ADDRESS, else a new local Ray.
        wait_for_resources_s: how long a run on a cluster waits for its first actor's CPUs/GPUs
            (an autoscaler adding nodes) before it gives up; a local Ray never grows, nor does a
            cluster Ray says has no autoscaler, so neither is waited for.

    The same settings serve the labeling actors of ``label`` and ``tune`` and the classifier
    actor of ``evaluate`` (one actor); :meth:`resolve` fills in the defaults for a cluster.
    """

    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    batch_size: int = 8
    ray_address: str | None = None
    wait_for_resources_s: float = 600.0

    @property
    def local_cpus(self) -> float:
        """The logical CPUs a local Ray needs for these settings at their defaults: every actor's
        CPUs plus one for reading and decoding (:func:`~pro2sam.pipeline.ray_env.ensure_ray`)."""
        return (self.actors or 1) * (self.cpus_per_actor or 2) + 1

    def resolve(self, cluster: RayCluster, *, what: str = "labeling") -> ActorResources:
        """The actors' resources on ``cluster``: the defaults filled in from what it has, a CPU
        actor's default fitted to a small cluster, and, on a cluster that can grow, the
        autoscaler asked for what is missing and waited for (up to ``wait_for_resources_s``).
        A local Ray, and a cluster that Ray says has no autoscaler
        (:meth:`~pro2sam.pipeline.ray_env.RayCluster.can_grow`), are not waited for.
        ``what`` names the actors in messages ("labeling", "classifier").

        Raises:
            ValueError: the cluster cannot give what the settings ask for (one line, naming the
                options that change it).
        """
        have = cluster.resources()
        cluster_gpus = have.get("GPU", 0)
        gpus = self.gpus_per_actor if self.gpus_per_actor is not None else (1 if cluster_gpus else 0)
        actors = self.actors or (max(1, int(cluster_gpus // gpus)) if gpus and cluster_gpus else 1)
        cpus = self.cpus_per_actor if self.cpus_per_actor is not None else (1 if gpus else 2)
        # The actors' CPUs plus one for reading and decoding, or the pipeline starves. A local Ray
        # must fit every actor; a cluster must fit one to start, and the actor pool grows with it.
        starting = actors if cluster.local else 1
        if self.cpus_per_actor is None and not gpus and starting * cpus + 1 > have.get("CPU", 0) >= starting + 1:
            # A CPU actor's default (2) fitted to a small machine or cluster rather than waited for:
            # what --cpus-per-actor 1 would do at once.
            cpus = float(int((have["CPU"] - 1) // starting))
            log.info("the cluster has %g CPUs: %g CPU(s) per %s actor (--cpus-per-actor to choose)", have["CPU"], cpus, what)
        need = {"CPU": starting * cpus + 1, "GPU": starting * gpus}
        if not gpus and not cluster_gpus and self.gpus_per_actor is None and not cluster.local:
            log.warning(
                "the cluster has no GPU now: %s with %d CPU actor(s). On an autoscaling GPU cluster pass "
                "--gpus-per-actor 1 --actors N, so that the job asks for the GPU nodes", what, actors,
            )  # fmt: skip

        def missing() -> dict[str, float]:
            now = cluster.resources()
            return {k: v for k, v in need.items() if v > now.get(k, 0)}

        def explain(lack: dict[str, float]) -> str:
            now = cluster.resources()
            parts = [f"{need[k]:g} {k} (the cluster has {now.get(k, 0):g})" for k in lack]
            return (
                f"{'--actors ' + str(actors) if cluster.local else 'one actor'} x (--cpus-per-actor {cpus:g}, "
                f"--gpus-per-actor {gpus:g}) plus 1 CPU for decoding needs {' and '.join(parts)}"
            )

        def fixed(lack: dict[str, float]) -> ValueError:
            # What one actor gets of a cluster that never grows (never all of it: 1 CPU decodes).
            now = cluster.resources()
            fixes = []
            if "CPU" in lack:
                fit = int((now.get("CPU", 0) - 1) // starting)
                fixes.append(f"pass --cpus-per-actor {fit}" if fit >= 1 else "join a cluster of 2 CPUs or more")
            if "GPU" in lack:
                fixes.append(f"pass --gpus-per-actor {now.get('GPU', 0) / starting:g}")
            return ValueError(f"{explain(lack)}, and it has no autoscaler to add them: {' and '.join(fixes)}")

        lack = missing()
        if lack and (cluster.local or self.wait_for_resources_s == 0):
            where = "this machine's Ray" if cluster.local else "the cluster"
            raise ValueError(f"{explain(lack)}: {where} cannot run it; ask for fewer actors or resources")
        if lack:
            # Ray's monitor publishes its first status a moment after the cluster starts: give it
            # a few seconds to say whether an autoscaler exists before asking one.
            grows, settle = cluster.can_grow(), time.monotonic() + _FIRST_STATUS_S
            while grows is None and time.monotonic() < settle:
                time.sleep(0.5)
                grows = cluster.can_grow()
            if grows is False:  # waiting would wait for nothing
                raise fixed(lack)
        if lack:
            bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
            cluster.request_resources([bundle] * actors)
            log.warning("%s; asked the autoscaler, waiting up to %.0f s", explain(lack), self.wait_for_resources_s)
            deadline = time.monotonic() + self.wait_for_resources_s
            next_note = time.monotonic() + 30
            while (lack := missing()) and time.monotonic() < deadline:
                time.sleep(1.0)
                if cluster.can_grow() is False:  # Ray said so only now (its first status)
                    raise fixed(lack)
                if time.monotonic() > next_note:
                    log.warning("still waiting for resources: %s", explain(lack))
                    next_note += 30
            if lack:
                raise ValueError(
                    f"{explain(lack)}, and it did not grow in {self.wait_for_resources_s:.0f} s "
                    "(--wait-for-resources): ask for fewer actors or resources, or check the autoscaler's node types"
                )
        return ActorResources(actors=actors, gpus_per_actor=gpus, cpus_per_actor=cpus)


    def validate(self) -> None:
        _need(self.actors is None or self.actors >= 1, f"--actors {self.actors}: must be >= 1")
        _need(self.gpus_per_actor is None or self.gpus_per_actor >= 0, f"--gpus-per-actor {self.gpus_per_actor}: must be >= 0")
        _need(self.cpus_per_actor is None or self.cpus_per_actor > 0, f"--cpus-per-actor {self.cpus_per_actor}: must be > 0")
        _need(self.batch_size >= 1, f"--batch-size {self.batch_size}: must be >= 1")
        _need(self.wait_for_resources_s >= 0, f"--wait-for-resources {self.wait_for_resources_s}: must be >= 0")


@dataclass(kw_only=True)
class ReadLimits:
    """Per-image limits of the read and decode stages: larger or slower inputs become error rows.

    Attributes:
        max_pixels: decompression-bomb guard (pixels after decoding the header).
        max_bytes: largest file read.
        read_timeout_s: longest read of one file.
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S

    def validate(self) -> None:
        _need(self.max_pixels >= 1, f"--max-pixels {self.max_pixels}: must be >= 1")
        _need(self.max_bytes >= 1, f"--max-bytes {self.max_bytes}: must be >= 1")
        _need(self.read_timeout_s > 0, f"--read-timeout {self.read_timeout_s}: must be > 0")


@dataclass(kw_only=True)
class LabelingSettings:
    """How images are labeled: the models, the library's candidate and matching settings, the
    actors' resources and the read limits (shared by the labeling and evaluation jobs).

    Attributes:
        gtformer: GTFormer export folder (model.safetensors + config.json), local or URI.
        sam, sam_checkpoint, verify: SAM variant, its weights file (local or URI), SHA-256 check
            of official files.
        candidates: stage 2 (:class:`~pro2sam.candidates.CandidateConfig`); None: the
            defaults with the SAM variant's own filter thresholds and grid (``CandidateConfig.resolve``).
        matching: stage 3 (:class:`~pro2sam.matching.MatchConfig`).
        resources: :class:`Resources`; limits: :class:`ReadLimits`.
        confidence_calibration: a calibration file of ``pro2sam evaluate`` (``confidence.json``,
            local or URI): rows get a ``confidence`` (:mod:`pro2sam.confidence`); None: the
            calibration of ``tuned`` if it has one, else null.
        tuned: the settings file of ``pro2sam tune`` these settings were read from
            (:class:`~pro2sam.tuning.TunedSettings`; its values are already in ``candidates`` and
            ``matching``, where the command line did not override them): every row carries its
            SHA-256 (``settings_sha256``). None: no settings file.
    """

    gtformer: str
    sam: str = DEFAULT_SAM_VARIANT
    sam_checkpoint: str | None = None
    verify: bool = True
    candidates: CandidateConfig | None = None
    matching: MatchConfig = field(default_factory=MatchConfig)
    resources: Resources = field(default_factory=Resources)
    limits: ReadLimits = field(default_factory=ReadLimits)
    confidence_calibration: str | None = None
    tuned: TunedSettings | None = None

    @property
    def settings_sha256(self) -> str | None:
        return self.tuned.sha256 if self.tuned is not None else None

    def candidate_config(self) -> CandidateConfig:
        return CandidateConfig.resolve(self.sam, self.candidates)

    def validate(self) -> None:
        """Raise ValueError, naming the option, for a setting no run could use."""
        _need(self.sam in SAM_VARIANTS, f"--sam {self.sam!r}: choose one of {', '.join(sorted(SAM_VARIANTS))}")
        self.resources.validate()
        self.limits.validate()


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(kw_only=True)
class LabelJobConfig:
    """Everything a labeling run needs. Paths may be local or any fsspec URI.

    Attributes:
        input: image prefix (folder), a manifest (a .csv / .parquet file, the suffix in any case,
            with ``uri`` and optional ``label``; its images may not lie in ``output``), a
            WebDataset shard, a folder or brace pattern of shards, a Parquet table of image bytes,
            or one image file (:func:`pro2sam.inputs.iter_inputs` says how it is told).
        output: folder (prefix) the Parquet files go to; also what resumes.
        labeling: :class:`LabelingSettings`.
        run_id: written into every row of this run.
        overwrite: replace the output's label files (only those) instead of resuming.
        force: take the output's lease even if another run holds it.
        retry_errors: relabel every error row (by default only read failures are relabeled).
        relabel_changed: relabel images whose file changed (size, mtime or ETag) since; a
            manifest's files are then looked up as they are listed (a stat each, a HEAD per object).
        shard_label: the member of a WebDataset sample its label is read from (``cls``, ``txt``,
            ``json:FIELD``), None for none.
        rows_per_file, commit_seconds: a label file is committed at this many rows, or this long
            after its first row, whichever comes first; a kill loses at most the rows not yet
            committed.
        lease_ttl_s: how long the output's lease lives without a renewal (:mod:`pro2sam.lease`).
    """

    input: str
    output: str
    labeling: LabelingSettings
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8])
    overwrite: bool = False
    force: bool = False
    retry_errors: bool = False
    relabel_changed: bool = False
    shard_label: str | None = DEFAULT_SHARD_LABEL
    rows_per_file: int = ROWS_PER_FILE
    commit_seconds: float = COMMIT_SECONDS
    lease_ttl_s: float = 60.0

    def validate(self) -> None:
        self.labeling.validate()
        _need(self.rows_per_file >= 1, f"--rows-per-file {self.rows_per_file}: must be >= 1")
        _need(self.commit_seconds > 0, f"--commit-seconds {self.commit_seconds}: must be > 0")
        _need(self.lease_ttl_s > 0, f"--lease-ttl {self.lease_ttl_s}: must be > 0")
        # A manifest may sit in the output folder (it is read, never written); a folder or an image
        # may not. What the input is decides, not its name: a folder named x.csv is a folder.
        _need(
            not location_contains(self.output, self.input) or is_manifest(self.input),
            f"--output {self.output} is or contains --input {self.input}: the labels would mix with the "
            "images; choose an output outside the input",
        )


@dataclass(kw_only=True)
class EvaluateJobConfig:
    """Settings of one evaluation run.

    Attributes:
        test: data-set spec of the split reported (:func:`pro2sam.datasets.open_dataset`).
        heldout: data-set spec of the split thresholds are chosen on (never the test split).
        output: output folder, local or fsspec URI; a rerun resumes the labeling.
        labeling: how the images are labeled (:class:`LabelingSettings`);
            its resources and read limits serve the classifier too.
        classifier: a separate classifier for the class scores
            (:class:`~pro2sam.classifier.ClassifierConfig`); None: GTFormer's.
        overwrite: label again from scratch instead of resuming.
        cam_curve_interval: step of the tau grid.
        overlays: how many overlay PNGs (half best, half worst).
    """

    test: str
    heldout: str
    output: str
    labeling: LabelingSettings
    classifier: ClassifierConfig | None = None
    overwrite: bool = False
    cam_curve_interval: float = DEFAULT_CAM_CURVE_INTERVAL
    overlays: int = 6

    def label_config(self) -> LabelJobConfig:
        return LabelJobConfig(
            input=join_uri(self.output, "manifests/inputs.parquet"),
            output=join_uri(self.output, "labels"),
            labeling=self.labeling,
            overwrite=self.overwrite,
        )


@dataclass(kw_only=True)
class TuneJobConfig:
    """Settings of one tuning run.

    Attributes:
        heldout: data-set spec of the held-out split with boxes (:func:`pro2sam.datasets.open_dataset`:
            ``cub:``, ``ilsvrc:``, ``wsol:``, a boxed manifest ``.csv``/``.parquet``, ``coco:FILE.json``).
        output: the settings file to write (local or URI).
        labeling: the base settings (models, candidates, matching, resources, read limits); the
            grid varies them, and they are always among the settings tried.
        grid: name in :data:`pro2sam.tuning.GRIDS`.
        images_root: folder of a COCO file's images (default: the JSON's folder).
        calibrate_confidence: fit the confidence on the chosen setting's held-out rows.
        objective: what the choice maximises, a key of :data:`pro2sam.tuning.OBJECTIVES`
            (``miou`` needs held-out masks).
    """

    heldout: str
    output: str
    labeling: LabelingSettings
    grid: str = "small"
    images_root: str | None = None
    calibrate_confidence: bool = True
    objective: str = OBJECTIVE

    def validate(self) -> None:
        if self.grid not in GRIDS:
            raise ValueError(f"--grid {self.grid!r}: choose one of {', '.join(GRIDS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        self.labeling.validate()


