import collections
import os

import numpy as np
import pytest
import torch
from PIL import Image

import adclr.data
from adclr.data import (Augment, DecodeOnlyDataset, ImageFolder, MultiCropDataset, SegmentationFolder,
                        StepBatches, SyntheticFewShapeScenes, SyntheticGreyGroundScenes, SyntheticScenes,
                        SyntheticShapeScenes, SyntheticShapes, TorchStream, normalize, open_dataset,
                        open_segmentation, random_resized_box, random_resized_box_from, replacement,
                        synthetic_batch, train_loader)


def test_builtin_dataset_is_deterministic_with_masks():
    a, b = SyntheticShapes("train"), SyntheticShapes("train")
    image, label = a.load(13)
    assert image.size == (96, 96) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(b.load(13)[0])) and label == 13 % 10
    assert not np.array_equal(np.asarray(image), np.asarray(SyntheticShapes("val").load(13)[0]))
    mask = a.mask(13)
    assert mask.shape == (96, 96) and set(np.unique(mask)) == {0, label + 1}
    assert 0.02 < (mask > 0).mean() < 0.6  # a visible object, not the whole picture
    assert sorted({a.label(i) for i in range(20)}) == list(range(10))


def test_crops_have_the_adclr_structure():
    ds = MultiCropDataset(SyntheticShapes("train", length=20), image_size=32, local_size=16,
                          patch_size=8, num_local_crops=3, num_queries=5)
    item = ds[(4, 123)]
    assert item["globals"].shape == (2, 3, 32, 32) and item["globals"].dtype == torch.uint8
    assert item["locals"].shape == (3, 3, 16, 16)
    assert item["queries"].shape == (5, 3, 8, 8)
    again = ds[(4, 123)]  # crops are a function of the sample seed
    assert all(torch.equal(item[k], again[k]) for k in ("globals", "locals", "queries"))
    assert not torch.equal(ds[(4, 124)]["globals"], item["globals"])


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "a" / "0.png").write_bytes(b"not an image")
    (tmp_path / "b" / "notes.txt").write_text("ignored")
    folder = ImageFolder(str(tmp_path))
    assert folder.classes == ["a", "b"] and len(folder) == 6
    assert folder.load(0)[0] is None and folder.load(1)[0].size == (40, 30)
    ds = MultiCropDataset(folder, 16, 8, 8, 1, 2)
    item = ds[(0, 1)]
    assert item["skipped"] == 1 and item["index"] == 0 and item["globals"].shape == (2, 3, 16, 16)
    assert folder.error(0).startswith("cannot identify image file") and folder.error(1) == ""
    with pytest.raises(FileNotFoundError, match="needs"):
        open_dataset(str(tmp_path), "val")
    assert len(open_dataset(str(tmp_path), "train")) == 6  # training takes any folder


@pytest.mark.parametrize("unreadable,total,readable,skipped", [(3, 200, True, 3), (99, 200, True, 99),
                                                               (100, 200, False, 100), (150, 200, False, 100),
                                                               (50, 50, False, 50)])
@pytest.mark.parametrize("dataset", [MultiCropDataset, DecodeOnlyDataset])
def test_a_sample_gives_up_after_100_unreadable_files_in_a_row(unreadable, total, readable, skipped, dataset,
                                                               tmp_path):
    """Image 0 and the next `unreadable` - 1 files it would try cannot be read (the rest can):
    a sample passes over them, up to 100 files, or all of a smaller set; then it says it
    found none."""
    bad = {replacement(0, k, total) for k in range(unreadable)}
    assert len(bad) == unreadable  # the tries visit distinct files
    for i in range(total):
        if i in bad:
            (tmp_path / f"{i:03d}.png").write_bytes(b"not an image")
        else:
            Image.new("RGB", (20, 20), (i, 0, 0)).save(tmp_path / f"{i:03d}.png")
    item = dataset(ImageFolder(str(tmp_path)), 16, 8, 8, 1, 1)[(0, 0)]
    assert (item["readable"], item["skipped"], item["index"]) == (readable, skipped, 0)
    if dataset is MultiCropDataset:
        assert item["globals"].shape == (2, 3, 16, 16)
    else:  # a blank stand-in where nothing could be read
        assert item["image"].shape[0] == 3 and (readable or not item["image"].any())

