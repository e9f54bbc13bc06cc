"""GTFormer: Global-Token Attention, global thumbnails, losses, presets and checkpoints."""

import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import Block

from pro2sam.checkpoints import CheckpointError
from pro2sam.gtformer import (
    GTFORMER_PRESETS,
    GTFormerSettings,
    area_loss,
    GTBlock,
    GTFormerOutput,
    create_gtformer,
    global_thumbnails,
    gtformer_loss,
    load_gtformer,
    norm_blur_kernel,
    save_gtformer,
)

NUM_CLASSES = 5
# gtformer_test_tiny's backbone as a timm ViT / DeiT.
TINY_BACKBONE = dict(embed_dim=48, depth=4, num_heads=3)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return create_gtformer("gtformer_test_tiny", num_classes=NUM_CLASSES).eval()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 224, 224)


# --------------------------------------------------------------------------------------------
# Attention


def naive_block(block, x, *, gated):
    """The block's formula with explicit loops over batch, heads and tokens (float64 numpy)."""
    p = {k: v.detach().double().numpy() for k, v in block.state_dict().items()}
    x = x.detach().double().numpy()
    num_heads, num_global = block.attn.num_heads, 4
    batch, n, dim = x.shape
    d = dim // num_heads

    def layer_norm(t, w, b):
        mu = t.mean(-1, keepdims=True)
        var = ((t - mu) ** 2).mean(-1, keepdims=True)
        return (t - mu) / np.sqrt(var + 1e-6) * w + b

    y = layer_norm(x, p["norm1.weight"], p["norm1.bias"])
    qkv = y @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]
    q, k, v = qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]
    logits = np.zeros((batch, num_heads, n, n))
    for b in range(batch):
        for h in range(num_heads):
            for i in range(n):
                for j in range(n):
                    logits[b, h, i, j] = q[b, i, h * d : (h + 1) * d] @ k[b, j, h * d : (h + 1) * d] / math.sqrt(d)
    m_k = np.zeros((batch, num_global, n))
    for b in range(batch):
        for g in range(num_global):
            row = n - num_global + g
            for j in range(n):
                m_k[b, g, j] = 1 / (1 + math.exp(-np.mean(logits[b, :, row, j])))
    m = m_k.mean(axis=1)
    attended = np.zeros((batch, n, dim))
    for b in range(batch):
        for h in range(num_heads):
            for i in range(n):
                weights = np.exp(logits[b, h, i] - logits[b, h, i].max())
                weights /= weights.sum()
                if gated:
                    weights = weights * m[b]  # column j times m_j, no renormalisation
                attended[b, i, h * d : (h + 1) * d] = weights @ v[b, :, h * d : (h + 1) * d]
    x = x + attended @ p["attn.proj.weight"].T + p["attn.proj.bias"]
    z = layer_norm(x, p["norm2.weight"], p["norm2.bias"]) @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]
    z = 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))  # exact GELU
    x = x + z @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    return x, m_k, m


@pytest.mark.parametrize("fused", [True, False], ids=["fused_kernel", "explicit_softmax"])
def test_global_aware_block_matches_the_gta_formula(fused):
    torch.manual_seed(0)
    block = GTBlock(dim=12, num_heads=3, qkv_bias=True, depth=0, first_global_block=0).eval()
    block.attn.fused_attn = fused
    x = torch.randn(2, 1 + 4 + 4, 12)  # class, 2x2 patches, 4 global tokens
    out, m_k = block(x)
    expected_out, expected_m_k, expected_m = naive_block(block, x, gated=True)
    assert block.global_aware
    np.testing.assert_allclose(out.detach().numpy(), expected_out, atol=1e-5)
    np.testing.assert_allclose(m_k.detach().numpy(), expected_m_k, atol=1e-6)
    np.testing.assert_allclose(m_k.mean(1).detach().numpy(), expected_m, atol=1e-6)


def test_plain_block_attends_like_timm_block_and_still_reports_global_maps():
    torch.manual_seed(0)
    block = GTBlock(dim=12, num_heads=3, qkv_bias=True, depth=0, first_global_block=1).eval()
    reference = Block(dim=12, num_heads=3, qkv_bias=True).eval()
    reference.load_state_dict(block.state_dict())
    x = torch.randn(2, 9, 12)
    out, m_k = block(x)
    _, expected_m_k, _ = naive_block(block, x, gated=False)
    assert not block.global_aware
    torch.testing.assert_close(out, reference(x))
    np.testing.assert_allclose(m_k.detach().numpy(), expected_m_k, atol=1e-6)


def test_only_the_last_num_global_blocks_are_global_aware():
    model = create_gtformer("gtformer_test_tiny", num_classes=2, num_global_blocks=2)
    assert [b.global_aware for b in model.blocks] == [False, False, True, True]


