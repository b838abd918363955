"""Bad input to the train entry point: a clear error, exit code != 0, and no Ray work."""

import ray
from forgeml.cli import EXIT_BAD_INPUT, main

from tests.conftest import tiny_raw_config, write_config


def _train(config, capsys, *extra):
    code = main(["train", "--config", str(config), *extra])
    return code, capsys.readouterr().err


def test_malformed_yaml(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("name: x\ntrain: [max_epochs: 3\n")
    code, err = _train(config, capsys)
    assert code == EXIT_BAD_INPUT
    assert "is not valid YAML" in err
    assert not ray.is_initialized()


def test_top_level_must_be_a_mapping(tmp_path, capsys):
    config = tmp_path / "list.yaml"
    config.write_text("- a\n- b\n")
    code, err = _train(config, capsys)
    assert code == EXIT_BAD_INPUT and "must be a mapping" in err


def test_unknown_field(tmp_path, capsys):
    raw = tiny_raw_config(tmp_path, train={"epochs": 3})
    code, err = _train(write_config(tmp_path / "c.yaml", raw), capsys)
    assert code == EXIT_BAD_INPUT
    assert "train.epochs: Extra inputs are not permitted" in err
    assert not ray.is_initialized()


def test_wrong_type(tmp_path, capsys):
    raw = tiny_raw_config(tmp_path, train={"batch_size": "large"})
    code, err = _train(write_config(tmp_path / "c.yaml", raw), capsys)
    assert code == EXIT_BAD_INPUT
    assert "train.batch_size: Input should be a valid integer" in err


def test_missing_config_file(tmp_path, capsys):
    code, err = _train(tmp_path / "nope.yaml", capsys)
    assert code == EXIT_BAD_INPUT and "cannot read config" in err


def test_missing_dataset_path(tmp_path, capsys):
    source = {
        "kind": "parquet",
        "path": str(tmp_path / "no-such-folder"),
        "image_size": 16,
        "class_names": ["a", "b"],
    }
    raw = tiny_raw_config(tmp_path / "store", data={"source": source})
    code, err = _train(write_config(tmp_path / "c.yaml", raw), capsys)
    assert code == EXIT_BAD_INPUT
    assert "data.source.path: no such file or folder" in err
    assert not ray.is_initialized()
    assert not (tmp_path / "store" / "models").exists()


def test_resume_without_an_earlier_run(tmp_path, capsys):
    raw = tiny_raw_config(tmp_path / "store")
    code, err = _train(write_config(tmp_path / "c.yaml", raw), capsys, "--resume")
    assert code == EXIT_BAD_INPUT
    assert "--resume: no earlier run of 'tiny-wafer'" in err
    assert not ray.is_initialized()
