"""The image index: cached per dataset, rebuilt when files change, every bad file named, the
same index on every rank, EXIF orientation ignored by both backends."""

import os
import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from fastdino.data import (
    ImageFolderError,
    MultiCropRecipe,
    build_multicrop_loader,
    dali_available,
    list_image_files,
    scan_images,
    write_synthetic_image_folder,
)
from fastdino.data import image_files, index_cache
from fastdino.runtime import Runtime

PIL = pytest.importorskip("PIL.Image")
BACKENDS = [pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="DALI is not installed")),
            "torchvision"]


PREMATURE_END = bytes(62) + b"\xff\xd9"  # a zeroed block ending in a stray end marker
STRAY_MARKERS = b"\xff" * 64


def corrupt_the_middle(path, block=PREMATURE_END):
    """Overwrite bytes in the middle of the JPEG's entropy-coded data, keeping its headers, its
    end marker and its size. ``PREMATURE_END``: the data segment ends before the last blocks,
    which libjpeg fills in with a warning ("premature end of data segment"), not an error;
    ``STRAY_MARKERS``: an error for every decoder."""
    data = bytearray(path.read_bytes())
    start_of_scan = data.index(b"\xff\xda")
    scan_data = start_of_scan + 2 + int.from_bytes(data[start_of_scan + 2:start_of_scan + 4], "big")
    middle = (scan_data + len(data)) // 2
    data[middle:middle + len(block)] = block
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(autouse=True)
def cache_in_tmp_path(tmp_path, monkeypatch):
    """The loader's scans (default cache location) write here, not to ~/.cache."""
    monkeypatch.setenv(index_cache.CACHE_DIR_ENV_VAR, str(tmp_path / "default-cache"))


@pytest.fixture
def folder(tmp_path):
    return write_synthetic_image_folder(tmp_path / "data", n_images=12, image_size=(96, 72), n_classes=3)


@pytest.fixture
def checked_files(monkeypatch):
    """The files the scan opens, in order."""
    opened = []
    check = image_files.check_image_file

    def counting_check(path):
        opened.append(os.fsdecode(path))
        return check(path)

    monkeypatch.setattr(image_files, "check_image_file", counting_check)
    return opened


def scan(path, cache_dir, **options):
    return scan_images(path, cache_dir=cache_dir, num_threads=2, **options)


def test_the_second_start_reads_the_cache_and_opens_no_file(folder, tmp_path, checked_files, capsys):
    first = scan(folder, tmp_path / "cache")
    assert len(checked_files) == 12
    assert f"index: rebuilt (no cache yet at {tmp_path / 'cache'}" in capsys.readouterr().err
    second = scan(folder, tmp_path / "cache")
    assert len(checked_files) == 12, "the cached start opened files"
    assert "index: cached (" in capsys.readouterr().err
    assert list(second.paths) == list(first.paths)
    assert np.array_equal(second.sizes, first.sizes) and np.array_equal(second.labels, first.labels)
    scan(folder, tmp_path / "elsewhere", use_cache=False)
    assert len(checked_files) == 24 and not (tmp_path / "elsewhere").exists()
    assert "index: rebuilt (use_cache=False): checked 12 files" in capsys.readouterr().err


def rewrite_keeping_size(path):
    """New bytes of the same length (a corrupt version of the file), written later."""
    data = path.read_bytes()
    os.utime(path, ns=(0, 0))  # the rewrite's own mtime is then surely different
    corrupt_the_middle(path)
    assert len(path.read_bytes()) == len(data)