def test_step_batches_shard_and_resume():
    full = StepBatches(length=50, global_batch=8, seed=3)
    first = [next(it) for it in [iter(full)] for _ in range(10)]
    assert full.steps_per_epoch == 6
    epoch0 = [i for batch in first[:6] for i, _ in batch]
    assert len(set(epoch0)) == 48  # no image twice in an epoch
    seeds = [seed for batch in first for _, seed in batch]
    assert len(set(seeds)) == 80  # every sample its own crops, within a step and across epochs
    resumed = iter(StepBatches(50, 8, 3, start_step=7))
    assert next(resumed) == first[7] and next(resumed) == first[8]
    ranks = [next(iter(StepBatches(50, 8, 3, rank=r, world_size=2, start_step=2))) for r in (0, 1)]
    assert ranks[0] + ranks[1] == first[2]
    with pytest.raises(ValueError, match="not divisible"):
        StepBatches(50, 8, 0, world_size=3)
    with pytest.raises(ValueError, match="fewer than one batch"):
        StepBatches(5, 8, 0)


@pytest.mark.parametrize("box, source", [(random_resized_box, lambda seed: torch.Generator().manual_seed(seed)),
                                         (random_resized_box_from, lambda seed: TorchStream().seed(seed))],
                         ids=["torch", "stream"])
def test_a_box_can_sit_anywhere_in_the_image(box, source):
    """A 3x3 box (scale 9/30, square) in a 6x5 image: every left in 0..3 and top in 0..2 occurs."""
    boxes = {box(6, 5, (0.3, 0.3), source(seed), ratio=(1, 1)) for seed in range(200)}
    assert {(right - left, bottom - top) for left, top, right, bottom in boxes} == {(3, 3)}
    assert {left for left, *_ in boxes} == set(range(4)) and {top for _, top, *_ in boxes} == set(range(3))


@pytest.mark.parametrize("decode", ["pillow", "cpu"])
def test_train_loader_crops_at_the_configured_scales(decode, tiny_config, monkeypatch):
    """Every box the loader's dataset draws covers a share of the image within its kind's
    configured scale (to the rounding of its sides), none at DINO's defaults."""
    cfg = tiny_config(global_scale=(0.5, 0.9), local_scale=(0.1, 0.3), query_scale=(0.02, 0.04))
    dataset = train_loader(cfg, decode=decode)[0].dataset
    scales = {cfg.image_size: cfg.global_scale, cfg.local_size: cfg.local_scale, cfg.patch_size: cfg.query_scale}
    drawn = []  # (box, output side, image size)
    if decode == "pillow":
        real = adclr.data.crop
        monkeypatch.setattr(adclr.data, "crop", lambda image, box, size, *a: drawn.append(
            (box, size, image.size)) or real(image, box, size, *a))
        for i in range(12):
            dataset[(i, i)]
    else:
        for i in range(12):
            size = dataset.base.load(i)[0].size
            global_, local, query, _, _ = dataset.boxes(*size, i)
            drawn += [(box, side, size) for boxes, side in ((global_, cfg.image_size), (local, cfg.local_size),
                                                            (query, cfg.patch_size)) for box in boxes]
    assert sorted(collections.Counter(side for _, side, _ in drawn).values()) == [12 * 2, 12 * 2, 12 * 3]
    for (left, top, right, bottom), side, (width, height) in drawn:
        w, h, (low, high) = right - left, bottom - top, scales[side]
        slack = (w + h) / 2 + 1  # w and h are rounded from the drawn area's sides
        assert low * width * height - slack <= w * h <= high * width * height + slack, (side, w, h)


