"""Image loading rules: corrupt, empty, huge, grayscale/RGBA, EXIF; atomic writes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facetron.atomic import ARTIFACT_MARKER, atomic_dir, atomic_write_json
from facetron.errors import InvalidInputError
from facetron.imageio import check_rgb_array, list_images, load_image, save_image


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_corrupt_bytes_name_the_input() -> None:
    with pytest.raises(InvalidInputError, match="upload.jpg: is not a readable image"):
        load_image(b"not an image at all", name="upload.jpg")


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(InvalidInputError, match="empty.png: is empty"):
        load_image(p)


def test_truncated_png(tmp_path: Path) -> None:
    data = _png(Image.new("RGB", (64, 64), (10, 20, 30)))
    p = tmp_path / "cut.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInputError, match="cut.png: is not a readable image"):
        load_image(p)


def test_huge_image_is_refused_before_decoding() -> None:
    data = _png(Image.new("L", (9000, 10), 0))
    with pytest.raises(InvalidInputError, match="largest accepted side is 8192"):
        load_image(data)


def test_grayscale_and_rgba_become_rgb() -> None:
    gray = load_image(_png(Image.new("L", (5, 4), 100)))
    assert gray.shape == (4, 5, 3) and gray.dtype == np.uint8 and (gray == 100).all()
    rgba = Image.new("RGBA", (3, 3), (255, 0, 0, 0))  # fully transparent -> white
    out = load_image(_png(rgba))
    assert out.shape == (3, 3, 3) and (out == 255).all()


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).shape == (40, 20, 3)


def test_check_rgb_array_rules() -> None:
    with pytest.raises(InvalidInputError, match="img: expected dtype uint8"):
        check_rgb_array(np.zeros((4, 4, 3), np.float32), "img")
    with pytest.raises(InvalidInputError, match=r"img: expected shape \[H, W, 3\]"):
        check_rgb_array(np.zeros((4, 4), np.uint8), "img")
    with pytest.raises(InvalidInputError, match="zero size"):
        check_rgb_array(np.zeros((0, 4, 3), np.uint8), "img")


def test_save_and_list(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 255, (8, 9, 3), dtype=np.uint8)
    save_image(tmp_path / "a.png", arr)
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_images(tmp_path)] == ["a.png"]
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), arr)
    assert not list(tmp_path.glob(".*tmp"))


def test_atomic_dir_leaves_nothing_on_error(tmp_path: Path) -> None:
    target = tmp_path / "repo"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            atomic_write_json(tmp / "x.json", {"a": 1})
            raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        atomic_write_json(tmp / "x.json", {"a": 1})
    assert (target / "x.json").is_file()


def test_atomic_dir_never_replaces_a_folder_it_did_not_make(tmp_path: Path) -> None:
    """A user's folder (a sentinel file, no marker) is refused before any work and left intact."""
    target = tmp_path / "photos"
    target.mkdir()
    (target / "me.jpg").write_bytes(b"precious")
    worked = []
    with pytest.raises(InvalidInputError, match="holds files facetron did not make"):
        with atomic_dir(target, "--out"):
            worked.append(True)
    assert not worked and (target / "me.jpg").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInputError, match="not a folder"):
        with atomic_dir(tmp_path / "file"):
            pass


def test_atomic_dir_replaces_its_own_folder_and_an_empty_one(tmp_path: Path) -> None:
    target = tmp_path / "repo"
    for value in (1, 2):
        with atomic_dir(target) as tmp:
            atomic_write_json(tmp / "x.json", {"a": value})
        assert (target / ARTIFACT_MARKER).is_file() and (target / "x.json").read_text().count(str(value))
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty) as tmp:
        atomic_write_json(tmp / "x.json", {})
    assert (empty / "x.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "repo"]  # no temp or old folders left
