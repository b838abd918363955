"""data.append: more rows in the source's format, checked before any Ray work."""

from __future__ import annotations

import pytest
from forgeml.config import config_from_dict
from forgeml.data.sources import open_source
from forgeml.storage import Storage
from PIL import Image

from tests.conftest import tiny_raw_config

FEATURES = {"kind": "tabular", "target": "y", "numeric": ["x"]}


def _table_config(tmp_path, source: dict, append: list[str]):
    raw = tiny_raw_config(tmp_path / "store")
    raw["data"] = {"source": source, "features": FEATURES, "append": append}
    raw["model"] = {"kind": "mlp"}
    raw["task"] = {"kind": "regression"}
    return config_from_dict(raw)


def _open(cfg):
    return open_source(cfg, Storage(cfg.storage))


def test_appended_files_are_read_after_the_sources_own(tmp_path):
    (tmp_path / "old.csv").write_text("x,y\n1,2\n")
    new = tmp_path / "new"
    new.mkdir()
    (new / "a.csv").write_text("x,y\n3,4\n")
    (new / "b.csv").write_text("y,x\n5,6\n")
    source = {"kind": "table", "path": str(tmp_path / "old.csv")}
    opened = _open(_table_config(tmp_path, source, [str(new)]))
    assert opened.paths == [str(tmp_path / "old.csv"), str(new / "a.csv"), str(new / "b.csv")]


@pytest.mark.parametrize(
    ("files", "append", "message"),
    [
        ({}, "missing", "data.append: no such file or folder"),
        ({"new.csv": "x,z\n1,2\n"}, "new.csv", r"column 'y' is not in .*new.csv"),
        ({"new.jsonl": '{"x": 1, "y": 2}\n'}, "new.jsonl", "new.jsonl. is not a csv file"),
    ],
)
def test_a_bad_appended_path_is_named(tmp_path, files, append, message):
    (tmp_path / "old.csv").write_text("x,y\n1,2\n")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    source = {"kind": "table", "path": str(tmp_path / "old.csv")}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        _open(_table_config(tmp_path, source, [str(tmp_path / append)]))


def test_image_folders_take_new_files_in_their_own_folder(tmp_path):
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        Image.new("L", (16, 16)).save(tmp_path / "images" / label / "0.png")
    raw = tiny_raw_config(tmp_path / "store")
    raw["data"]["source"] = {"kind": "image_folder", "path": str(tmp_path / "images")}
    raw["data"]["append"] = [str(tmp_path)]
    with pytest.raises(ValueError, match="data.append: a image_folder source reads its own"):
        _open(config_from_dict(raw))