def test_augment_output_matches_the_synthetic_batch_structure():
    class Cfg:
        image_size, local_size, patch_size, num_local_crops, num_queries = 32, 16, 8, 2, 3

    ds = MultiCropDataset(SyntheticShapes("train", length=8), 32, 16, 8, 2, 3)
    raw = torch.utils.data.default_collate([ds[(i, i)] for i in range(4)])
    torch.manual_seed(0)
    ready = Augment()(raw)
    fake = synthetic_batch(Cfg, 4, "cpu")
    for key in ("globals", "locals", "queries"):
        assert ready[key].shape == fake[key].shape and ready[key].dtype == fake[key].dtype
    # View-major: rows 0..3 are view A of images 0..3; locals likewise, crop by crop.
    assert ready["globals"].shape == (8, 3, 32, 32) and ready["locals"].shape == (8, 3, 16, 16)
    # Queries are only normalised: identical pixels for student and teacher.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(ready["queries"], (raw["queries"].float() / 255 - mean) / std)
    # Globals are augmented, not just normalised.
    assert not torch.allclose(ready["globals"][:4], (raw["globals"][:, 0].float() / 255 - mean) / std)


def test_one_normaliser_for_loader_pixels_and_augmented_crops():
    x = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    expected = (x.float() / 255 - mean) / std
    assert torch.equal(normalize(x), expected)  # uint8 from the loaders
    assert torch.equal(normalize(x.float() / 255), expected)  # floats in [0, 1] from the augmentations
    assert torch.equal(normalize(x[0]), expected[0])  # one (3, H, W) image


def test_builtin_square_and_diamond_are_different_shapes():
    # A diamond is a square turned 45 degrees: with free rotation the two classes were one
    # shape. Upright objects tell them apart by how much of their bounding box they fill.
    ds = SyntheticShapes("train")

    def box_fill(i):
        ys, xs = np.nonzero(ds.mask(i))
        return len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))

    square, diamond = SyntheticShapes.CLASSES.index("square"), SyntheticShapes.CLASSES.index("diamond")
    assert min(box_fill(square + 10 * k) for k in range(30)) > 0.7
    assert max(box_fill(diamond + 10 * k) for k in range(30)) < 0.6


def test_augment_is_dinos_with_absolute_blur_sigma_for_every_crop_kind():
    """DINO's DataAugmentationDINO: flip, colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8 and
    grayscale p=0.2 on every crop, then blur p=1.0 / 0.1 / 0.5 for view A / view B / locals,
    and solarize p=0.2 on view B alone. The blur's PIL radius (a sigma in pixels) is
    uniform in (0.1, 2.0) whatever the crop size, locals included."""
    ds = MultiCropDataset(SyntheticShapes("train", length=64), 32, 16, 8, 2, 1)
    raw = torch.utils.data.default_collate([ds[(i, i)] for i in range(64)])
    augment = Augment()
    torch.manual_seed(0)
    augment(raw)
    for pipeline, p, solarize, crops in ((augment.view_a, 1.0, [], 64),
                                         (augment.view_b, 0.1, [("RandomSolarize", 0.2)], 64),
                                         (augment.local, 0.5, [], 128)):
        assert [(type(op).__name__, op.p) for op in pipeline] == [
            ("RandomHorizontalFlip", 0.5), ("ColorJitter", 0.8), ("RandomGrayscale", 0.2),
            ("RandomGaussianBlur", p)] + solarize
        jitter = pipeline[1]
        assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (0.4, 0.4, 0.2, 0.1)
        blur = pipeline[3]
        sigma = blur._params["sigma"]  # the sigma drawn for each crop of this call
        assert sigma.shape == (crops,) and sigma.min() >= 0.1 and sigma.max() <= 2.0
        assert sigma.max() > 1.8 and sigma.min() < 0.3  # the whole range, not scaled to 32 or 16 px
        assert blur.flags["kernel_size"] >= 13  # +-3 sigma at sigma 2: no truncated blur


def test_plain_view_a_is_the_crop_or_its_mirror_and_view_b_stays_dinos():
    """ccMIM's view (plain_view_a): the normalised crop, mirrored or not, nothing else."""
    ds = MultiCropDataset(SyntheticShapes("train", length=32), 32, 16, 8, 2, 1)
    raw = torch.utils.data.default_collate([ds[(i, i)] for i in range(32)])
    torch.manual_seed(0)
    ready = Augment(plain_view_a=True)(raw)
    crops, view_a = normalize(raw["globals"][:, 0]), ready["globals"][:32]
    mirrored = [torch.equal(a, c.flip(-1)) for a, c in zip(view_a, crops)]
    kept = [torch.equal(a, c) for a, c in zip(view_a, crops)]
    assert all(m or k for m, k in zip(mirrored, kept)) and 0 < sum(mirrored) < 32
    assert not torch.allclose(ready["globals"][32:], normalize(raw["globals"][:, 1]))