# --------------------------------------------------------------------------------------------
# Global tokens


def test_global_thumbnails_follow_pixel_unshuffle_phase_order():
    # A 2p x 2p input is not resized, so the thumbnails are exactly its four phases.
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    thumbs = global_thumbnails(x, patch_size=4)
    assert thumbs.shape == (2, 4, 3, 4, 4)
    for k, (row0, col0) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        for r in range(4):
            for c in range(4):
                assert thumbs[1, k, 2, r, c] == x[1, 2, row0 + 2 * r, col0 + 2 * c]


def test_every_global_thumbnail_sees_the_whole_image():
    x = torch.zeros(1, 3, 224, 224)
    x[..., 112:, 112:] = 1.0  # object in the bottom-right quadrant
    thumbs = global_thumbnails(x, patch_size=16)
    assert thumbs.shape == (1, 4, 3, 16, 16)
    for k in range(4):
        assert torch.all(thumbs[0, k, :, 9:, 9:] == 1) and torch.all(thumbs[0, k, :, :7, :] == 0)
        assert torch.all(thumbs[0, k, :, :, :7] == 0)


def test_each_global_token_is_its_own_projection_of_its_thumbnail(tiny, images):
    embed = tiny.global_embed
    thumbs = global_thumbnails(images, patch_size=16)
    tokens = embed(images)
    for k in range(4):
        torch.testing.assert_close(tokens[:, k], embed.proj[k](thumbs[:, k]).flatten(1))


def test_all_four_global_projections_are_distinct_and_receive_gradients(tiny, images):
    tiny.train()
    total, _ = gtformer_loss(tiny(images), torch.tensor([0, 3]))
    total.backward()
    projections = list(tiny.global_embed.proj)
    assert len({id(p) for p in projections}) == 4
    assert len({p.weight.data_ptr() for p in projections}) == 4
    for proj in projections:
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert tiny.global_pos_embed.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# Losses


def authors_kernel(kernlen=3, nsig=6.0):
    """The authors' get_kernel, written out with math.erf: normal-CDF mass of kernlen bins over
    [-nsig - i/2, nsig + i/2], i = (2 nsig + 1) / kernlen; sqrt of the outer product; sum 1."""
    interval = (2 * nsig + 1) / kernlen
    lo, hi = -nsig - interval / 2, nsig + interval / 2
    edges = [lo + (hi - lo) * t / kernlen for t in range(kernlen + 1)]
    cdf = [0.5 * (1 + math.erf(e / math.sqrt(2))) for e in edges]
    mass = [cdf[t + 1] - cdf[t] for t in range(kernlen)]
    kernel = np.array([[math.sqrt(a * b) for b in mass] for a in mass])
    return kernel / kernel.sum()


def test_norm_blur_is_the_authors_nearly_identity_kernel():
    expected = authors_kernel()
    # METHOD.md: about 0.805 centre, 0.046 edge, 0.0026 corner (not a wide Gaussian, not a box).
    assert expected[1, 1] == pytest.approx(0.805, abs=5e-4)
    assert expected[0, 1] == pytest.approx(0.046, abs=5e-4)
    assert expected[0, 0] == pytest.approx(0.0026, abs=5e-5)
    np.testing.assert_allclose(norm_blur_kernel(dtype=torch.float64).numpy(), expected, rtol=1e-12, atol=1e-15)


def test_loss_terms_equal_hand_computed_values():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3))
    targets = [2, 0]
    global_maps = rng.uniform(size=(2, 4, 3, 3))
    coarse = global_maps.mean(axis=1)
    tau = 0.3
    output = GTFormerOutput(
        torch.tensor(logits, dtype=torch.float32),
        torch.tensor(coarse, dtype=torch.float32),
        torch.tensor(global_maps, dtype=torch.float32),
        torch.empty(0),
    )
    total, terms = gtformer_loss(output, torch.tensor(targets), tau=tau, area_weight=1.0, global_weight=0.5)

    ce = np.mean([-(logits[b, t] - math.log(sum(math.exp(v) for v in logits[b]))) for b, t in enumerate(targets)])
    kernel = authors_kernel()

    def area(m):
        return abs(m.mean() - tau)

    def norm(m):  # m: (B, h, w); blur with zero padding by explicit loops
        values = []
        for b in range(m.shape[0]):
            for i in range(3):
                for j in range(3):
                    g = sum(
                        kernel[di + 1, dj + 1] * m[b, i + di, j + dj]
                        for di in (-1, 0, 1)
                        for dj in (-1, 0, 1)
                        if 0 <= i + di < 3 and 0 <= j + dj < 3
                    )
                    values.append(g * (1 - g))
        return np.mean(values)

    expected = {"ce": ce, "area_coarse": area(coarse), "norm_coarse": norm(coarse)}
    for k in range(4):
        expected[f"area_global{k}"] = area(global_maps[:, k])
        expected[f"norm_global{k}"] = norm(global_maps[:, k])
    expected_total = ce + expected["area_coarse"] + expected["norm_coarse"] + 0.5 * sum(
        expected[f"{kind}_global{k}"] for kind in ("area", "norm") for k in range(4)
    )
    assert set(terms) == set(expected) and len(terms) == 11
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, abs=1e-6), name
    assert total.item() == pytest.approx(expected_total, abs=1e-5)


