"""The image-folder and NumPy readers without Ray: a row per image with its class from
the folder or the label array, grey levels or RGB values resized, and files that cannot
be used as rejected rows with their reason."""

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
    assert (
        "expected square images (N, H, H) or (N, H, H, C) and N labels"
        in (rejected[REJECT_COLUMN][0])
    )


def _values(batch, channels: int) -> np.ndarray:
    return np.frombuffer(batch["image"][0], np.uint8).reshape(8, 8, channels)


def test_colour_files_are_read_as_rgb_whatever_their_mode(tmp_path):
    """RGBA loses its alpha, grey is repeated into R, G and B, JPEG is decoded."""
    (tmp_path / "cat").mkdir()
    orange = (230, 120, 20)
    Image.new("RGBA", (8, 8), (*orange, 40)).save(tmp_path / "cat" / "alpha.png")
    Image.new("L", (8, 8), 90).save(tmp_path / "cat" / "grey.png")
    Image.new("RGB", (16, 16), orange).save(tmp_path / "cat" / "photo.jpg", quality=95)
    kwargs = {"root": str(tmp_path), "size": 8, "classes": ("cat", "dog"), "channels": 3}
    (alpha,) = _rows(image_file_rows, tmp_path / "cat" / "alpha.png", **kwargs)
    (grey,) = _rows(image_file_rows, tmp_path / "cat" / "grey.png", **kwargs)
    (jpeg,) = _rows(image_file_rows, tmp_path / "cat" / "photo.jpg", **kwargs)
    assert (_values(alpha, 3) == orange).all()
    assert (_values(grey, 3) == 90).all()
    assert np.abs(_values(jpeg, 3).astype(int) - orange).max() <= 3


def test_npz_images_with_channels_are_converted_to_the_channels_asked_for(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2, 4, 4, 3))
    rgba = np.concatenate([rgb, np.full((2, 4, 4, 1), 255)], -1)
    _npz(tmp_path / "rgba.npz", rgba, np.array([0, 1]))
    _npz(tmp_path / "grey.npz", rgb[..., 0], np.array([0, 1]))
    kwargs = {"root": str(tmp_path), "images_key": "images", "labels_key": "labels", "size": 4}

    def image(path, channels):
        (batch,) = _rows(npz_rows, path, channels=channels, **kwargs)
        return np.frombuffer(batch["image"][0], np.uint8).reshape(4, 4, channels)

    np.testing.assert_array_equal(image(tmp_path / "rgba.npz", 3), rgb[0])
    np.testing.assert_array_equal(
        image(tmp_path / "grey.npz", 3), np.repeat(rgb[0, ..., :1], 3, -1)
    )
    pil_grey = np.asarray(Image.fromarray(rgb[0].astype(np.uint8)).convert("L"))
    np.testing.assert_array_equal(image(tmp_path / "rgba.npz", 1)[..., 0], pil_grey)
    _npz(tmp_path / "two.npz", rgb[..., :2], np.array([0, 1]))
    (rejected,) = _rows(npz_rows, tmp_path / "two.npz", channels=3, **kwargs)
    assert "expected images (N, H, W) or (N, H, W, 1|3|4)" in rejected[REJECT_COLUMN][0]
