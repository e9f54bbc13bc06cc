"""The models shipped in the package: present, intact, loaded through the official code paths, and
good at what they were trained for (on synthetic scenes neither model saw)."""

import importlib.util
import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from pro2sam import shipped
from pro2sam.candidates import CandidateConfig
from pro2sam.gtformer import load_gtformer
from pro2sam.metrics import mask_iou
from pro2sam.model import Pro2SAM
from pro2sam.sam import SAM_VARIANTS, build_sam
from pro2sam.synthetic import make_scene
from pro2sam.tuning import load_settings
from segment_anything import SamPredictor

REPO = Path(__file__).resolve().parents[1]
MAX_SHIPPED_BYTES = 25 * 1024 * 1024  # four models of 4.7-6.9 MB (two GTFormers since the object regime)
MAX_TRAINING_SECONDS = 30 * 60


@pytest.fixture(scope="module")
def test_scenes():
    # The test stream of the seed GTFormer was trained with: never seen by either model.
    return [make_scene(shipped.SYNTHETIC_SEED, "test", i) for i in range(20)]


@pytest.fixture(scope="module")
def model():
    return Pro2SAM.from_checkpoints(
        shipped.gtformer_dir(),
        sam=shipped.SAM_VARIANT,
        sam_checkpoint=shipped.sam_checkpoint(),
        candidates=CandidateConfig(points_per_side=16, **shipped.CANDIDATE_THRESHOLDS),
    )


