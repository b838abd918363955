"""The image-folder and NumPy readers without Ray: a row per image with its class from
the folder or the label array, grey levels resized, and files that cannot be used as
rejected rows with their reason."""

import io

import numpy as np
import pyarrow.fs as pafs
import pytest
from forgeml.data.base import REJECT_COLUMN
from forgeml.data.readers import image_file_rows, npz_rows
from PIL import Image

FS = pafs.LocalFileSystem()


def _rows(reader, path, **kwargs):
    return list(reader(FS, str(path), [], **kwargs))


def test_an_image_becomes_grey_levels_of_its_class_folder(tmp_path):
    (tmp_path / "cat").mkdir()
    colour = np.zeros((20, 10, 3), np.uint8)
    colour[..., 0] = 255  # pure red: grey level 76 (ITU-R 601-2 luma)
    Image.fromarray(colour).save(tmp_path / "cat" / "a.png")
    (batch,) = _rows(
        image_file_rows,
        tmp_path / "cat" / "a.png",
        root=str(tmp_path),
        size=8,
        classes=("cat", "dog"),
    )
    assert batch["label"].tolist() == [0] and REJECT_COLUMN not in batch
    pixels = np.frombuffer(batch["image"][0], np.uint8)
    assert pixels.shape == (64,) and set(pixels.tolist()) == {76}


def test_unreadable_images_and_files_outside_class_folders_are_rejected(tmp_path):
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not an image")
    Image.new("L", (4, 4)).save(tmp_path / "loose.png")
    kwargs = {"root": str(tmp_path), "size": 8, "classes": ("cat", "dog")}
    (broken,) = _rows(image_file_rows, tmp_path / "dog" / "broken.jpg", **kwargs)
    assert broken[REJECT_COLUMN][0] == "image: not a readable image (UnidentifiedImageError)"
    assert broken["_raw"][0].endswith("dog/broken.jpg")
    (loose,) = _rows(image_file_rows, tmp_path / "loose.png", **kwargs)
    assert loose[REJECT_COLUMN][0].startswith("label: 'loose.png' is not a class folder")


def _npz(path, images, labels):
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels)
    path.write_bytes(buffer.getvalue())


def test_npz_rows_carry_their_label_and_bad_values_or_files_are_rejected(tmp_path):
    images = np.zeros((3, 4, 4), np.int64)
    images[1, 0, 0] = 300  # not a grey level
    _npz(tmp_path / "a.npz", images, np.array([0, 1, 1]))
    kwargs = {"root": str(tmp_path), "images_key": "images", "labels_key": "labels", "size": 4}
    good, bad = _rows(npz_rows, tmp_path / "a.npz", **kwargs)
    assert good["label"].tolist() == [0, 1] and len(good["image"][0]) == 16
    assert bad[REJECT_COLUMN][0] == "images: values outside 0 to 255"
    assert len(set(good["id"].tolist()) | set(bad["id"].tolist())) == 3
    _npz(tmp_path / "b.npz", np.zeros((2, 5, 5), np.uint8), np.array([0, 1]))
    (wrong,) = _rows(npz_rows, tmp_path / "b.npz", **kwargs)
    assert "images of 5x5, not 4x4" in wrong[REJECT_COLUMN][0]
    (tmp_path / "c.npz").write_bytes(b"junk")
    (junk,) = _rows(npz_rows, tmp_path / "c.npz", **kwargs)
    assert "not a .npz file with arrays 'images' and 'labels'" in junk[REJECT_COLUMN][0]


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 5)])
def test_npz_arrays_must_be_square_images(tmp_path, shape):
    _npz(tmp_path / "a.npz", np.zeros(shape, np.uint8), np.zeros(3, np.int64))
    kwargs = {"root": str(tmp_path), "images_key": "images", "labels_key": "labels", "size": 4}
    (rejected,) = _rows(npz_rows, tmp_path / "a.npz", **kwargs)
    assert "expected square images (N, H, H) and N labels" in rejected[REJECT_COLUMN][0]