def test_a_folder_without_class_folders_is_one_class(tmp_path):
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    folder = ImageFolder(str(tmp_path))
    assert len(folder) == 3 and {folder.load(i)[1] for i in range(3)} == {0}


def test_16_bit_grey_keeps_its_top_8_bits(tmp_path):
    """Pillow's conversion of a 16-bit grey PNG to RGB clips every value past 255: a
    gradient came out 99.6% white, with --decode pillow and cpu alike."""
    from adclr.data import decode

    grey = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "0.png")
    want = torch.from_numpy((grey >> 8).astype(np.uint8))
    image, _ = ImageFolder(str(tmp_path)).load(0)
    assert torch.equal(torch.from_numpy(np.array(image)).permute(2, 0, 1), want.expand(3, -1, -1))
    with Image.open(tmp_path / "0.png") as opened:
        assert opened.mode.startswith("I")
        assert torch.equal(decode(opened)[0], want.expand(3, -1, -1))


@pytest.mark.parametrize("beside", ["hidden folder", "empty folder"])
def test_a_hidden_or_empty_folder_is_no_class(beside, tmp_path):
    """A flat folder with a notebook's .ipynb_checkpoints/ trained on that folder's image
    alone (its one class); with an empty thumbs/ it held "no images"."""
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    extra = tmp_path / (".ipynb_checkpoints" if beside == "hidden folder" else "thumbs")
    extra.mkdir()
    if beside == "hidden folder":
        Image.new("RGB", (20, 20)).save(extra / "0-checkpoint.png")
    folder = ImageFolder(str(tmp_path))
    assert folder.classes == [] and sorted(os.path.basename(p) for p, _ in folder.samples) == [
        "0.png", "1.png", "2.png"]
    # Inside a class folder too: a hidden folder adds nothing.
    (tmp_path / "a").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "a" / "0.png")
    (tmp_path / "a" / ".cache").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "a" / ".cache" / "1.png")
    folder = ImageFolder(str(tmp_path))
    assert folder.classes == ["a"] and [os.path.relpath(p, tmp_path) for p, _ in folder.samples] == ["a/0.png"]


def test_hidden_files_are_left_out_and_images_beside_class_folders_are_named(tmp_path, capsys):
    """macOS writes ._name.jpg (metadata, not an image) beside each image it copies; images
    directly in a folder that has class folders are not used, and a warning says so."""
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (20, 20)).save(tmp_path / cls / "0.png")
        (tmp_path / cls / "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS metadata")
    for i in range(3):
        Image.new("RGB", (20, 20)).save(tmp_path / f"top{i}.png")
    folder = ImageFolder(str(tmp_path))
    assert [os.path.relpath(p, tmp_path) for p, _ in folder.samples] == ["a/0.png", "b/0.png"]
    assert f"warning: 3 image files directly in {str(tmp_path)!r} are not used: it has class folders (a, b)" \
        in capsys.readouterr().err


def test_evaluation_needs_a_train_folder_beside_val(tmp_path, capsys):
    """Without train/, the whole folder would be the train split, val/ one of its classes:
    the test set in the k-NN bank. Training takes it, saying so."""
    for split in ("", "val/"):
        for cls in ("a", "b"):
            (tmp_path / f"{split}{cls}").mkdir(parents=True)
            Image.new("RGB", (20, 20)).save(tmp_path / f"{split}{cls}" / "0.png")
    with pytest.raises(FileNotFoundError, match="evaluation needs .*train"):
        open_dataset(str(tmp_path), "train", evaluation=True)
    assert len(open_dataset(str(tmp_path), "train")) == 4
    assert "has val/ but no train/: training on every image under it" in capsys.readouterr().err


