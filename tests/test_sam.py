"""The SAM builder: official architectures, seeded random weights, checkpoints refused with reasons."""

import pytest
import torch
from segment_anything.build_sam import build_sam_vit_b, build_sam_vit_h

from pro2sam.checkpoints import CheckpointError
from pro2sam.sam import DEFAULT_SAM_VARIANT, build_sam


def test_official_checkpoint_with_wrong_sha256_is_refused(tmp_path):
    fake = tmp_path / "sam_vit_b_01ec64.pth"
    fake.write_bytes(b"not the released weights")
    with pytest.raises(CheckpointError, match=r"official SAM vit_b checkpoint sam_vit_b_01ec64\.pth.*SHA-256"):
        build_sam("vit_b", fake)


def test_truncated_checkpoint_is_refused(tiny_sam, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(tiny_sam.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        build_sam("tiny", path, verify=False)


def test_checkpoint_of_another_architecture_is_refused(tiny_sam, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(tiny_sam.state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit the vit_b architecture"):
        build_sam("vit_b", path, verify=False)


def test_random_tiny_sam_is_seeded():
    a, b = build_sam("tiny", seed=1), build_sam("tiny", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_vit_b_has_the_official_architecture_on_the_meta_device():
    ours = build_sam("vit_b", device="meta")
    with torch.device("meta"):
        official = build_sam_vit_b()
    assert sum(p.numel() for p in ours.parameters()) == 93_735_472
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in official.state_dict().items()}


def test_the_default_variant_is_the_official_vit_h():
    assert DEFAULT_SAM_VARIANT == "vit_h"
    ours = build_sam(device="meta")
    with torch.device("meta"):
        official = build_sam_vit_h()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in official.state_dict().items()}


def test_sdpa_attention_gives_segment_anythings_encoder_outputs():
    # The shipped SAM: trained relative positions (a random SAM's start at zero), windowed and
    # global blocks.
    from pro2sam import shipped

    eager = build_sam(shipped.SAM_VARIANT, shipped.sam_checkpoint(), sdpa=False)
    sdpa = build_sam(shipped.SAM_VARIANT, shipped.sam_checkpoint())
    assert {type(b.attn).__name__ for b in sdpa.image_encoder.blocks} == {"SdpaAttention"}
    assert eager.image_encoder.blocks[1].attn.rel_pos_h.abs().max() > 0.1
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = eager.image_encoder(x), sdpa.image_encoder(x)
    # float32 sums in another order: ~1e-6 of the outputs' scale
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
