"""model.init_from and train.freeze without Ray: weights files and registered packages
read and matched by name and shape, and the config fields named when they cannot be."""

import io
import re

import pytest
import safetensors.torch
import torch
from forgeml.config import CNNConfig, ConfigError, StorageConfig, config_from_dict
from forgeml.data.base import ModelInputs
from forgeml.models import build_model
from forgeml.storage import ModelRegistry, Storage
from forgeml.train.pretrained import _read_state, frozen_names, match

from tests.conftest import tiny_raw_config


def _cnn(classes: int) -> torch.nn.Module:
    return build_model(CNNConfig(width=4, depth=2), ModelInputs((1, 16, 16), "images"), classes)


def test_matching_tensors_load_a_new_head_is_skipped_and_the_record_says_so():
    source, target = _cnn(5), _cnn(3)
    state = source.state_dict() | {"extra.weight": torch.zeros(2)}
    del state["features.0.0.weight"]

    found = match("weights.pt", state, target.state_dict())

    assert set(found.skipped) == {"head.3.weight", "head.3.bias"}
    assert found.skipped["head.3.weight"] == {"weights": [5, 8], "model": [3, 8]}
    assert found.missing == ["features.0.0.weight"] and found.unused == ["extra.weight"]
    loaded = set(target.state_dict()) - {"head.3.weight", "head.3.bias", "features.0.0.weight"}
    assert set(found.weights) == loaded
    torch.testing.assert_close(found.weights["features.1.0.weight"], state["features.1.0.weight"])
    assert found.record()["loaded"] == sorted(loaded)
    assert "2 skipped (shape), 1 missing, 1 unused" in found.lines()[0]


def test_nothing_that_fits_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="model.init_from: no tensor of w.pt fits this model"):
        match("w.pt", {"other.weight": torch.zeros(1)}, _cnn(3).state_dict())


def test_weights_files_of_each_kind_are_read(tmp_path):
    state = _cnn(3).state_dict()
    plain, wrapped, safe = (
        tmp_path / "plain.pt",
        tmp_path / "wrapped.pth",
        tmp_path / "w.safetensors",
    )
    torch.save(state, plain)
    torch.save({"state_dict": state, "model": {"kind": "cnn"}, "format": 2}, wrapped)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, safe)
    storage = Storage(StorageConfig(root=str(tmp_path / "store")))

    for path in (plain, wrapped, safe):
        read = _read_state(str(path), storage)
        assert read.keys() == state.keys()
        torch.testing.assert_close(read["head.3.weight"], state["head.3.weight"])


def test_a_registered_model_is_read_from_its_package(tmp_path):
    state = _cnn(3).state_dict()
    buffer = io.BytesIO()
    torch.save({"format": 2, "state_dict": state}, buffer)
    storage = Storage(StorageConfig(root=str(tmp_path)))
    ModelRegistry(storage).register("digits", {"model.pt": buffer.getvalue()})

    read = _read_state("digits:v1", storage)

    torch.testing.assert_close(read["head.3.bias"], state["head.3.bias"])


@pytest.mark.parametrize(
    "source, message",
    [
        ("nothing:v1", "is neither a weights file (.pt, .pth, .safetensors) nor a registered"),
        ("missing.pt", "cannot read 'missing.pt'"),
        ("text.pt", "'text.pt' is not a PyTorch weights file"),
        ("list.pt", "holds no state dict of tensors"),
        ("bad.safetensors", "is not a safetensors file"),
    ],
)
def test_unreadable_sources_name_the_field(tmp_path, monkeypatch, source, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.pt").write_text("not torch")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    storage = Storage(StorageConfig(root=str(tmp_path / "store")))

    with pytest.raises(ValueError, match=f"model.init_from: .*{re.escape(message)}"):
        _read_state(source, storage)


def _config(tmp_path, **train):
    raw = tiny_raw_config(tmp_path)
    raw["train"] |= train
    return config_from_dict(raw)


def test_freeze_by_pattern_or_the_pretrained_parameters(tmp_path):
    names = [name for name, _ in _cnn(3).named_parameters()]

    by_pattern = frozen_names(_config(tmp_path, freeze={"params": ["features.0.*"]}), names, [])
    assert by_pattern and all(name.startswith("features.0.") for name in by_pattern)
    cfg = _config(tmp_path, freeze={"params": ["features.0.*"], "epochs": 2})
    assert frozen_names(cfg, names, []) == by_pattern
    raw = tiny_raw_config(tmp_path)
    raw["model"]["init_from"] = "digits"
    raw["train"]["freeze"] = {"params": "pretrained"}
    assert frozen_names(config_from_dict(raw), names, names[:2]) == names[:2]
    with pytest.raises(ValueError, match=r"train.freeze.params: no parameter of the model"):
        frozen_names(_config(tmp_path, freeze={"params": ["backbone.*"]}), names, [])


@pytest.mark.parametrize(
    "train, message",
    [
        ({"freeze": {"params": "pretrained"}}, "train.freeze.params: the pretrained parameters"),
        ({"optimizer": {"pretrained_lr_scale": 0.1}}, "train.optimizer.pretrained_lr_scale"),
        ({"freeze": {"params": []}}, "name at least one pattern"),
    ],
)
def test_pretrained_settings_without_init_from_are_refused(tmp_path, train, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, **train)