def test_a_val_class_train_lacks_is_named_with_why(tmp_path):
    """A train class folder without images, or one whose name is spelt in other Unicode code
    points (macOS writes names decomposed), looks present in "is not a class of"."""
    for split, names in (("train", ("a", "caf\u00e9")), ("val", ("a", "b", "cafe\u0301"))):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (20, 20)).save(tmp_path / split / name / "0.png")
    (tmp_path / "train" / "b").mkdir()
    train = ImageFolder(str(tmp_path / "train"))
    with pytest.raises(ValueError, match=r"class 'b' .* is not a class of .*train': .*b' holds no images"):
        ImageFolder(str(tmp_path / "val"), like=train)
    (tmp_path / "val" / "b" / "0.png").unlink()
    with pytest.raises(ValueError, match="the same name in other letter case or Unicode code points"):
        ImageFolder(str(tmp_path / "val"), like=train)
    (tmp_path / "val" / "cafe\u0301" / "0.png").unlink()
    (tmp_path / "val" / "A").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "val" / "A" / "0.png")
    with pytest.raises(ValueError, match=r"class 'A' .* \(it has 'a': the same name in other letter case"):
        ImageFolder(str(tmp_path / "val"), like=train)


def test_unreadable_files_give_their_samples_to_different_images(tmp_path):
    """Ten unreadable files sorted before ten good ones: each bad file's sample goes to
    another image, not all ten to the first good file after them."""
    for i in range(10):
        (tmp_path / f"bad{i}.png").write_bytes(b"not an image")
        Image.new("RGB", (20, 20), (i, 0, 0)).save(tmp_path / f"good{i}.png")
    base = ImageFolder(str(tmp_path))
    dataset = MultiCropDataset(base, 16, 8, 8, 0, 0)
    used = collections.Counter()
    for index in range(len(base)):
        item = dataset[(index, 0)]
        assert item["readable"]
        used[replacement(index, item["skipped"], len(base))] += 1
    assert all("good" in base.samples[i][0] for i in used)
    assert max(used.values()) <= 3 and len(used) == 10  # the next file after the run: 11 of 20



def test_links_are_followed_but_each_real_folder_listed_once(tmp_path):
    """A link to an ancestor (a loop) listed every image again at each depth, 41 times;
    a link to a sibling folder listed its images twice."""
    for cls in ("a", "b"):
        (tmp_path / cls / "sub").mkdir(parents=True)
        Image.new("RGB", (20, 20)).save(tmp_path / cls / "0.png")
        Image.new("RGB", (20, 20)).save(tmp_path / cls / "sub" / "1.png")
    (tmp_path / "a" / "sub" / "loop").symlink_to(tmp_path / "a")
    (tmp_path / "b" / "again").symlink_to(tmp_path / "b" / "sub")
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (20, 20)).save(elsewhere / "2.png")
    (tmp_path / "b" / "linked").symlink_to(elsewhere)  # a link out of the tree is followed
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a-sub").symlink_to(tmp_path / "a" / "sub")  # a class's folder in another class
    Image.new("RGB", (20, 20)).save(tmp_path / "c" / "3.png")
    folder = ImageFolder(str(tmp_path))
    assert [os.path.relpath(path, tmp_path) for path, _ in folder.samples] == [
        "a/0.png", "a/sub/1.png", "b/0.png", "b/again/1.png", "b/linked/2.png", "c/3.png"]
    assert [label for _, label in folder.samples] == [0, 0, 1, 1, 1, 2]
    (tmp_path / "a" / "sub" / "loop").unlink()
    (tmp_path / "masks" / "train").mkdir(parents=True)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "train").symlink_to(tmp_path / "a")
    (tmp_path / "a" / "up").symlink_to(tmp_path / "images")  # images/train/up/train is images/train
    for name in ("0", "sub/1"):
        (tmp_path / "masks" / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (20, 20)).save(tmp_path / "masks" / "train" / f"{name}.png")
    assert len(SegmentationFolder(str(tmp_path), "train")) == 2


