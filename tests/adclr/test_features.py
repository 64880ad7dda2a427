"""What the evaluation protocols share: the fixed image subset and the centre-crop view."""

import numpy as np
import torch
from PIL import Image

from adclr.features import CenterCrops, collate, fixed_subset, open_labelled_splits


def test_fixed_subset_is_fixed_sorted_and_spans_a_class_sorted_folder():
    subset = fixed_subset(1000, 100)
    assert subset == fixed_subset(1000, 100) and subset == sorted(subset) and len(set(subset)) == 100
    assert {i // 100 for i in subset} == set(range(10))  # 10 classes of 100 in a row: every one kept
    assert subset != list(range(0, 1000, 10))  # not evenly spaced: no aliasing with a periodic labelling
    assert list(fixed_subset(50, 0)) == list(range(50)) and list(fixed_subset(50, 80)) == list(range(50))


class Images:
    """Image i is 40 x 30 with a bright centre; i = 2 cannot be read."""

    def __len__(self):
        return 4

    def load(self, i):
        if i == 2:
            return None, 0
        pixels = np.zeros((30, 40, 3), np.uint8)
        pixels[5:25, 10:30] = 255
        return Image.fromarray(pixels), i % 2


def test_center_crops_are_the_centre_and_unreadable_files_are_dropped():
    crops = CenterCrops(Images(), 16)
    images, labels, unreadable = collate([crops[i] for i in range(len(crops))])
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 1, 1] and unreadable == [2]
    # 0.875 of the short side (26 px) around the centre: the bright square fills most of it.
    assert images.float().mean() > 0.5 * 255


def test_a_train_split_of_one_class_is_named(tmp_path, capsys):
    """k-NN and linear on one class score 100% whatever the features."""
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        Image.new("RGB", (20, 20)).save(tmp_path / split / "cat" / "0.png")
    train, val = open_labelled_splits(str(tmp_path))
    assert len(train) == len(val) == 1
    assert "warning: --data: the train split has one class (cat): every accuracy is 100%" in capsys.readouterr().err