def rewrite_restoring_mtime(path):
    """New bytes, same size, the old mtime put back (as ``rsync -a`` or ``cp -p`` leave it):
    only the ctime tells."""
    stat = path.stat()
    corrupt_the_middle(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("change, why, checked, bad", [
    ("added", "files 1 added", 1, False),
    ("removed", "files 1 removed", 0, False),
    ("rewritten", "files 1 changed", 1, True),
    ("rewritten, mtime restored", "files 1 changed", 1, True),
])
def test_a_changed_folder_is_rechecked_where_it_changed(folder, tmp_path, checked_files, capsys, change, why,
                                                        checked, bad):
    scan(folder, tmp_path / "cache")
    target = folder / "class_1" / "image_00004.jpg"
    if change == "added":
        (folder / "class_1" / "new.jpg").write_bytes(target.read_bytes())
    elif change == "removed":
        target.unlink()
    elif change == "rewritten":
        rewrite_keeping_size(target)
    else:
        rewrite_restoring_mtime(target)
    del checked_files[:]
    if bad:  # the cache's verdict on the old bytes is not trusted: the new ones are corrupt
        with pytest.raises(ImageFolderError, match=r"image_00004.jpg: corrupt JPEG data \(Corrupt JPEG data"):
            scan(folder, tmp_path / "cache")
    else:
        index = scan(folder, tmp_path / "cache")
        assert list(index.paths) == list_image_files(folder)[0]
    message = capsys.readouterr().err
    assert f"index: rebuilt ({why} since the cache" in message
    assert len(checked_files) == checked
    if checked:
        assert f"kept the checks of {11 if change != 'added' else 12} unchanged files" in message


def test_a_corrupt_middle_fails_the_scan_with_its_name_on_both_backends(folder):
    corrupt_the_middle(folder / "class_2" / "image_00005.jpg")
    PIL.open(folder / "class_2" / "image_00005.jpg").load()  # PIL alone decodes it without a word
    for backend in ("torchvision",) + (("dali",) if dali_available() else ()):
        with pytest.raises(ImageFolderError) as error:
            build_multicrop_loader(folder, 2, backend=backend, verbose=False)
        message = str(error.value)
        assert message.startswith("1 of 12 files")
        assert ("class_2/image_00005.jpg: corrupt JPEG data (Corrupt JPEG data: premature end of data segment)"
                in message)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipping_a_corrupt_middle_warns_with_its_name_and_the_count(folder, capsys, backend):
    corrupt_the_middle(folder / "class_2" / "image_00005.jpg")
    recipe = MultiCropRecipe(global_crop_size=24, local_crop_size=16)
    loader = build_multicrop_loader(folder, 11, n_local_crops=1, backend=backend, skip_bad_files=True,
                                    num_threads=1, recipe=recipe)
    assert len(loader.plan.index) == 11
    assert all(torch.isfinite(crop).all() for crop in next(iter(loader)))  # every other image, in one batch
    assert [path.rsplit("/", 2)[1:] for path, _ in loader.plan.index.skipped] == [["class_2", "image_00005.jpg"]]
    err = capsys.readouterr().err
    assert "skipped 1 bad files of 12" in err and "class_2/image_00005.jpg: corrupt JPEG data" in err


def test_random_bytes_in_the_middle_and_png_damage_are_found(tmp_path):
    root = write_synthetic_image_folder(tmp_path / "data", n_images=2, image_size=(96, 72), n_classes=1)
    generator = np.random.default_rng(0)
    corrupt_the_middle(root / "class_0" / "image_00000.jpg", STRAY_MARKERS)
    png = root / "class_0" / "image_00001.png"
    PIL.open(root / "class_0" / "image_00001.jpg").save(png)
    data = bytearray(png.read_bytes())
    data[len(data) // 2:len(data) // 2 + 16] = generator.integers(0, 256, 16, dtype=np.uint8).tobytes()
    png.write_bytes(bytes(data))
    with pytest.raises(ImageFolderError) as error:
        scan(root, tmp_path / "cache")
    assert "image_00000.jpg: corrupt JPEG data" in str(error.value)
    assert "image_00001.png: corrupt PNG (broken PNG file" in str(error.value)


def test_without_simplejpeg_pil_checks_and_the_cache_is_not_shared(folder, tmp_path, monkeypatch, capsys):
    scan(folder, tmp_path / "cache")
    monkeypatch.setattr(image_files, "_import_simplejpeg", lambda: None)
    image_files._say_the_check_is_lenient.cache_clear()
    corrupt_the_middle(folder / "class_0" / "image_00003.jpg", STRAY_MARKERS)  # an error for PIL too
    with pytest.raises(ImageFolderError, match="image_00003.jpg: corrupt JPEG data"):
        scan(folder, tmp_path / "cache")
    err = capsys.readouterr().err
    assert "simplejpeg is not installed" in err and "was made by another checker" in err


def test_unreadable_folders_and_dangling_symlinks_are_reported(folder, tmp_path, monkeypatch, capsys):
    (folder / "class_0" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (folder / "class_9").symlink_to(tmp_path / "unmounted")  # a whole class that is not there
    locked = os.fsencode(folder / "class_1")
    scandir = os.scandir

    def scandir_denying_class_1(path="."):
        if os.fsencode(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", scandir_denying_class_1)  # root can read anything: simulate it
    with pytest.raises(ImageFolderError) as error:
        scan(folder, tmp_path / "cache")
    message = str(error.value)
    assert message.startswith("3 of 11 files")  # 8 images outside class_1, 3 problems
    assert f"{folder / 'class_1'}: unreadable folder (PermissionError: Permission denied)" in message
    assert f"{folder / 'class_0' / 'gone.jpg'}: dangling symlink (to {tmp_path / 'nowhere.jpg'})" in message
    assert f"{folder / 'class_9'}: dangling symlink (to {tmp_path / 'unmounted'})" in message
    index = scan(folder, tmp_path / "cache", skip_bad_files=True)
    assert len(index) == 8 and len(index.skipped) == 3
    assert "skipped 3 bad files of 11" in capsys.readouterr().err


def plain_listing(root):
    """The reference: os.walk, paths sorted by their parts, class = first folder's rank."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            if name.lower().endswith((".jpg", ".jpeg", ".png")):
                relative = os.path.relpath(os.path.join(folder, name), root)
                parts = relative.split(os.sep)
                found.append((parts, classes.index(parts[0]) if len(parts) > 1 else -1))
    found.sort(key=lambda item: (item[1] >= 0, item[0]))  # images outside classes first
    return [os.path.join(root, *parts) for parts, _ in found], [label for _, label in found]


def test_the_compact_index_is_the_plain_listing(tmp_path):
    root = write_synthetic_image_folder(tmp_path / "data", n_images=9, image_size=(40, 30), n_classes=3)
    nested = root / "class_1" / "deeper" / "été"
    nested.mkdir(parents=True)
    PIL.new("RGB", (31, 17)).save(nested / "ünïcode-näme.PNG")
    PIL.new("RGB", (20, 10)).save(root / "loose.jpeg")
    # '-' sorts before '/': the order of the paths' parts (deeper/... first), not of their strings
    PIL.new("RGB", (8, 8)).save(root / "class_1" / "deeper-file.jpg")
    index = scan(root, tmp_path / "cache")
    paths, labels = plain_listing(root)
    assert list(index.paths) == paths and index.labels.tolist() == labels
    assert [tuple(size) for size in index.sizes.tolist()] == [PIL.open(path).size[::-1] for path in paths]
    assert index.path(-1) == paths[-1] and index.paths[1:3] == paths[1:3]
    with pytest.raises(IndexError):
        index.path(len(paths))
    assert index.path_bytes.dtype == np.uint8 and index.labels.dtype == np.int32 and index.sizes.dtype == np.int32
    assert index.nbytes == len(index.path_bytes) + 8 * (len(paths) + 1) + 4 * len(paths) + 8 * len(paths)

    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"{os.path.relpath(path, tmp_path)} {label}\n" for path, label in zip(paths, labels)))
    from_list = scan(listing, tmp_path / "cache")
    assert list(from_list.paths) == paths and np.array_equal(from_list.sizes, index.sizes)


def test_the_cache_location_and_a_damaged_cache(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(index_cache.CACHE_DIR_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert index_cache.default_cache_dir() == tmp_path / "xdg" / "fastdino" / "index"
    monkeypatch.setenv(index_cache.CACHE_DIR_ENV_VAR, str(tmp_path / "mine"))
    assert index_cache.default_cache_dir() == tmp_path / "mine" / "index"
    scan_images(folder, num_threads=2)
    (cache,) = (tmp_path / "mine" / "index").iterdir()
    assert cache.name.startswith("data-") and cache.suffix == ".npz"
    cache.write_bytes(b"not a cache")
    scan_images(folder, num_threads=2)
    assert f"index: rebuilt (the cache {cache} could not be read" in capsys.readouterr().err
    cache.unlink()

    def read_only_folder(**_):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(index_cache.tempfile, "mkstemp", read_only_folder)
    assert len(scan_images(folder, num_threads=2)) == 12  # an unwritable cache costs a warning, not the run
    assert "index: could not write the cache" in capsys.readouterr().err


def scan_on_rank(rank, port, folder, bad_folder, cache_dir, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        listed = []
        list_images = image_files.list_images
        image_files.list_images = lambda *args, **kwargs: listed.append(args[0]) or list_images(*args, **kwargs)
        runtime = Runtime(rank, 2, rank, torch.device("cpu"), "gloo")
        index = scan_images(folder, cache_dir=cache_dir, runtime=runtime, verbose=False, skip_bad_files=True)
        try:
            scan_images(bad_folder, cache_dir=cache_dir, runtime=runtime, verbose=False)
            error = None
        except ImageFolderError as raised:
            error = str(raised)
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as file:
            pickle.dump({"listed": listed, "paths": list(index.paths), "labels": index.labels, "sizes": index.sizes,
                         "skipped": index.skipped, "error": error}, file)
    finally:
        dist.destroy_process_group()


def test_rank_zero_scans_and_every_rank_gets_its_index_or_its_error(folder, tmp_path):
    corrupt_the_middle(folder / "class_0" / "image_00000.jpg")
    bad = write_synthetic_image_folder(tmp_path / "bad", n_images=3, image_size=(40, 30), n_classes=1)
    (bad / "class_0" / "text.jpg").write_text("not a JPEG")
    mp.spawn(scan_on_rank, args=(free_port(), str(folder), str(bad), str(tmp_path / "cache"), str(tmp_path)),
             nprocs=2, join=True)
    ranks = []
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as file:
            ranks.append(pickle.load(file))
    assert ranks[0]["listed"] == [str(folder), str(bad)] and ranks[1]["listed"] == []
    assert ranks[0]["paths"] == ranks[1]["paths"] and len(ranks[0]["paths"]) == 11
    assert np.array_equal(ranks[0]["labels"], ranks[1]["labels"])
    assert np.array_equal(ranks[0]["sizes"], ranks[1]["sizes"])
    assert ranks[0]["skipped"] == ranks[1]["skipped"] and len(ranks[0]["skipped"]) == 1
    assert ranks[0]["error"] == ranks[1]["error"] and "text.jpg: not an image" in ranks[1]["error"]


def write_rotated_jpeg(path, orientation=6):
    """64 wide x 32 high, dark left half, bright right half, tagged 'rotate 90 degrees to show'."""
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, 32:] = 220
    pixels[..., 1] = np.linspace(0, 200, 64, dtype=np.uint8)[None, :]
    exif = PIL.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.fromarray(pixels).save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_is_not_applied(tmp_path, random_seed):
    from PIL import ImageOps

    from fastdino.data.torchvision_pipeline import load_rgb_image

    paths = [write_rotated_jpeg(tmp_path / "data" / f"{i}.jpg", orientation)
             for i, orientation in enumerate((6, 8, 3, 6))]
    assert ImageOps.exif_transpose(PIL.open(paths[0])).size == (32, 64)  # the tag is there and means it
    assert load_rgb_image(str(paths[0])).size == (64, 32)
    assert scan(tmp_path / "data", tmp_path / "cache").sizes.tolist() == [[32, 64]] * 4
    if not dali_available():
        return
    recipe = MultiCropRecipe(global_crop_size=24, local_crop_size=16, color_jitter_probability=0.0,
                             grayscale_probability=0.0, blur_probabilities=(0, 0, 0), solarize_probabilities=(0, 0, 0))
    crops = {backend: next(iter(build_multicrop_loader(tmp_path / "data", 4, n_local_crops=1, backend=backend,
                                                       recipe=recipe, num_threads=1, verbose=False, seed=random_seed)))
             for backend in ("dali", "torchvision")}
    for dali_crop, torchvision_crop in zip(crops["dali"], crops["torchvision"]):
        # interpolation rounding only (1/255 level is ~0.017); a rotated decode differs by ~1
        assert (dali_crop - torchvision_crop).abs().mean() < 0.02