def _script(name: str):
    """A script of scripts/ as a module, to parse a recorded command with its own parser."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _box_iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = ix * iy
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _lineage(record: dict) -> list[dict]:
    """A training record and its ancestors, each run fine-tuned (``--init``) from the next, whose
    record it carries under ``init_record``, down to the run that started from scratch."""
    chain = [record]
    while "init_record" in chain[-1]:
        child, parent = chain[-1], chain[-1]["init_record"]
        assert child["init_from"]["sha256"] == parent["sha256"], child["command"]
        chain.append(parent)
    return chain


def test_shipped_weights_are_small_and_match_their_recorded_hashes():
    files = [
        shipped.sam_checkpoint(), shipped.backbone_checkpoint(), *shipped.gtformer_dir().iterdir(),
        *shipped.gtformer_dir("object").iterdir(),
    ]  # fmt: skip
    assert sum(p.stat().st_size for p in files) <= MAX_SHIPPED_BYTES
    assert set(shipped.verify_shipped()) == {"gtformer", "gtformer_object", "sam", "sam_object", "backbone"}


def test_training_records_hold_the_commands_seeds_and_times():
    records = shipped.training_records()
    sam, gt = records["sam"], records["gtformer"]["extra"]
    assert "--seed" in sam["command"]
    # The recorded command still runs: the training script (moved to scripts/ since) takes its options.
    script = _script("train_sam_synthetic")
    argv = shlex.split(sam["command"])
    args = script.build_parser().parse_args(argv[argv.index("--variant"):])
    assert args.variant == shipped.SAM_VARIANT and args.seed == sam["seed"] and args.regimes == ["part"]
    assert sam["config"]["variant"] == shipped.SAM_VARIANT and sam["sha256"] == shipped.SHIPPED_SHA256["sam"]
    # fine-tuned (--init) from a SAM trained from scratch, whose record it carries
    lineage = _lineage(sam)
    assert Path(args.init).name == sam["init_from"]["file"]
    root = lineage[-1]
    assert root["what"].startswith("SAM synthetic trained from scratch") and "--seed" in root["command"]
    # runs on a shared 2-core machine, each under 35 minutes
    assert root["wall_seconds"] <= MAX_TRAINING_SECONDS and all(r["wall_seconds"] <= 35 * 60 for r in lineage[:-1])
    assert "train" in gt["command"] and gt["train_config"]["seed"] == 0
    assert gt["train_config"]["preset"] == records["gtformer"]["preset"] == "gtformer_synthetic_patch16_224"
    assert sum(epoch["seconds"] for epoch in gt["history"]) <= MAX_TRAINING_SECONDS


def test_the_backbone_record_holds_its_command_and_time_and_gtformer_was_fine_tuned_from_it():
    records = shipped.training_records()
    backbone, gt = records["backbone"], records["gtformer"]["extra"]
    script = _script("pretrain_backbone")
    argv = shlex.split(backbone["command"])
    args = script.build_parser().parse_args(argv[argv.index("--output"):])
    assert args.seed == backbone["settings"]["seed"] == 0
    assert backbone["train_wall_seconds"] + backbone["data"]["generation_seconds"] <= MAX_TRAINING_SECONDS
    assert backbone["sha256"] == shipped.SHIPPED_SHA256["backbone"]
    # GTFormer's classes are not among the pretraining classes (METHOD.md §5).
    assert not set(backbone["classes"]) & set(records["gtformer"]["class_names"])
    assert gt["train_config"]["backbone_checkpoint"].endswith("deit_backbone_synthetic.safetensors")
    assert "--backbone-checkpoint" in gt["command"]


def test_the_backbone_loads_through_the_deit_checkpoint_path():
    from pro2sam.gtformer import create_gtformer, load_backbone_checkpoint

    model = create_gtformer("gtformer_synthetic_patch16_224", num_classes=10)
    report = load_backbone_checkpoint(model, shipped.backbone_checkpoint())
    assert any(k.startswith("blocks.") for k in report.loaded) and "patch_embed.proj.weight" in report.loaded
    assert all(k.startswith(("global_embed.", "global_pos_embed", "head.")) for k in report.initialised)
    assert set(report.ignored) <= {"head.weight", "head.bias"}


def test_a_damaged_shipped_file_is_reported(tmp_path, monkeypatch):
    broken = tmp_path / "models"
    for regime in ("part", "object"):
        original = shipped.gtformer_dir(regime)
        (broken / original.name).mkdir(parents=True)
        for f in original.iterdir():
            (broken / original.name / f.name).write_bytes(f.read_bytes())
    for intact in (shipped.backbone_checkpoint(), shipped.sam_checkpoint("object")):
        (broken / intact.name).write_bytes(intact.read_bytes())
    data = bytearray(shipped.sam_checkpoint().read_bytes())
    data[-100] ^= 0xFF
    (broken / "sam_synthetic.pth").write_bytes(bytes(data))
    monkeypatch.setattr(shipped, "MODELS_DIR", broken)
    with pytest.raises(ValueError, match="damaged install"):
        shipped.verify_shipped()


def _clicked_body_ious(checkpoint, scenes) -> list[float]:
    """Per scene, the IoU with the object of the best of SAM's three masks for one click in the
    middle of the object's body, through segment_anything's own predictor, unchanged."""
    predictor = SamPredictor(build_sam(shipped.SAM_VARIANT, checkpoint))
    ious = []
    for scene in scenes:
        ys, xs = np.nonzero(scene.body_mask)
        k = len(xs) // 2
        predictor.set_image(scene.image)
        masks, _, _ = predictor.predict(point_coords=np.array([[xs[k], ys[k]]]), point_labels=np.array([1]))
        ious.append(max((m & scene.object_mask).sum() / (m | scene.object_mask).sum() for m in masks))
    return ious


def test_sam_loads_like_an_official_checkpoint_and_segments_a_clicked_object(test_scenes):
    assert np.median(_clicked_body_ious(shipped.sam_checkpoint(), test_scenes)) >= 0.7


def test_gtformer_tells_the_ten_classes_apart_by_their_small_part(test_scenes):
    # Fine-tuned from the pretrained backbone, it reads the part's colour and pattern (val top-1
    # 99.2%); see pro2sam/shipped/README.md. Chance is 0.1.
    gtformer, config = load_gtformer(shipped.gtformer_dir())
    assert config["preset"] == "gtformer_synthetic_patch16_224"
    model = Pro2SAM(gtformer, build_sam("tiny"), class_names=config["class_names"])
    probs, maps = model.classify([s.image for s in test_scenes])
    predicted, truth = probs.argmax(1), np.array([s.label for s in test_scenes])
    assert np.mean(predicted == truth) >= 0.9
    assert maps.shape == (len(test_scenes), 14, 14)


def _shipped_model(regime: str) -> Pro2SAM:
    """The regime's shipped GTFormer and SAM with the settings shipped beside them."""
    tuned = load_settings(str(shipped.settings_file(regime)))
    return Pro2SAM.from_checkpoints(
        shipped.gtformer_dir(regime), sam=shipped.SAM_VARIANT, sam_checkpoint=shipped.sam_checkpoint(regime),
        candidates=tuned.candidate_config(shipped.SAM_VARIANT), matching=tuned.match_config(),
    )  # fmt: skip


