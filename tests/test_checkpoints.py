"""Checkpoint files: hashes, truncation and pickled code give clear errors."""

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from pro2sam.checkpoints import CheckpointError, load_state_dict, verify_sha256
from pro2sam.storage import sha256_file


@pytest.fixture
def state():
    torch.manual_seed(0)
    return {"layer.weight": torch.randn(64, 64), "layer.bias": torch.randn(64)}


def test_torch_file_round_trips(tmp_path, state):
    path = tmp_path / "w.pth"
    torch.save(state, path)
    loaded = load_state_dict(path)
    assert set(loaded) == set(state) and torch.equal(loaded["layer.weight"], state["layer.weight"])


def test_state_dict_wrapped_under_model_key_is_unwrapped(tmp_path, state):
    path = tmp_path / "deit.pth"
    torch.save({"model": state, "epoch": 3}, path)
    assert set(load_state_dict(path)) == set(state)


def test_safetensors_file_round_trips(tmp_path, state):
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    assert torch.equal(load_state_dict(path)["layer.bias"], state["layer.bias"])


def test_sha256_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"pro2sam" * 1000)
    assert sha256_file(path) == hashlib.sha256(b"pro2sam" * 1000).hexdigest()


def test_wrong_sha256_is_reported_with_both_hashes(tmp_path, state):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(state, path)
    expected = "0" * 64
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path, expected_sha256=expected, what="the official SAM vit_b checkpoint")
    message = str(err.value)
    assert sha256_file(path) in message and expected in message
    assert "the official SAM vit_b checkpoint" in message
    assert verify_sha256(path, sha256_file(path), "it") == sha256_file(path)


def test_truncated_torch_file_gives_a_clear_error(tmp_path, state):
    path = tmp_path / "w.pth"
    torch.save(state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_state_dict(path)


def test_truncated_safetensors_file_gives_a_clear_error(tmp_path, state):
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_state_dict(path)


def test_empty_and_missing_files_are_named(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_state_dict(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "absent.pth")


class Payload:
    """An arbitrary pickled object: loading must refuse it, not construct it."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(2), "obj": Payload()}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_state_dict(path)