def test_val_is_labelled_by_train_class_names(tmp_path):
    for split, classes in (("train", ("cat", "dog", "owl")), ("val", ("dog", "owl"))):
        for cls in classes:
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (20, 20)).save(tmp_path / split / cls / "0.png")
    train = open_dataset(str(tmp_path), "train")
    val = open_dataset(str(tmp_path), "val", like=train)
    assert [label for _, label in train.samples] == [0, 1, 2]
    assert val.classes == ["cat", "dog", "owl"] and [label for _, label in val.samples] == [1, 2]
    assert [label for _, label in open_dataset(str(tmp_path), "val").samples] == [0, 1]  # on its own
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (20, 20)).save(flat / "0.png")
    with pytest.raises(ValueError, match=f"^'{flat}' has no class folders, '{tmp_path}/train' has 3$"):
        ImageFolder(str(flat), like=train)
    (tmp_path / "val" / "emu").mkdir()  # empty: no class, nothing to label
    assert open_dataset(str(tmp_path), "val", like=train).classes == ["cat", "dog", "owl"]
    Image.new("RGB", (20, 20)).save(tmp_path / "val" / "emu" / "0.png")
    with pytest.raises(ValueError, match=f"class 'emu' \\('{tmp_path}/val/emu'\\) is not a class of "
                                         f"'{tmp_path}/train'"):
        open_dataset(str(tmp_path), "val", like=train)


@pytest.mark.parametrize("which", ["missing", "a file"])
def test_a_data_folder_that_is_not_one(which, tmp_path):
    path = tmp_path / "data"
    if which == "a file":
        path.write_text("x")
    message = "does not exist" if which == "missing" else "is a file, not a dataset folder"
    for make in (ImageFolder, lambda root: SegmentationFolder(root, "train")):
        with pytest.raises(OSError, match=f"{path}' {message}"):
            make(str(path))

def test_scenes_are_deterministic_with_masks_that_match_their_labels():
    a, b = SyntheticScenes("train"), SyntheticScenes("train")
    for i in (0, 7, 13):
        image, label = a.load(i)
        image_again, mask = b.load_segmentation(i)
        assert image.size == (96, 96) and label == i % 10
        assert np.array_equal(np.asarray(image), np.asarray(image_again))
        assert np.array_equal(mask, a.mask(i)) and mask.dtype == np.uint8
    assert not np.array_equal(a.mask(13), SyntheticScenes("val").mask(13))
    assert not np.array_equal(a.mask(13), SyntheticScenes("train", seed=1).mask(13))
    objects, main_is_largest = [], []
    for i in range(100):
        image, mask = a.load_segmentation(i)
        present = set(np.unique(mask).tolist()) - {0}
        objects.append(len(present))
        assert a.label(i) + 1 in present and present <= set(range(1, 11))
        counts = np.bincount(mask.ravel(), minlength=11)
        main_is_largest.append(counts[a.label(i) + 1] == counts[1:].max())
        # The mask is where the image shows an object: background pixels keep the plain grey
        # level (up to the noise), object pixels a saturated colour.
        rgb = np.asarray(image).astype(float)
        spread = rgb.max(-1) - rgb.min(-1)
        assert np.median(spread[mask == 0]) < 25 < np.median(spread[mask > 0])
    assert min(objects) >= 2 and max(objects) == 4  # several objects of distinct classes
    assert np.mean(main_is_largest) > 0.95  # the image's label is its largest object's class


def test_scenes_are_balanced():
    scenes = SyntheticScenes("train")
    assert [scenes.label(i) for i in range(20)] == [i % 10 for i in range(20)]
    pixels = sum(np.bincount(scenes.mask(i).ravel(), minlength=11) for i in range(300))
    share = pixels[1:] / pixels[1:].sum()
    assert share.min() > 0.08 and share.max() < 0.12, share  # each class about 10% of the object pixels