@pytest.mark.parametrize("regime", ["part", "object"])
def test_pro2sam_with_the_shipped_settings_boxes_the_whole_object(regime):
    model = _shipped_model(regime)
    scenes = [make_scene(shipped.SYNTHETIC_SEED, "test", i, regime=regime) for i in range(20)]
    results = model.predict([s.image for s in scenes])
    hits = [_box_iou(r.box_xyxy, s.box_xyxy) >= 0.5 for r, s in zip(results, scenes)]
    assert np.mean(hits) >= 0.8  # on 500 test images: part regime 92.8 %, object regime 99.2 % (2026-12-04)


def test_command_line_names_resolve_to_the_shipped_files():
    gtformer, sam, checkpoint = shipped.resolve_model_options("shipped", "synthetic", None)
    assert (gtformer, sam, checkpoint) == (str(shipped.gtformer_dir()), "synthetic", str(shipped.sam_checkpoint()))
    assert shipped.resolve_model_options("/models/gt", "vit_h", "sam.pth") == ("/models/gt", "vit_h", "sam.pth")
    assert shipped.resolve_model_options("shipped", "synthetic", "other.pth")[2] == "other.pth"


def test_the_shipped_sam_gets_its_own_filter_thresholds(model):
    config = model.candidate_config
    assert config.pred_iou_thresh == shipped.CANDIDATE_THRESHOLDS["pred_iou_thresh"]
    assert config.stability_score_thresh == shipped.CANDIDATE_THRESHOLDS["stability_score_thresh"]
    default = Pro2SAM.from_checkpoints(shipped.gtformer_dir(), sam="synthetic", sam_checkpoint=shipped.sam_checkpoint())
    assert default.candidate_config == CandidateConfig(points_per_side=16, **shipped.CANDIDATE_THRESHOLDS)
    assert not SAM_VARIANTS["vit_h"].filter_thresholds and not SAM_VARIANTS["tiny"].filter_thresholds


def test_label_options_fill_in_the_shipped_models_and_thresholds():
    from pro2sam.apps.cli import _labeling, build_parser

    args = build_parser().parse_args(["label", "--input", "in", "--output", "out", "--gtformer", "shipped", "--sam", "synthetic"])
    settings = _labeling(args)
    assert settings.gtformer == str(shipped.gtformer_dir())
    assert settings.sam_checkpoint == str(shipped.sam_checkpoint())
    assert settings.candidate_config().pred_iou_thresh == shipped.CANDIDATE_THRESHOLDS["pred_iou_thresh"]


# ---------------------------------------------------------------- the object regime's GTFormer


@pytest.fixture(scope="module")
def object_scenes():
    return [make_scene(shipped.SYNTHETIC_SEED, "test", i, regime="object") for i in range(20)]