def test_area_loss_per_image_refuses_the_class_code_that_the_batch_form_accepts():
    # Half the images all foreground, half all background: a batch mean of exactly tau = 0.5.
    code = torch.cat([torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)])
    assert area_loss(code, 0.5, per="batch").item() == 0.0
    assert area_loss(code, 0.5, per="image").item() == pytest.approx(0.5)  # |1 - .5| and |0 - .5|
    # Every image with a quarter of its pixels on: both forms are met at tau = 0.25.
    quarter = torch.zeros(3, 2, 4, 4)
    quarter[:, :, :2, :2] = 1
    assert torch.equal(area_loss(quarter, 0.25, per="image"), torch.zeros(2))
    assert torch.equal(area_loss(quarter, 0.25, per="batch"), torch.zeros(2))
    # Per image, 0.1 and 0.3 of the pixels: batch |0.2 - 0.2| = 0, images (0.1 + 0.1) / 2.
    mixed = torch.tensor([0.1, 0.3]).view(2, 1, 1, 1).expand(2, 1, 2, 5)
    assert area_loss(mixed, 0.2, per="batch").item() == pytest.approx(0.0, abs=1e-7)
    assert area_loss(mixed, 0.2, per="image").item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="choose from"):
        area_loss(code, 0.5, per="pixel")


# --------------------------------------------------------------------------------------------
# Shapes and presets


def test_coarse_map_is_14x14_in_unit_interval_and_fuses_the_last_three_blocks(tiny, images):
    with torch.no_grad():
        out = tiny(images)
    assert out.logits.shape == (2, NUM_CLASSES)
    assert out.coarse_map.shape == (2, 14, 14) and out.global_maps.shape == (2, 4, 14, 14)
    assert out.block_global_maps.shape == (2, 4, 4, 1 + 196 + 4)
    assert torch.all((out.coarse_map > 0) & (out.coarse_map < 1))
    patch_m = out.block_global_maps[:, -3:, :, 1:197].mean(dim=2)  # m of the last 3 blocks
    torch.testing.assert_close(out.coarse_map, patch_m.mean(dim=1).view(2, 14, 14))
    torch.testing.assert_close(out.coarse_map, out.global_maps.mean(dim=1))


def test_classifier_is_conv_then_average_pool_over_patch_tokens(tiny, images):
    with torch.no_grad():
        tokens, _ = tiny.forward_features(images)
        patches = tokens[:, 1:197].transpose(1, 2).reshape(2, 48, 14, 14)
        expected = F.conv2d(patches, tiny.head.weight, tiny.head.bias, padding=1).mean(dim=(2, 3))
        torch.testing.assert_close(tiny(images).logits, expected)


@pytest.mark.parametrize(
    "name, deit, dim",
    [
        ("gtformer_deit_tiny_patch16_224", "deit_tiny_patch16_224", 192),
        ("gtformer_deit_small_patch16_224", "deit_small_patch16_224", 384),
        ("gtformer_deit_base_patch16_224", "deit_base_patch16_224", 768),
    ],
)
def test_deit_presets_are_the_deit_backbone_plus_global_tokens_and_conv_head(name, deit, dim):
    model = timm.create_model(name, num_classes=200, device="meta")
    backbone = timm.create_model(deit, num_classes=0, device="meta")
    new_params = 4 * (3 * 16 * 16 * dim + dim) + 4 * dim + (dim * 200 * 9 + 200)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in backbone.parameters()) + new_params
    assert len(model.blocks) == 12 and [b.global_aware for b in model.blocks] == [False] * 9 + [True] * 3
    assert model.blocks[0].attn.head_dim == 64 and model.norm.eps == 1e-6
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert model.pretrained_cfg["hf_hub_id"] == f"timm/{deit}.fb_in1k"


def test_every_preset_is_registered_with_timm():
    assert set(timm.list_models("gtformer_*")) == set(GTFORMER_PRESETS)


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown GTFormer preset"):
        create_gtformer("gtformer_huge", num_classes=2)


# --------------------------------------------------------------------------------------------
# Checkpoints