@pytest.mark.parametrize("layout", ["images/train", "train/images"])
@pytest.mark.parametrize("masks", ["masks", "annotations"])
def test_segmentation_folder_layouts_and_ignore_index(tmp_path, layout, masks):
    for split in ("train", "val"):
        image_dir = tmp_path / layout.replace("train", split)
        mask_dir = tmp_path / layout.replace("train", split).replace("images", masks)
        (image_dir / "sub").mkdir(parents=True)
        (mask_dir / "sub").mkdir(parents=True)
        for name in ("a", "sub/b"):
            Image.new("RGB", (20, 10), (200, 0, 0)).save(image_dir / f"{name}.jpg")
            labels = np.zeros((10, 20), dtype=np.uint8)
            labels[:, 5:] = 3
            labels[0] = SegmentationFolder.IGNORE
            Image.fromarray(labels).save(mask_dir / f"{name}.png")
    folder = open_segmentation(str(tmp_path), "val")
    assert isinstance(folder, SegmentationFolder) and len(folder) == 2
    image, mask = folder.load_segmentation(1)
    assert image.size == (20, 10) and mask.shape == (10, 20)
    assert set(np.unique(mask).tolist()) == {0, 3, 255} and (mask[0] == 255).all()
    assert folder.load(0)[0].size == (20, 10) and folder.error(0) == ""


def test_segmentation_folder_bad_pairs(tmp_path):
    for d in ("images/training", "annotations/training"):
        (tmp_path / d).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images/training/a.png")
    with pytest.raises(FileNotFoundError, match="1 images .* have no mask, e.g. .*a.png"):
        SegmentationFolder(str(tmp_path), "train")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "annotations/training/a.png")  # colour, not labels
    Image.new("RGB", (8, 8)).save(tmp_path / "images/training/b.png")
    Image.new("L", (6, 8)).save(tmp_path / "annotations/training/b.png")  # the wrong size
    Image.new("RGB", (8, 8)).save(tmp_path / "images/training/c.png")
    Image.new("P", (8, 8)).save(tmp_path / "annotations/training/c.png")  # palette: fine
    folder = SegmentationFolder(str(tmp_path), "train")  # ADE20K's names
    assert folder.load_segmentation(0) == (None, None) and "is a RGB image" in folder.error(0)
    assert folder.load_segmentation(1) == (None, None) and "is 6x8, its image 8x8" in folder.error(1)
    assert folder.load_segmentation(2)[1].shape == (8, 8)
    with pytest.raises(FileNotFoundError, match="no val split of image/mask pairs"):
        SegmentationFolder(str(tmp_path), "val")
    assert isinstance(open_dataset("builtin:scenes", "val"), SyntheticScenes)
    assert type(open_dataset("builtin", "val")) is SyntheticShapes


def test_shape_scenes_are_deterministic_with_masks_that_match_their_labels():
    a = SyntheticShapeScenes("train")
    for i in (0, 7, 13):
        image, label = a.load(i)
        image_again, mask = SyntheticShapeScenes("train").load_segmentation(i)
        assert image.size == (96, 96) and label == i % 10
        assert np.array_equal(np.asarray(image), np.asarray(image_again)) and np.array_equal(mask, a.mask(i))
    for other in (SyntheticShapeScenes("val"), SyntheticShapeScenes("holdout"), SyntheticShapeScenes("train", seed=1)):
        assert not np.array_equal(a.mask(13), other.mask(13))
    assert len(SyntheticShapeScenes("holdout")) == len(SyntheticShapeScenes("val")) == 2000
    objects, main_is_largest, textured = [], [], []
    for i in range(100):
        image, mask = a.load_segmentation(i)
        present = set(np.unique(mask).tolist()) - {0}
        objects.append(len(present))
        assert a.label(i) + 1 in present and present <= set(range(1, 11))
        counts = np.bincount(mask.ravel(), minlength=11)
        main_is_largest.append(counts[a.label(i) + 1] == counts[1:].max())
        background = np.asarray(image)[mask == 0].astype(float)
        textured.append(background.std(0).max() > 3 * 0.03 * 255)  # more than the pixel noise
    assert min(objects) >= 2 and max(objects) == 4
    assert np.mean(main_is_largest) > 0.95
    assert 0.6 < np.mean(textured) < 1  # four texture kinds of five; flat backgrounds too