def test_the_object_regime_gtformer_was_fine_tuned_from_the_backbone_on_object_regime_data():
    record = shipped.training_records()["gtformer_object"]
    extra = record["extra"]
    assert record["preset"] == "gtformer_synthetic_patch16_224"
    assert record["class_names"] == shipped.training_records()["gtformer"]["class_names"]
    assert extra["train_config"]["seed"] == 0 and "--backbone-checkpoint" in extra["command"]
    assert extra["train_config"]["backbone_checkpoint"].endswith("deit_backbone_synthetic.safetensors")
    assert sum(epoch["seconds"] for epoch in extra["history"]) <= MAX_TRAINING_SECONDS
    assert extra["training_data"]["regime"] == "object"


@pytest.mark.parametrize("regime", ["part", "object"])
def test_each_regimes_settings_were_chosen_with_the_models_shipped_beside_them(regime):
    models = json.loads(shipped.settings_file(regime).read_text())["models"]
    sam_key, gtformer_key = ("sam", "gtformer") if regime == "part" else ("sam_object", "gtformer_object")
    assert models["sam"] == f"{shipped.SAM_VARIANT}:{shipped.SHIPPED_SHA256[sam_key]}"
    assert models["gtformer"] == shipped.SHIPPED_SHA256[gtformer_key]


def test_unknown_regime_has_no_shipped_gtformer_or_sam():
    with pytest.raises(ValueError, match="regime"):
        shipped.gtformer_dir("plumage")
    with pytest.raises(ValueError, match="regime"):
        shipped.sam_checkpoint("plumage")


def test_the_object_regime_sam_was_fine_tuned_from_the_same_parent_on_object_regime_scenes():
    records = shipped.training_records()
    record = records["sam_object"]
    # the same root as the part regime's SAM: one SAM trained from scratch, fine-tuned per regime
    lineage = _lineage(record)
    assert lineage[-1] == _lineage(records["sam"])[-1]
    assert all(r["config"]["regimes"] == ["object"] for r in lineage[:-1])
    assert record["sha256"] == shipped.SHIPPED_SHA256["sam_object"] and record["weights"] == shipped.sam_checkpoint("object").name
    # the recorded command still runs, and says what the record says
    argv = shlex.split(record["command"])
    args = _script("train_sam_synthetic").build_parser().parse_args(argv[argv.index("--variant"):])
    assert (args.variant, args.seed, args.regimes) == (shipped.SAM_VARIANT, record["seed"], ["object"])
    assert Path(args.init).name == record["init_from"]["file"]
    assert all(r["wall_seconds"] <= 35 * 60 for r in lineage[:-1])  # shared 2-core machine, beside the part regime's


def test_the_object_regime_sam_segments_a_clicked_object_on_its_support(object_scenes):
    ious = _clicked_body_ious(shipped.sam_checkpoint("object"), object_scenes)
    assert np.median(ious) >= 0.88  # the part-world SAM they share: 0.81 on these scenes; this one 0.94 (0.93 before its 900 more steps)


def test_the_object_regime_gtformer_classifies_and_its_map_covers_the_object(object_scenes):
    import cv2

    gtformer, config = load_gtformer(shipped.gtformer_dir("object"))
    model = Pro2SAM(gtformer, build_sam("tiny"), class_names=config["class_names"])
    probs, maps = model.classify([s.image for s in object_scenes])
    assert np.mean(probs.argmax(1) == np.array([s.label for s in object_scenes])) >= 0.9
    # the map is brighter on the object's body than on its support: it lights the object, not the scene
    inside, support = [], []
    for s, m in zip(object_scenes, maps):
        up = cv2.resize(m.astype(np.float32), s.size, interpolation=cv2.INTER_LINEAR)
        inside.append(up[s.body_mask].mean())
        support.append(up[s.support_mask].mean())
    assert np.mean(np.array(inside) > np.array(support)) >= 0.9