def test_save_then_load_gives_identical_outputs(tmp_path, tiny, images):
    names = [f"class_{i}" for i in range(NUM_CLASSES)]
    save_gtformer(tiny, tmp_path / "export", class_names=names, extra={"epochs": 3})
    for path in (tmp_path / "export", tmp_path / "export" / "model.safetensors"):
        loaded, config = load_gtformer(path)
        with torch.no_grad():
            expected, actual = tiny(images), loaded(images)
        for a, b in zip(expected, actual):
            assert torch.equal(a, b)
    assert config["preset"] == "gtformer_test_tiny" and config["class_names"] == names
    assert config["img_size"] == 224 and config["extra"] == {"epochs": 3} and len(config["sha256"]) == 64


def test_export_settings_are_read_back_and_an_older_config_gets_imagenet_defaults(tmp_path, tiny):
    save_gtformer(tiny, tmp_path, class_names=list("abcde"), mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.1))
    _, config = load_gtformer(tmp_path)
    settings = GTFormerSettings.from_config(config)
    assert settings == GTFormerSettings(224, (0.5, 0.4, 0.3), (0.2, 0.2, 0.1), ("a", "b", "c", "d", "e"))
    # an export written before these keys existed: 224 px and ImageNet's normalisation
    old = {k: v for k, v in config.items() if k not in ("img_size", "mean", "std", "class_names")}
    assert GTFormerSettings.from_config(old) == GTFormerSettings(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_save_records_overrides_so_load_rebuilds_the_same_architecture(tmp_path):
    model = create_gtformer("gtformer_test_tiny", num_classes=2, num_global_blocks=1, num_fused_layers=2)
    save_gtformer(model, tmp_path)
    loaded, config = load_gtformer(tmp_path)
    assert config["overrides"] == {"num_global_blocks": 1, "num_fused_layers": 2}
    assert loaded.num_fused_layers == 2 and [b.global_aware for b in loaded.blocks] == [False] * 3 + [True]


def test_weights_that_do_not_match_the_config_give_checkpoint_error(tmp_path, tiny):
    save_gtformer(tiny, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, num_classes=NUM_CLASSES + 1)))
    with pytest.raises(CheckpointError, match="head.weight"):
        load_gtformer(tmp_path)


def test_truncated_export_gives_checkpoint_error(tmp_path, tiny):
    save_gtformer(tiny, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_gtformer(tmp_path)


def test_missing_config_gives_checkpoint_error(tmp_path, tiny):
    save_gtformer(tiny, tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config not found"):
        load_gtformer(tmp_path / "model.safetensors")


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_deit_checkpoint_is_mapped_onto_the_backbone(tmp_path, arch, suffix):
    torch.manual_seed(0)
    deit = timm.create_model(arch, **TINY_BACKBONE)
    path = tmp_path / f"deit{suffix}"
    if suffix == ".pth":
        torch.save({"model": deit.state_dict()}, path)  # the DeiT release layout
    else:
        save_file(deit.state_dict(), str(path))
    model = create_gtformer("gtformer_test_tiny", num_classes=NUM_CLASSES, backbone_checkpoint=path)
    deit_state = deit.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith(("blocks.", "norm.", "patch_embed.", "cls_token")):
            assert torch.equal(value, deit_state[key]), key
    pos = deit_state["pos_embed"]
    assert torch.equal(model.pos_embed, torch.cat([pos[:, :1], pos[:, -196:]], dim=1))  # no distillation slot


def test_backbone_checkpoint_of_another_size_gives_checkpoint_error(tmp_path):
    deit = timm.create_model("vit_tiny_patch16_224", embed_dim=48, depth=2, num_heads=3)
    path = tmp_path / "deit.pth"
    torch.save(deit.state_dict(), path)
    with pytest.raises(CheckpointError, match="backbone keys missing"):
        create_gtformer("gtformer_test_tiny", num_classes=2, backbone_checkpoint=path)


def test_truncated_backbone_checkpoint_gives_checkpoint_error(tmp_path):
    path = tmp_path / "deit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", **TINY_BACKBONE).state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        create_gtformer("gtformer_test_tiny", num_classes=2, backbone_checkpoint=path)


def test_timm_pretrained_mechanism_maps_deit_weights(tmp_path):
    # pretrained=True with the weights source pointed at a local file instead of the hub.
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224", **TINY_BACKBONE)
    path = tmp_path / "deit.safetensors"
    save_file(deit.state_dict(), str(path))
    model = timm.create_model(
        "gtformer_deit_tiny_patch16_224", pretrained=True, num_classes=3,
        pretrained_cfg_overlay=dict(file=str(path)), **TINY_BACKBONE,
    )
    assert torch.equal(model.blocks[3].mlp.fc2.weight, deit.blocks[3].mlp.fc2.weight)
    assert model.head.weight.shape == (3, 48, 3, 3)