def test_few_shape_scenes_hold_one_flat_object_of_five_shapes_in_palette_colours():
    scenes = open_segmentation("builtin:few-shape-scenes", "train")
    assert isinstance(scenes, SyntheticFewShapeScenes) and scenes.classes == list(SyntheticFewShapeScenes.CLASSES)
    assert scenes.segmentation_classes == ["background", "disk", "square", "triangle", "cross", "ring"]
    for i in range(30):
        image, mask = scenes.load_segmentation(i)
        assert set(np.unique(mask).tolist()) == {0, scenes.label(i) + 1} and scenes.label(i) == i % 5
        assert 0.22 < (mask > 0).mean() < 0.32  # 25-30% of the image, up to the drawing's pixels
        pixels = np.asarray(image).astype(float)
        palette = 255 * np.array(SyntheticFewShapeScenes.PALETTE)
        nearest = []
        for region in (mask == 0, mask > 0):  # one palette colour each, up to the pixel noise
            assert pixels[region].std(0).max() < 2 * 0.03 * 255
            distances = np.abs(palette - pixels[region].mean(0)).max(1)
            assert distances.min() < 3
            nearest.append(distances.argmin())
        assert nearest[0] != nearest[1]  # the outline shows
    # Sized by name: the five shapes' areas are theirs, not those of the first five of ten
    # (the ten-shape set measures the rest, whichever test ran first).
    SyntheticShapeScenes("train", length=1)
    assert SyntheticScenes._unit_areas["cross"] != SyntheticScenes._unit_areas["diamond"]


def test_grey_ground_scenes_are_few_shape_scenes_on_a_grey_background():
    """Same objects and masks, objects in the palette's colours, the background grey."""
    grey, few = open_segmentation("builtin:grey-ground-scenes", "train"), SyntheticFewShapeScenes("train")
    assert isinstance(grey, SyntheticGreyGroundScenes)
    levels = 255 * np.array(SyntheticGreyGroundScenes.BACKGROUND)
    for i in range(20):
        (image, mask), (_, other_mask) = grey.load_segmentation(i), few.load_segmentation(i)
        assert np.array_equal(mask, other_mask)
        pixels, palette = np.asarray(image).astype(float), 255 * np.array(SyntheticFewShapeScenes.PALETTE)
        assert np.abs(palette - pixels[mask > 0].mean(0)).max(1).min() < 3
        background = pixels[mask == 0].mean(0)
        assert np.abs(levels - background).max(1).min() < 3
        assert np.abs(palette - background).max(1).min() > 20  # no object's colour


def class_colours(scenes, images=300):
    """(K, 3) mean RGB in [0, 1] of each class's visible pixels over the first images."""
    k = len(scenes.CLASSES)
    sums, counts = np.zeros((k, 3)), np.zeros(k)
    for i in range(images):
        image, mask = scenes.load_segmentation(i)
        pixels = np.asarray(image).reshape(-1, 3) / 255
        labels = mask.ravel()
        for c in range(k):
            sums[c] += pixels[labels == c + 1].sum(0)
            counts[c] += (labels == c + 1).sum()
    return sums / counts[:, None]


def test_in_shape_scenes_colour_says_nothing_of_the_class():
    """Every class has the same mean colour there (up to sampling), unlike the colour-coded scenes."""
    def spread(scenes):
        colours = class_colours(scenes)
        return np.abs(colours - colours.mean(0)).max()

    assert spread(SyntheticShapeScenes("train")) < 0.1  # 0.06: sampling; each class has ~90 objects here
    assert spread(SyntheticFewShapeScenes("train")) < 0.1  # 60 objects a class, one colour each
    assert spread(SyntheticScenes("train")) > 0.25


def test_every_shape_lies_within_the_box_shape_scenes_draw_it_in():
    """SyntheticShapeScenes draws each object only within 1.2 radii of its centre."""
    t = np.linspace(-2, 2, 801, dtype=np.float32)
    u, v = np.meshgrid(t, t)
    for name in SyntheticShapes.CLASSES:
        inside = SyntheticShapes._shape(name, u, v)
        assert inside.any() and (u[inside] ** 2 + v[inside] ** 2).max() <= 1.2 ** 2