def _choose_both(scenes, **models: Pro2SAM) -> dict:
    """Name -> each model's results on the scenes: GTFormer and SAM once per image (the first
    model's; they share them), every model matching the same candidates."""
    first = next(iter(models.values()))
    images = [s.image for s in scenes]
    probs, maps = first.classify(images)
    found = [first.generator.generate(image, coarse_map=c) for image, c in zip(images, maps)]
    return {name: [m.choose(image, p, c, f) for image, p, c, f in zip(images, probs, maps, found)] for name, m in models.items()}


def test_the_object_regime_settings_shed_the_containers_the_authors_rule_picks():
    """Five seed-0 test scenes of the object regime where, with the shipped object GTFormer and
    SAM, the authors' plain IoU picks a mask whose box misses the object's (IoU < 0.5): object +
    support containers, or the object with a stray piece on its support (found by a scan of the 500
    test scenes with the SAM shipped on 2026-12-04: these five are all the scenes where the two rules
    differ; plain IoU hits 98.4 %, the settings 99.4 %). Container-to-object, which the object
    regime's settings file turns on, takes the object inside instead."""
    from dataclasses import replace

    model = _shipped_model("object")
    assert model.match_config.container_to_object
    plain = model.with_settings(matching=replace(model.match_config, container_to_object=False))
    scenes = [make_scene(shipped.SYNTHETIC_SEED, "test", i, regime="object") for i in (39, 118, 141, 290, 456)]
    chosen = _choose_both(scenes, plain=plain, tuned=model)
    hits = {name: [_box_iou(r.box_xyxy, s.box_xyxy) >= 0.5 for r, s in zip(rs, scenes)] for name, rs in chosen.items()}
    assert sum(hits["plain"]) <= 1 and sum(hits["tuned"]) >= 4, hits
    # the object inside the container: within the plain choice, a fraction of its area (measured
    # 0.27-0.62), and a mask much closer to the object's (mean IoU 0.84 against 0.41)
    inside = [(t.mask & p.mask).sum() >= 0.9 * t.mask.sum() and t.mask.sum() <= 0.7 * p.mask.sum()
              for t, p in zip(chosen["tuned"], chosen["plain"])]  # fmt: skip
    assert sum(inside) >= 4, inside
    iou = {name: np.mean([mask_iou(r.mask, s.object_mask) for r, s in zip(rs, scenes)]) for name, rs in chosen.items()}
    assert iou["tuned"] >= iou["plain"] + 0.25, iou


def test_the_part_regime_settings_keep_the_class_part_sam_split_from_the_body():
    """Five seed-0 test scenes of the part regime where, with the shipped part GTFormer and SAM and
    the part regime's settings, the chosen mask holds the class part only with part absorption on
    (found by a scan of the 500 test scenes: these five are all the scenes it gains, it loses none,
    and it moves no box). SAM's grid gave the object's body without the part at its edge; the part,
    lit by the map, lies inside the body's box."""
    from dataclasses import replace

    model = _shipped_model("part")
    assert model.match_config.absorb_parts
    without = model.with_settings(matching=replace(model.match_config, absorb_parts=False))
    scenes = [make_scene(shipped.SYNTHETIC_SEED, "test", i, regime="part") for i in (60, 85, 273, 326, 334)]
    chosen = _choose_both(scenes, without=without, tuned=model)
    held = {name: [(r.mask & s.part_mask).sum() >= 0.5 * s.part_mask.sum() for r, s in zip(rs, scenes)] for name, rs in chosen.items()}
    assert sum(held["without"]) <= 1 and sum(held["tuned"]) >= 4, held
    # the same box (the part lies inside it); the mask the body's with the part added
    assert all(t.box_xyxy == w.box_xyxy for t, w in zip(chosen["tuned"], chosen["without"]))
    assert all((t.mask & w.mask).sum() == w.mask.sum() and t.mask.sum() > w.mask.sum() for t, w in zip(chosen["tuned"], chosen["without"]))
    iou = {name: np.mean([mask_iou(r.mask, s.object_mask) for r, s in zip(rs, scenes)]) for name, rs in chosen.items()}
    assert iou["tuned"] > iou["without"], iou
