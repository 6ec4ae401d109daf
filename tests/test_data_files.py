"""Finding images and refusing bad ones before training: folders, file lists, corrupt files."""

import io

import numpy as np
import pytest
import torch

from fastdino.data import ImageFolderError, build_multicrop_loader, index_cache, list_image_files, scan_images

PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(autouse=True)
def cache_in_tmp_path(tmp_path, monkeypatch):
    """The scans' checks are cached here, not in ~/.cache."""
    monkeypatch.setenv(index_cache.CACHE_DIR_ENV_VAR, str(tmp_path / "cache"))


def save_image(path, mode="RGB", size=(80, 60), image_format=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    PIL.fromarray(pixels).convert(mode).save(path, format=image_format)
    return path


def test_class_folders_get_labels_and_flat_folders_do_not(tmp_path):
    save_image(tmp_path / "classes" / "b_cat" / "1.jpg")
    save_image(tmp_path / "classes" / "a_dog" / "2.JPEG")
    save_image(tmp_path / "classes" / "a_dog" / "nested" / "3.png", image_format="PNG")
    (tmp_path / "classes" / "a_dog" / "notes.txt").write_text("not an image")
    paths, labels = list_image_files(tmp_path / "classes")
    assert [p.split("classes/")[1] for p in paths] == ["a_dog/2.JPEG", "a_dog/nested/3.png", "b_cat/1.jpg"]
    assert labels == [0, 0, 1]
    save_image(tmp_path / "flat" / "x.jpg")
    assert list_image_files(tmp_path / "flat") == ([str(tmp_path / "flat" / "x.jpg")], [-1])


def test_file_list_with_and_without_labels(tmp_path):
    save_image(tmp_path / "images" / "a.jpg")
    save_image(tmp_path / "images" / "b.jpg")
    listing = tmp_path / "train.txt"
    listing.write_text("# comment\nimages/a.jpg 3\n\nimages/b.jpg 5\n")
    paths, labels = list_image_files(listing)
    assert paths == [str(tmp_path / "images" / "a.jpg"), str(tmp_path / "images" / "b.jpg")] and labels == [3, 5]
    listing.write_text("images/a.jpg three\n")
    with pytest.raises(ImageFolderError, match=r"train.txt:1"):
        list_image_files(listing)


def test_missing_and_empty_paths_are_named(tmp_path):
    with pytest.raises(ImageFolderError, match="does-not-exist"):
        list_image_files(tmp_path / "does-not-exist")
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    (tmp_path / "empty" / "README").write_text("hello")
    with pytest.raises(ImageFolderError, match=r"no JPEG or PNG images in .*empty.*1 other files"):
        list_image_files(tmp_path / "empty")


@pytest.fixture
def mixed_folder(tmp_path):
    """Good RGB, grayscale, CMYK JPEGs and RGBA/palette PNGs, and four bad files."""
    root = tmp_path / "data" / "class_a"
    save_image(root / "rgb.jpg")
    save_image(root / "gray.jpg", mode="L")
    save_image(root / "cmyk.jpg", mode="CMYK")
    save_image(root / "rgba.png", mode="RGBA", image_format="PNG")
    save_image(root / "palette.png", mode="P", image_format="PNG")
    whole = io.BytesIO()  # big enough that the header survives the cut: only the end is missing
    PIL.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(whole, format="JPEG")
    (root / "truncated.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (root / "text.jpg").write_text("this is not a JPEG")
    (root / "empty.png").write_bytes(b"")
    save_image(root / "really_a_gif.png", image_format="GIF")
    return tmp_path / "data"


BAD_FILES = {"truncated.jpg": "truncated JPEG", "text.jpg": "not an image", "empty.png": "empty file",
             "really_a_gif.png": "GIF image"}


def test_bad_files_fail_the_scan_with_their_names(mixed_folder):
    with pytest.raises(ImageFolderError) as error:
        scan_images(mixed_folder)
    message = str(error.value)
    assert message.startswith("4 of 9 files")
    for name, reason in BAD_FILES.items():
        assert f"{name}: {reason}" in message
    assert "skip_bad_files" in message


def test_skipping_bad_files_keeps_the_good_ones_and_reports(mixed_folder, capsys):
    index = scan_images(mixed_folder, skip_bad_files=True)
    assert sorted(p.rsplit("/", 1)[1] for p in index.paths) == ["cmyk.jpg", "gray.jpg", "palette.png",
                                                               "rgb.jpg", "rgba.png"]
    assert sorted(p.rsplit("/", 1)[1] for p, _ in index.skipped) == sorted(BAD_FILES)
    assert (index.sizes == [60, 80]).all()
    assert "skipped 4 bad files of 9" in capsys.readouterr().err


def test_loader_fails_before_training_on_bad_files(mixed_folder):
    with pytest.raises(ImageFolderError, match="truncated.jpg"):
        build_multicrop_loader(mixed_folder, 2, backend="torchvision", verbose=False)


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_grayscale_cmyk_and_png_images_become_rgb_crops(mixed_folder, backend):
    from fastdino.data import MultiCropRecipe, dali_available

    if backend == "dali" and not dali_available():
        pytest.skip("DALI is not installed")
    recipe = MultiCropRecipe(global_crop_size=32, local_crop_size=16)
    loader = build_multicrop_loader(mixed_folder, 5, n_local_crops=1, backend=backend, skip_bad_files=True,
                                    recipe=recipe, num_threads=1, verbose=False)
    crops = next(iter(loader))
    assert [tuple(c.shape) for c in crops] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)]
    assert all(torch.isfinite(c).all() for c in crops)
