"""Datasets, ADCLR's crops, and the batched augmentation.

The work is split where it is cheapest: loader workers decode each image (Pillow) and
cut its crops (random-resized crops are per-image because images differ in size), and
ship small uint8 tensors; the photometric augmentations (flip, colour jitter,
grayscale, blur, solarize) then run batched with kornia on the training device.

A batch ready for `adclr.train.train_step` is a dict of float tensors, view-major:

    globals  (2 * B, 3, G, G)   rows [view A of every image | view B of every image]
    locals   (L * B, 3, l, l)   or None when L = 0
    queries  (B, Q, 3, p, p)    query crops of the raw image, shared by both views
"""

from __future__ import annotations

import colorsys
import ctypes
import functools
import io
import math
import os
import signal
import sys
import unicodedata

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")


# --------------------------------------------------------------------------- datasets

class SyntheticShapes:
    """Built-in dataset: 10 classes of coloured shapes, generated on the fly.

    Image i is a pure function of (seed, split, i), so the data needs no download and
    is identical everywhere. Each image holds one object of its class on a plain grey
    background with pixel noise: the class fixes the shape and a colour family (a hue
    band of its own); size, position, a tilt of up to 10 degrees, saturation,
    brightness and the background's grey level vary. `mask(i)` gives its per-pixel
    labels (0 background, class + 1 on the object).

    The background is plain on purpose: textured backgrounds (stripes, checkerboards)
    survive every DINO augmentation, so a short self-supervised run clusters images by
    background instead of by object, and k-NN accuracy never rises on a CPU budget.
    """

    CLASSES = ("disk", "square", "diamond", "triangle", "hexagon", "ring", "cross", "star",
               "ellipse", "crescent")

    # Each split its own stream of random numbers. "holdout" is for choosing settings
    # (`adclr sweep`), so that the val split reports on images no choice has seen.
    SPLITS = {"train": 0, "val": 1, "holdout": 2}

    def __init__(self, split="train", size=96, length=None, seed=0):
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {', '.join(map(repr, self.SPLITS))}, got {split!r}")
        self.split, self.size, self.seed = split, size, seed
        self.length = length or (10000 if split == "train" else 2000)
        self.classes = list(self.CLASSES)

    def __len__(self):
        return self.length

    def label(self, i):
        return i % len(self.CLASSES)  # balanced classes

    def _render(self, i):
        rng = np.random.default_rng([self.seed, self.SPLITS[self.split], i])
        s = self.size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        image = np.full((s, s, 3), rng.uniform(0.1, 0.9), dtype=np.float32)
        label = self.label(i)
        radius = rng.uniform(0.2, 0.35)
        cx, cy = rng.uniform(radius, 1 - radius, 2)  # the whole object is in the picture
        inside, colour = self._object(rng, label, radius, cx, cy, xx, yy)
        image = np.where(inside[..., None], colour, image)
        image = image + rng.normal(0, 0.03, image.shape)
        image = (np.clip(image, 0, 1) * 255).astype(np.uint8)
        return image, inside.astype(np.uint8) * (label + 1)

    def _object(self, rng, label, radius, cx, cy, xx, yy):
        """(pixels inside, RGB colour) of one object of class `label` centred at (cx, cy)."""
        inside = self._inside(rng, label, radius, cx, cy, xx, yy)
        hue = (label / len(self.CLASSES) + rng.uniform(-0.03, 0.03)) % 1.0
        colour = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0))
        return inside, np.array(colour, dtype=np.float32)

    def _inside(self, rng, label, radius, cx, cy, xx, yy):
        """The pixels of one object of class `label` centred at (cx, cy), tilted at random."""
        # Upright up to a small tilt: under any rotation a square is a diamond (a square
        # turned 45 degrees, 13% smaller), and two classes of one shape cannot be told apart.
        angle = rng.uniform(-np.pi / 18, np.pi / 18)
        u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / radius
        v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / radius
        return self._shape(self.CLASSES[label], u, v)

    @staticmethod
    def _shape(name, u, v):
        r2 = u * u + v * v
        if name == "disk":
            return r2 <= 1
        if name == "square":
            return np.maximum(abs(u), abs(v)) <= 0.8
        if name == "diamond":
            return abs(u) + abs(v) <= 1
        if name in ("triangle", "hexagon"):
            n, reach = (3, 0.5) if name == "triangle" else (6, 0.87)
            angles = np.pi / 2 + 2 * np.pi * np.arange(n) / n
            return np.all([u * np.cos(a) + v * np.sin(a) <= reach for a in angles], axis=0)
        if name == "ring":
            return (r2 <= 1) & (r2 >= 0.55 ** 2)
        if name == "cross":
            return ((abs(u) <= 0.3) & (abs(v) <= 1)) | ((abs(v) <= 0.3) & (abs(u) <= 1))
        if name == "star":
            return np.sqrt(r2) <= 0.45 + 0.55 * abs(np.cos(2.5 * np.arctan2(v, u)))
        if name == "ellipse":
            return u * u + v * v / 0.3 <= 1
        if name == "crescent":
            return (r2 <= 1) & ((u - 0.5) ** 2 + v * v > 0.7 ** 2)
        raise ValueError(name)

    def load(self, i):
        """(PIL RGB image, label); never fails."""
        return Image.fromarray(self._render(i)[0]), self.label(i)

    def open(self, i):
        """Image i as a PIL image (`ImageFolder.open`'s protocol); never fails."""
        return self.load(i)[0]

    def mask(self, i):
        """(size, size) uint8 per-pixel labels: 0 background, class + 1 on the object."""
        return self._render(i)[1]

    def load_segmentation(self, i):
        """(PIL RGB image, its mask) from one rendering."""
        image, mask = self._render(i)
        return Image.fromarray(image), mask

    @property
    def segmentation_classes(self):
        """Names of the mask's values 0, 1, ..."""
        return ["background", *self.CLASSES]


class SyntheticScenes(SyntheticShapes):
    """Built-in scenes for dense evaluation: several objects of different classes per image.

    The objects are SyntheticShapes' (the same 10 shapes, colour families and tilt), two
    to four of distinct classes per image at random places, smaller ones in front of
    larger ones where they overlap (so every object shows). The main object, of class
    `label(i)` (balanced: i % 10), is the largest: 12-25% of the image's area, the others
    1.5-8% each, of classes drawn uniformly from the rest. Sizes are areas, equal for
    every shape, so each class covers about the same share of pixels. Where the objects
    sit changes from image to image, so a patch's class cannot be read off one code for
    the whole image. `mask(i)`: 0 background, class + 1 where that class is visible.
    Deterministic in (seed, split, i), like SyntheticShapes.

    The colour families stay: a patch's colour alone says much about its class (a probe
    on a random network's patch tokens gets about 60% mIoU), but with random colours,
    shape alone, a 300-step CPU run learned nothing (k-NN and mIoU at chance).
    """

    _unit_areas = {}  # area of each shape at radius 1, by name, measured once
    OTHERS = (1, 3)  # how many objects besides the main one, at least and at most
    MAIN_AREA = (0.12, 0.25)

    def __init__(self, split="train", size=96, length=None, seed=0):
        super().__init__(split, size, length, seed)
        t = np.linspace(-1.5, 1.5, 601, dtype=np.float32)
        u, v = np.meshgrid(t, t)
        for name in self.CLASSES:
            if name not in self._unit_areas:
                self._unit_areas[name] = self._shape(name, u, v).mean() * 9

    def _placed_objects(self, rng, i):
        """Image i's objects as (class, radius, centre x, centre y), largest first, so that
        smaller ones are painted in front and each shows. A generator: each centre is drawn
        from `rng` after the object before it is painted, the order the scenes were made in."""
        label = self.label(i)
        others = rng.permutation([c for c in range(len(self.CLASSES)) if c != label])[:rng.integers(self.OTHERS[0], self.OTHERS[1] + 1)]
        classes = [label, *others.tolist()]
        areas = [rng.uniform(*self.MAIN_AREA)] + [rng.uniform(0.015, 0.08) for _ in others]
        for j in np.argsort(areas)[::-1]:
            radius = np.sqrt(areas[j] / self._unit_areas[self.CLASSES[classes[j]]])
            yield (classes[j], radius, *rng.uniform(radius, 1 - radius, 2))

    def _render(self, i):
        rng = np.random.default_rng([self.seed, self.SPLITS[self.split], i, 1])
        s = self.size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        image = np.full((s, s, 3), rng.uniform(0.1, 0.9), dtype=np.float32)
        mask = np.zeros((s, s), dtype=np.uint8)
        for cls, radius, cx, cy in self._placed_objects(rng, i):
            inside, colour = self._object(rng, cls, radius, cx, cy, xx, yy)
            image[inside] = colour
            mask[inside] = cls + 1
        image = image + rng.normal(0, 0.03, image.shape)
        return (np.clip(image, 0, 1) * 255).astype(np.uint8), mask


class SyntheticShapeScenes(SyntheticScenes):
    """Built-in scenes where only an object's shape gives its class.

    SyntheticScenes' layout (two to four objects of distinct classes at random places, the
    main one the largest, smaller ones in front, whole objects in the picture), but every
    object is painted with a texture of a random kind (flat, stripes, checks, dots or
    blobs) in two random colours, drawn independently of its class, on a background
    textured the same way. An object's mean colour differs from the background's (so that
    its outline shows); nothing else but its outline says which class it is. `mask(i)`:
    0 background, class + 1 where that class is visible. Deterministic in (seed, split, i).
    """

    TEXTURED = True  # False: every texture drawn is painted flat (its first colour)
    PALETTE = None  # or RGB colours in [0, 1] to paint with instead of any colour
    BACKGROUND = None  # or RGB colours to paint the background with instead of PALETTE's
    def _render(self, i):
        rng = np.random.default_rng([self.seed, self.SPLITS[self.split], i, 2])
        s = self.size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        image = self._painted(rng, xx, yy, self.BACKGROUND)
        mask = np.zeros((s, s), dtype=np.uint8)
        for cls, radius, cx, cy in self._placed_objects(rng, i):
            # Every shape lies within 1.2 radii of its centre: only that square is drawn on.
            box = tuple(slice(max(0, int((c - 1.2 * radius) * s)), int(np.ceil((c + 1.2 * radius) * s)) + 1)
                        for c in (cy, cx))
            x, y = xx[box], yy[box]
            inside = self._inside(rng, cls, radius, cx, cy, x, y)
            behind = image[box][inside].mean(0)
            for _ in range(20):  # an outline to see: not the colour of what it covers, on average
                paint = self._painted(rng, x[inside], y[inside])
                if np.linalg.norm(paint.mean(0) - behind) > 0.25:
                    break
            image[box][inside] = paint
            mask[box][inside] = cls + 1
        image += rng.standard_normal(image.shape, dtype=np.float32) * 0.03
        return (np.clip(image, 0, 1) * 255).astype(np.uint8), mask

    def _painted(self, rng, x, y, palette=None):
        """(*x.shape, 3): a texture of a random kind in two random colours at image points (x, y),
        from `palette` (else PALETTE) when one is given."""
        colours = np.array([colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 1), rng.uniform(0.2, 1))
                            for _ in range(2)], dtype=np.float32)
        palette = palette or self.PALETTE
        if palette is not None:  # drawn after the colours above, so that the draws stay in step
            colours = np.array(palette, dtype=np.float32)[rng.integers(len(palette), size=2)]
        kind = rng.integers(5) if self.TEXTURED else 0
        angle, period, phase = rng.uniform(0, np.pi), rng.uniform(0.06, 0.2), rng.uniform(0, 2 * np.pi, 2)
        u = (x * np.cos(angle) + y * np.sin(angle)) * (2 * np.pi / period) + phase[0]
        v = (-x * np.sin(angle) + y * np.cos(angle)) * (2 * np.pi / period) + phase[1]
        if kind == 0:  # flat
            t = np.zeros_like(x, dtype=bool)
        elif kind == 1:  # stripes
            t = np.sin(u) > 0
        elif kind == 2:  # checks
            t = np.sin(u) * np.sin(v) > 0
        elif kind == 3:  # dots
            t = np.cos(u) + np.cos(v) > 1
        else:  # blobs: where three slow waves of random directions add up above 0
            waves = rng.normal(0, 12, (3, 2)).astype(np.float32)
            t = sum(np.sin(x * a + y * b + c) for (a, b), c in zip(waves, rng.uniform(0, 2 * np.pi, 3))) > 0
        return np.where(t[..., None], colours[1], colours[0])


_WARNED = set()


def warn_once(text):
    """`warning: text` on stderr, once per process (compare and sweep open their data for
    every run) and from the first process of a distributed run only."""
    if text not in _WARNED and os.environ.get("RANK", "0") == "0":
        _WARNED.add(text)
        print(f"warning: {text}", file=sys.stderr)


def check_folder(root):
    """FileNotFoundError (NotADirectoryError for a file) naming `root` when it is not a folder."""
    if not os.path.exists(root):
        if root.startswith("builtin"):
            raise FileNotFoundError(f"{root!r} is no built-in set (those are {', '.join(BUILTIN)}), "
                                    "nor a dataset folder")
        raise FileNotFoundError(f"dataset folder {root!r} does not exist")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{root!r} is a file, not a dataset folder")


def image_files(top, recursive=True, seen=None):
    """The image files under `top` (only those directly in it unless `recursive`), in sorted
    folder order, hidden folders (".ipynb_checkpoints") and files left out (macOS leaves a
    "._name.jpg" of metadata beside each image it copies to another disk). Links to folders are
    followed, but each real folder is listed once: a link to an ancestor would otherwise
    list the same images again at every depth. `seen`: the real folders already listed
    (by another class's call), updated."""
    listed, seen = [], set() if seen is None else seen
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        # Sorted: which of two links to one folder is kept is the same on every machine.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        real = os.path.realpath(dirpath)
        if real in seen or not recursive:
            dirnames[:] = []  # do not descend
        if real in seen:
            continue
        seen.add(real)
        listed.append((dirpath, [f for f in sorted(filenames)
                                 if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]))
    return [os.path.join(dirpath, f) for dirpath, files in sorted(listed) for f in files]


def _why_not_a_class(name, split):
    """What a user would not see in "class NAME is not a class of SPLIT". Names are compared
    as listed: macOS's file systems find a folder by a name in other letter case or Unicode
    code points, so `isdir` would say yes to either."""
    def spelling(n):
        return unicodedata.normalize("NFC", n).casefold()

    alike = [c for c in split.classes if spelling(c) == spelling(name)]
    if alike:
        return (f" (it has {alike[0]!r}: the same name in other letter case or Unicode code points, as "
                "macOS may write it; rename one)")
    if name in os.listdir(split.root):
        return f": {os.path.join(split.root, name)!r} holds no images"
    return ""


class ImageFolder:
    """Images under `root/<class>/**` (or directly under `root`, all label 0, where no
    folder holds any: an empty folder or a hidden one, such as ".ipynb_checkpoints", is no
    class).

    `load(i)` returns (PIL RGB image, label), or (None, label) for a file Pillow cannot
    read: callers skip it and count it (`warn_unreadable`), a bad file never stops a run.
    """

    def __init__(self, root, like=None):
        """`like`: another split's ImageFolder whose class names label this one (an evaluation's
        train split for its val split); a class folder it does not have is a ValueError."""
        check_folder(root)
        self.root = root
        seen = set()  # real folders listed: a folder linked into two classes is listed once
        files = {d: image_files(os.path.join(root, d), seen=seen) for d in sorted(os.listdir(root))
                 if not d.startswith(".") and os.path.isdir(os.path.join(root, d))}
        found = [d for d, paths in files.items() if paths]
        self.classes = found if like is None else like.classes
        unknown = [name for name in found if name not in self.classes]
        if unknown:
            raise ValueError(f"class {unknown[0]!r} ({os.path.join(root, unknown[0])!r}) is not a class of "
                             f"{like.root!r}{_why_not_a_class(unknown[0], like)}")
        if self.classes and not found:
            raise ValueError(f"{root!r} has no class folders, {like.root!r} has {len(self.classes)}")
        label = {name: i for i, name in enumerate(self.classes)}
        self.samples = [(path, label[folder]) for folder in found for path in files[folder]]
        beside = image_files(root, recursive=False)
        if not found:  # images directly in root, all label 0
            self.samples = [(path, 0) for path in beside]
        elif beside:
            warn_once(f"{len(beside)} image file{'s' * (len(beside) != 1)} directly in {root!r} "
                      f"{'are' if len(beside) != 1 else 'is'} not used: it has class folders "
                      f"({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}), and only their images are")
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root!r}")

    def __len__(self):
        return len(self.samples)

    def load(self, i):
        try:
            return self._open(i)
        except Exception:  # truncated, not an image, unreadable: skip, never fatal
            return None, self.samples[i][1]

    def error(self, i):
        """Why image i cannot be read ("" if it can)."""
        try:
            self._open(i)
        except Exception as error:
            return str(error)
        return ""

    def _open(self, i):
        path, label = self.samples[i]
        with Image.open(path) as image:
            return to_rgb(image), label

    def open(self, i):
        """Image i opened but not decoded yet (its size is read, its pixels are not), so
        that the caller can decode it reduced (`decode`). Raises what Pillow raises for
        a file it cannot open; the caller closes the image."""
        return Image.open(self.samples[i][0])


class SegmentationFolder:
    """One split of a segmentation set: images with same-named PNG label masks.

    Either layout of the common sets: ROOT/images/SPLIT with ROOT/masks/SPLIT or
    ROOT/annotations/SPLIT (ADE20K's, where SPLIT is training / validation), or
    ROOT/SPLIT/images with ROOT/SPLIT/masks or ROOT/SPLIT/annotations. The mask of
    images/.../x.jpg is masks/.../x.png: an 8-bit grey or palette PNG holding one class
    index per pixel, IGNORE (255) where no class counts. `load_segmentation(i)` returns
    (PIL RGB image, (H, W) uint8 mask), or (None, None) when the pair cannot be used
    (`error(i)` says why); like ImageFolder, a bad file never stops a run.
    """

    IGNORE = 255
    SPLITS = {"train": ("train", "training"), "val": ("val", "validation"), "holdout": ("holdout",)}

    def __init__(self, root, split):
        check_folder(root)
        candidates = [(os.path.join(root, "images", name), os.path.join(root, masks, name))
                      for name in self.SPLITS[split] for masks in ("masks", "annotations")]
        candidates += [(os.path.join(root, name, "images"), os.path.join(root, name, masks))
                       for name in self.SPLITS[split] for masks in ("masks", "annotations")]
        found = [(i, m) for i, m in candidates if os.path.isdir(i) and os.path.isdir(m)]
        if not found:
            names = " or ".join(self.SPLITS[split])
            raise FileNotFoundError(
                f"no {split} split of image/mask pairs in {root!r}: expected images/{{{names}}} beside "
                f"masks/ or annotations/ (the same sub-folder), or {{{names}}}/images beside "
                f"{{{names}}}/masks or annotations")
        self.root, (self.image_dir, self.mask_dir) = root, found[0]
        self.classes = []  # no image-level classes
        self.samples, missing = [], []
        for image in image_files(self.image_dir):
            rel = os.path.splitext(os.path.relpath(image, self.image_dir))[0] + ".png"
            mask = os.path.join(self.mask_dir, rel)
            (self.samples if os.path.isfile(mask) else missing).append((image, mask))
        if missing:
            raise FileNotFoundError(f"{len(missing)} images in {self.image_dir!r} have no mask, "
                                    f"e.g. {missing[0][1]!r} for {missing[0][0]!r}")
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.image_dir!r}")

    def __len__(self):
        return len(self.samples)

    def load(self, i):
        image, _ = self.load_segmentation(i)
        return image, 0

    def load_segmentation(self, i):
        try:
            return self._open(i)
        except Exception:  # unreadable image or mask, or they disagree: skip, never fatal
            return None, None

    def error(self, i):
        """Why pair i cannot be used ("" if it can)."""
        try:
            self._open(i)
        except Exception as error:
            return str(error)
        return ""

    def _open(self, i):
        image_path, mask_path = self.samples[i]
        with Image.open(image_path) as image:
            image = to_rgb(image)
        with Image.open(mask_path) as mask:
            if mask.mode not in ("L", "P"):
                raise ValueError(f"mask {mask_path} is a {mask.mode} image; a label mask is an 8-bit "
                                 "grey or palette PNG with one class index per pixel")
            mask = np.asarray(mask, dtype=np.uint8).copy()
        if mask.shape != (image.height, image.width):
            raise ValueError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]}, "
                             f"its image {image.width}x{image.height}")
        return image, mask


def warn_unreadable(base, indices, warned):
    """Warn about each unreadable image of `base` at `indices` not yet in `warned` (then in it).

    Loader workers only count the files they skip: the warning comes from the main
    process, once per file however often a run meets it.
    """
    for i in indices:
        i %= len(base)
        if i not in warned:
            warned.add(i)
            print(f"warning: skipping unreadable image {base.samples[i][0]}: {base.error(i)}", file=sys.stderr)


class SyntheticFewShapeScenes(SyntheticShapeScenes):
    """SyntheticShapeScenes within reach of a short CPU run: one object of five far-apart
    shapes, 25-30% of the image, flat on a flat background, each in one of four colours
    drawn at random (the object's not the background's), independent of the class.

    Few colours on purpose: with SyntheticShapeScenes' continuous random colours (even
    flat, even one object of these five shapes) two views of an image share their
    colours and little else, so a short self-supervised run tells images apart by colour,
    which says nothing of the class, and k-NN stays at random init's.
    """

    CLASSES = ("disk", "square", "triangle", "cross", "ring")
    OTHERS = (0, 0)
    MAIN_AREA = (0.25, 0.3)
    TEXTURED = False
    PALETTE = ((0.9, 0.2, 0.2), (0.2, 0.8, 0.2), (0.2, 0.3, 0.9), (0.9, 0.9, 0.3))


class SyntheticGreyGroundScenes(SyntheticFewShapeScenes):
    """SyntheticFewShapeScenes (the same objects, masks and colours) on a grey background of
    one of three levels: a patch's colour says whether it is object or background, not
    which class.

    In SyntheticFewShapeScenes the background takes the objects' colours, so whether a
    patch is object shows only against the rest of the image; a linear dense probe on
    the patch tokens of a short CPU run then labels every pixel background, trained or
    not, and mIoU cannot tell runs apart (bench/NOTES.md, "Why the dense probe did not move").
    """

    BACKGROUND = ((0.3, 0.3, 0.3), (0.5, 0.5, 0.5), (0.7, 0.7, 0.7))


BUILTIN = {"builtin": SyntheticShapes, "builtin:shapes": SyntheticShapes, "builtin:scenes": SyntheticScenes,
           "builtin:shape-scenes": SyntheticShapeScenes, "builtin:few-shape-scenes": SyntheticFewShapeScenes,
           "builtin:grey-ground-scenes": SyntheticGreyGroundScenes}


def open_dataset(data, split, like=None, evaluation=False):
    """`data` None/"builtin" -> SyntheticShapes, "builtin:scenes" -> SyntheticScenes,
    "builtin:shape-scenes" -> SyntheticShapeScenes; else a folder (uses `data/split` if it exists).

    Training accepts any folder of images; evaluation (`evaluation`) needs labelled train
    and val splits, so for a folder it requires `data/train` and `data/val` (ImageNet
    layout): the whole folder as train would hold val/ as a class, the test set in the
    k-NN bank. `like`: the split whose class names label this one (see ImageFolder).
    """
    if data in (None, ""):
        data = "builtin"
    if data in BUILTIN:
        return BUILTIN[data](split)
    sub = os.path.join(data, split)
    if os.path.isdir(sub):
        return ImageFolder(sub, like)
    check_folder(data)  # a missing --data is named as such
    if split == "train" and not evaluation:
        if os.path.isdir(os.path.join(data, "val")):
            warn_once(f"{data!r} has val/ but no train/: training on every image under it, val/'s too")
        return ImageFolder(data)
    other = os.path.join(data, "val" if split == "train" else "train")
    raise FileNotFoundError(f"evaluation needs {sub!r} (and {other!r}) with one sub-folder per class")


def open_segmentation(data, split):
    """A built-in set (`open_dataset`'s names; default "builtin:shape-scenes"), or a SegmentationFolder."""
    if data in (None, ""):
        data = "builtin:shape-scenes"
    if data in BUILTIN:
        return BUILTIN[data](split)
    return SegmentationFolder(data, split)


# --------------------------------------------------------------------------- crops (in workers)

def random_resized_box(width, height, scale, generator, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop box: (left, top, right, bottom) in pixels."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        r = torch.rand(3, generator=generator).tolist()
        target = area * (scale[0] + r[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + r[1] * (log_ratio[1] - log_ratio[0]))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            return left, top, left + w, top + h
    side = min(width, height)  # fallback: centre square
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def crop(image, box, size, resample=Image.BICUBIC):
    return to_tensor(image.resize((size, size), resample, box=box))


def normalize(images):
    """Pixels as every model here sees them: (x - ImageNet mean) / ImageNet std per channel
    (dim -3), on the images' device. uint8 images are scaled to [0, 1] first; float ones
    must be in [0, 1] already (augmented crops)."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images
    mean, std = _imagenet_statistics(x.device)
    return (x - mean) / std


@functools.cache
def _imagenet_statistics(device):
    # Made once per device: a tensor built from Python numbers on every call would be a
    # blocking host-to-device copy in each training step.
    return (torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1))


def center_crop(image, size, fraction=0.875):
    """Evaluation view: central `fraction` square (DINO's resize 256 / crop 224), resized."""
    side = min(image.size) * fraction
    left, top = (image.width - side) / 2, (image.height - side) / 2
    return crop(image, (left, top, left + side, top + side), size)


# Unreadable files tried for one sample after which training stops: a folder of images
# has a bad file here and there, not this many on one sample's path through it.
UNREADABLE_IN_A_ROW = 100


@functools.lru_cache(maxsize=64)
def _replacement_stride(n):
    stride = max(1, round(n * 0.6180339887))  # the golden ratio: far from every earlier try
    while math.gcd(stride, n) != 1:
        stride += 1
    return stride


def replacement(index, k, n):
    """The file a sample of image `index` (of n) tries `k`-th: itself, then a stride through
    the set rather than the next file, so that a run of unreadable files (a folder of
    copies gone bad) is left at once, and each unreadable file's samples go to another
    image, not all to the first readable file after the run."""
    return (index + k * _replacement_stride(n)) % n


class MultiCropDataset(torch.utils.data.Dataset):
    """Cuts ADCLR's crops of one image: indexed by (image index, sample seed).

    The seed comes from the sampler, so the crops of a sample depend on (run seed,
    epoch, position) only: a resumed run sees exactly the data it would have seen.
    """

    def __init__(self, base, image_size, local_size, patch_size, num_local_crops, num_queries,
                 global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), query_scale=(0.05, 0.15)):
        self.base = base
        self.image_size, self.local_size, self.patch_size = image_size, local_size, patch_size
        self.num_local_crops, self.num_queries = num_local_crops, num_queries
        self.global_scale, self.local_scale, self.query_scale = global_scale, local_scale, query_scale

    def __len__(self):
        return len(self.base)

    def __getitem__(self, item):
        """The crops of image `index` or, if it cannot be read, of the first readable one of its
        `replacement`s; "skipped" says how many were passed over. After UNREADABLE_IN_A_ROW files
        none of which can be read (or all of a smaller set), zero crops and "readable" False: the
        run stops there."""
        index, seed = item
        image, skipped = self.base.load(index)[0], 0
        while image is None and skipped + 1 < min(UNREADABLE_IN_A_ROW, len(self.base)):
            skipped += 1
            image = self.base.load(replacement(index, skipped, len(self.base)))[0]
        if image is None:
            skipped += 1
            image = Image.new("RGB", (self.image_size, self.image_size))
        g = torch.Generator().manual_seed(seed)
        W, H = image.size
        views = [crop(image, random_resized_box(W, H, self.global_scale, g), self.image_size)
                 for _ in range(2)]
        local = [crop(image, random_resized_box(W, H, self.local_scale, g), self.local_size)
                 for _ in range(self.num_local_crops)]
        queries = [crop(image, random_resized_box(W, H, self.query_scale, g), self.patch_size)
                   for _ in range(self.num_queries)]
        p, l = self.patch_size, self.local_size
        return {
            "index": index,  # with "skipped": which files were skipped (`replacement`)
            "globals": torch.stack(views),
            "locals": torch.stack(local) if local else torch.empty(0, 3, l, l, dtype=torch.uint8),
            "queries": torch.stack(queries) if queries else torch.empty(0, 3, p, p, dtype=torch.uint8),
            "skipped": skipped,
            "readable": skipped < min(UNREADABLE_IN_A_ROW, len(self.base)),
        }


# --------------------------------------------------------------------------- decode only (crops cut on the device)

class TorchStream:
    """The numbers torch.Generator().manual_seed(seed) gives on the CPU, drawn from numpy.

    Both are MT19937 seeded with seed mod 2**32: torch.rand yields (word & 0xFFFFFF) /
    2**24 per float32, torch.randint(0, k) yields word % k for k < 2**25. numpy's
    RandomState hands out the words in blocks, so a draw costs a list lookup instead of
    a torch call (5 us). `seed` starts the stream over (a new RandomState costs 0.1 ms,
    reseeding one 2 us).
    """

    BLOCK = 256
    MAX_RANGE = 2 ** 25

    def __init__(self):
        self._state = np.random.RandomState()

    def seed(self, seed):
        self._state.seed(seed % 2 ** 32)
        self._words, self._next = [], 0
        return self

    def _word(self):
        if self._next == len(self._words):
            self._words, self._next = self._state.randint(0, 2 ** 32, self.BLOCK, dtype=np.uint32).tolist(), 0
        self._next += 1
        return self._words[self._next - 1]

    def rand(self, n):
        return [(self._word() & 0xFFFFFF) / 2 ** 24 for _ in range(n)]

    def randint(self, high):
        return self._word() % high


def random_resized_box_from(width, height, scale, stream, ratio=(3 / 4, 4 / 3)):
    """random_resized_box, drawing from a TorchStream: the same box for the same seed."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        r = stream.rand(3)
        target = area * (scale[0] + r[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + r[1] * (log_ratio[1] - log_ratio[0]))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = stream.randint(width - w + 1)
            top = stream.randint(height - h + 1)
            return left, top, left + w, top + h
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def to_rgb(image):
    """An opened PIL image as a loaded RGB image (a copy, so it outlives the file).
    16-bit grey ("I;16", or "I" holding values past 255, as Pillow may open a 16-bit PNG)
    keeps its top 8 bits: Pillow's own conversion clips every value past 255, so such an
    image came out nearly all white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        grey = np.asarray(image).astype(np.int64)
        if image.mode != "I" or grey.max(initial=0) > 255:
            grey = np.clip(grey, 0, 65535) >> 8
        image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def decode(image, reduction=1):
    """(uint8 (3, h, w) tensor, reduction achieved) of an opened PIL image.

    reduction > 1 decodes a JPEG at 1/reduction of its size (`Image.draft`: libjpeg's
    scaled inverse DCT; h = ceil(H / reduction)); other formats decode whole and return
    reduction 1. Pixel x of the reduced image covers pixels x * reduction ..
    (x + 1) * reduction of the full one, so a box in full-size pixels is box / reduction
    in it. Any mode becomes RGB, as ImageFolder.load converts it. The tensor is a
    (C, H, W) view of channels-last memory, which `pack_images` copies in one memcpy.
    """
    if reduction > 1 and image.format in ("JPEG", "MPO"):
        width, height = image.size
        # Asking for (W // r, H // r) makes Pillow pick exactly r of its 1/2, 1/4, 1/8.
        if image.draft(image.mode, (width // reduction, height // reduction)) is None:
            reduction = 1
    else:
        reduction = 1
    image = image if image.mode == "RGB" else to_rgb(image)
    # One copy out of Pillow (to_tensor's numpy route makes three).
    rgb = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return rgb.view(image.height, image.width, 3).permute(2, 0, 1), reduction


class DecodeOnlyDataset(torch.utils.data.Dataset):
    """MultiCropDataset's samples decoded but not cut: the crops are cut on the device.

    Indexed like MultiCropDataset, by (image index, sample seed), it draws the same
    boxes from the same generator in the same order (2 global, then the local, then the
    query crops, on the full image's size), then one flip per global and local crop:
    after every box, so the boxes stay today's. An item holds the decoded image and
    the boxes in its pixels; `cut_crops` (adclr_kernels' crop_resize) cuts from them
    MultiCropDataset's crops, to Pillow's pixel (unflipped), for a whole batch at once.
    Query crops are never flipped: both views see the same query pixels.

    draft: decode a JPEG at 1/2, 1/4 or 1/8 of its size (the largest that leaves every
    crop at least twice its output's size) instead of whole. Such crops are no longer
    Pillow's crops of the full image: the decoder's reduction averages first, and they
    differ from them by a fraction of a level on average, a few levels at most; False
    decodes every image whole.

    encoded: hand out a JPEG file that nvJPEG can take (`encodable`) undecoded, as its
    bytes ("encoded" instead of "image"), with the boxes drawn on the size its header
    gives, which is the decoded size: `JpegDecoder` decodes a batch of them on the GPU.
    Every other file is decoded here as without it.
    """

    def __init__(self, base, image_size, local_size, patch_size, num_local_crops, num_queries,
                 global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), query_scale=(0.05, 0.15), draft=True,
                 encoded=False):
        self.base, self.draft, self.encoded = base, draft, encoded
        self._stream = TorchStream()
        self.image_size, self.local_size, self.patch_size = image_size, local_size, patch_size
        self.num_local_crops, self.num_queries = num_local_crops, num_queries
        self.global_scale, self.local_scale, self.query_scale = global_scale, local_scale, query_scale

    def __len__(self):
        return len(self.base)

    def boxes(self, width, height, seed):
        """(global, local, query boxes, global flips, local flips) of sample `seed` of an
        image of (width, height): boxes as MultiCropDataset draws them."""
        if max(width, height) < TorchStream.MAX_RANGE:
            stream = self._stream.seed(seed)
            box, rand = functools.partial(random_resized_box_from, stream=stream), stream.rand
        else:  # sides past what TorchStream reproduces: torch's generator itself
            g = torch.Generator().manual_seed(seed)
            box, rand = functools.partial(random_resized_box, generator=g), functools.partial(torch.rand, generator=g)
        kinds = ((self.global_scale, 2), (self.local_scale, self.num_local_crops), (self.query_scale, self.num_queries))
        global_, local, query = ([box(width, height, scale) for _ in range(n)] for scale, n in kinds)
        flips = torch.as_tensor(rand(2 + self.num_local_crops)) < 0.5
        return global_, local, query, flips[:2], flips[2:]

    def reduction(self, global_, local, query):
        """The largest JPEG reduction (8, 4, 2; else 1) that leaves every crop at least
        twice its output's size in the reduced image, so that the bicubic resize still
        shrinks it 2x or more and its antialiasing, not the decoder's, shapes the crop."""
        room = min(min(right - left, bottom - top) / size
                   for boxes, size in ((global_, self.image_size), (local, self.local_size),
                                       (query, self.patch_size))
                   for left, top, right, bottom in boxes)
        return next((r for r in (8, 4, 2) if room >= 2 * r), 1) if self.draft else 1

    def __getitem__(self, item):
        return self._item(item, self.encoded)

    def decoded(self, item):
        """Item `item` with its image decoded here whatever `encoded` says: what a worker of
        `--decode cpu` hands out (the main process's fallback for a file nvJPEG rejects)."""
        return self._item(item, False)

    def _item(self, item, encoded):
        """As MultiCropDataset's items: an unreadable file is counted in "skipped" and its
        next `replacement` taken; after UNREADABLE_IN_A_ROW of them (or all of a smaller set), a blank
        image and "readable" False: the run stops there."""
        index, seed = item
        limit = min(UNREADABLE_IN_A_ROW, len(self.base))
        for skipped in range(limit):
            sample = self._decode(replacement(index, skipped, len(self.base)), seed, encoded)
            if sample is not None:
                return {"index": index, "seed": seed, "skipped": skipped, "readable": True, **sample}
        blank = self._sample(Image.new("RGB", (self.image_size, self.image_size)), seed, False)
        return {"index": index, "seed": seed, "skipped": limit, "readable": False, **blank}

    def _decode(self, i, seed, encoded):
        """The item of image i, or None where ImageFolder.load would give None."""
        try:
            image = self.base.open(i)
        except Exception:  # not an image, unreadable, too large for Pillow: skip, never fatal
            return None
        with image:
            return self._sample(image, seed, encoded)

    def _sample(self, image, seed, encoded):
        """The item of an opened image, or None where its pixels cannot be decoded."""
        width, height = image.size
        global_, local, query, global_flips, local_flips = self.boxes(width, height, seed)
        data = encodable(image) if encoded else None
        if data is not None:
            content, reduction = {"encoded": data}, 1
        else:
            try:
                pixels, reduction = decode(image, self.reduction(global_, local, query))
            except Exception:  # truncated or corrupt pixel data
                return None
            content = {"image": pixels}

        def reduced(boxes):  # a power-of-two division: exact in float32
            return torch.tensor(boxes, dtype=torch.float32).view(-1, 4) / reduction

        return {**content, "reduction": reduction, "global_boxes": reduced(global_),
                "local_boxes": reduced(local), "query_boxes": reduced(query),
                "global_flips": global_flips, "local_flips": local_flips}


def encodable(image):
    """The file bytes of an opened PIL image, as a uint8 tensor, where nvJPEG can decode
    them in Pillow's place: a JPEG in RGB (YCbCr) that ends as a whole file does. None
    for the rest, which Pillow decodes: other formats, grey and CMYK JPEGs (one such image
    that nvJPEG refused would send its whole batch down the slow path), and a file cut
    short, which Pillow's decode finds unreadable, so that it is skipped as before.
    """
    if image.format not in ("JPEG", "MPO") or image.mode != "RGB" or getattr(image, "fp", None) is None:
        return None
    try:
        image.fp.seek(0)
        data = image.fp.read()
    except OSError:  # left to the decode, which skips a file it cannot read
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data.endswith(b"\xff\xd9") else None


def keep_freed_memory(worker_id=None):
    """Let this process keep the memory it frees for reuse (a loader's `worker_init_fn`).

    glibc hands each image's large buffers (decoded pixels, their bytes) back to the OS
    when freed and maps fresh ones for the next image, whose every page then faults on
    first touch: in a VM that was 140 faults and 0.4 ms of a 2.7 ms 500x375 image, 630
    faults at 1024x768. Raising the mmap and trim thresholds keeps freed buffers in the
    heap. Returns whether glibc took the settings (False elsewhere: nothing changes).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def init_train_worker(worker_id=None):
    """A training loader worker's `worker_init_fn`: keep freed memory (`keep_freed_memory`),
    and end at once, with exit status 0, on SIGTERM. A scheduler's stop (SLURM) sends it
    to every process of the job: a worker it killed made the loader raise inside the main
    process while that saved its last step (train.Run stops on SIGTERM as on Ctrl-C),
    and one that ignored it outlived the main process and printed a traceback from its
    resource sharer's thread as it went."""
    signal.signal(signal.SIGTERM, _exit_quietly)
    keep_freed_memory(worker_id)


def _exit_quietly(signum, frame):
    os._exit(0)  # no finalizers: a worker has nothing to keep


def collate_decoded(samples):
    """A batch of DecodeOnlyDataset items: the decoded images in one flat buffer
    (`PackedImages`) and the encoded files' bytes in another ("encoded", with their
    "encoded_sizes" and which items they are, "is_encoded"), both in shared memory inside
    a loader worker, so that they reach the main process without another copy; boxes,
    flips and counts stacked; the sample seeds as a list (they pass int64)."""
    from adclr_kernels.crops import pack_images

    images = [s["image"] for s in samples if "image" in s]
    encoded = [s["encoded"] for s in samples if "encoded" in s]
    batch = {}
    if images:
        batch["images"] = pack_images(images, out=_shared_bytes(sum(image.numel() for image in images)))
    if encoded:
        batch["encoded"] = torch.cat(encoded, out=_shared_bytes(sum(e.numel() for e in encoded)))
        batch["encoded_sizes"] = torch.tensor([e.numel() for e in encoded])
        batch["is_encoded"] = torch.tensor(["encoded" in s for s in samples])
    batch |= {key: torch.stack([s[key] for s in samples]) for key in
              ("global_boxes", "local_boxes", "query_boxes", "global_flips", "local_flips")}
    batch |= {key: torch.tensor([s[key] for s in samples]) for key in ("index", "skipped", "readable", "reduction")}
    batch["seed"] = [s["seed"] for s in samples]
    return batch


def _shared_bytes(size):
    """A uint8 buffer of `size` bytes allocated shared inside a loader worker, as
    default_collate allocates; None elsewhere (the copy then makes a plain one)."""
    if torch.utils.data.get_worker_info() is None:
        return None
    return torch.tensor([], dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size))


def cut_crops(batch, image_size, local_size, patch_size, flip=True, out_dtype=torch.uint8):
    """The crops of a `collate_decoded` batch (on any device), as MultiCropDataset's
    batches hold them: globals (B, 2, 3, G, G), locals (B, L, 3, l, l), queries
    (B, Q, 3, p, p). flip=False leaves every crop unflipped, as MultiCropDataset cuts it."""
    from adclr_kernels.crops import crop_resize

    images = batch["images"]
    global_flips = batch["global_flips"] if flip else None
    local_flips = batch["local_flips"] if flip else None
    return {"globals": crop_resize(images, batch["global_boxes"], image_size, flips=global_flips, out_dtype=out_dtype),
            "locals": crop_resize(images, batch["local_boxes"], local_size, flips=local_flips, out_dtype=out_dtype),
            "queries": crop_resize(images, batch["query_boxes"], patch_size, out_dtype=out_dtype)}


# --------------------------------------------------------------------------- in the training process

DECODE = ("auto", "pillow", "cpu", "gpu")


def decode_mode(decode, device):
    """What `--decode` means on `device`: "pillow", "cpu" or "gpu".

    auto: "cpu" on a CUDA device (workers decode, the GPU cuts the crops), "pillow" on a
    CPU (the crops are the same, and Pillow's workers cut them beside the training
    instead of in it). "gpu" raises ValueError saying what is missing when it cannot
    decode here.
    """
    device = torch.device(device)
    if decode == "auto":
        return "cpu" if device.type == "cuda" else "pillow"
    if decode == "gpu":
        check_gpu_decode(device)
    return decode


def check_gpu_decode(device):
    """ValueError, saying what to install, unless torchvision decodes JPEGs on `device`:
    one tiny JPEG decoded there (a torchvision built without nvJPEG fails only then)."""
    if device.type != "cuda":
        raise ValueError(f"decodes on a CUDA device, and this run is on {device}")
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as error:  # not installed, or built for another torch (its ops fail to load)
        raise ValueError(f"needs torchvision built for this torch with CUDA ({error}); "
                         "pip install torchvision (the version that matches torch)") from None
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 30)).save(buffer, "JPEG")
    try:
        decode_jpeg([torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)],
                    mode=ImageReadMode.RGB, device=device)
    except RuntimeError as error:
        raise ValueError(f"torchvision cannot decode JPEGs on {device} ({error}); "
                         "install a torchvision built with CUDA") from None


def decode_jpegs(jpegs, device, stream):
    """RGB (3, H, W) uint8 images on `device` of `jpegs` (1-D uint8 CPU tensors, JPEG
    files), decoded together by nvJPEG (torchvision), ready for the current stream.

    nvJPEG's hardware engine writes into its outputs without waiting for the work
    queued before it on the stream they were allocated on (pytorch/vision PR #9606):
    they are allocated on `stream`, which only ever decodes and is drained first, never
    on the training's stream. The outputs are marked used on the current stream, so
    that their memory returns to `stream` only once the step is done with them.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    current = torch.cuda.current_stream(device)
    stream.synchronize()
    with torch.cuda.stream(stream):
        images = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    current.wait_stream(stream)
    for image in images:
        image.record_stream(current)
    return images


class JpegDecoder:
    """The images of a batch of DecodeOnlyDataset(encoded=True) on a CUDA device, as one
    `PackedImages` in batch order: the JPEG files its workers handed out as bytes
    decoded together by nvJPEG (`decode_jpegs`), the others as the workers decoded them.

    A file nvJPEG rejects is decoded on the CPU instead, as `--decode cpu` would
    (`DecodeOnlyDataset.decoded`: the same boxes; the next file, counted in the batch's
    "skipped", where Pillow cannot read it either), and counted in `rejected`.
    """

    def __init__(self, dataset, device):
        self.dataset, self.device, self.rejected = dataset, torch.device(device), 0
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __call__(self, batch):
        from adclr_kernels.crops import pack_images

        where = batch["is_encoded"].nonzero().flatten().tolist()
        images = [None] * len(batch["is_encoded"])
        if "images" in batch:
            moved = batch["images"].to(self.device, non_blocking=True)
            for j, i in enumerate(i for i in range(len(images)) if not batch["is_encoded"][i]):
                images[i] = moved.image(j)
        jpegs = list(batch["encoded"].split(batch["encoded_sizes"].tolist()))
        for i, image in zip(where, self.decode(jpegs)):
            images[i] = image if image is not None else self.on_cpu(batch, i)
        return pack_images(images)

    def decode(self, jpegs):
        """nvJPEG's images of `jpegs`, None for each file it rejects."""
        try:
            return decode_jpegs(jpegs, self.device, self.stream)
        except RuntimeError as error:  # one file fails the whole call: find which
            images = []
            for jpeg in jpegs:
                try:
                    images += decode_jpegs([jpeg], self.device, self.stream)
                except RuntimeError:
                    images.append(None)
            if all(image is None for image in images):  # not the files: the decoder itself
                raise error
            return images

    def on_cpu(self, batch, i):
        """Image i of `batch` decoded by Pillow, on the device; its boxes, flips and counts
        written into the batch."""
        index, base = int(batch["index"][i]), self.dataset.base
        if not self.rejected:
            path = base.samples[replacement(index, int(batch["skipped"][i]), len(base))][0]
            print(f"warning: nvJPEG cannot decode {path}; the files it rejects are decoded on the CPU",
                  file=sys.stderr)
        self.rejected += 1
        item = self.dataset.decoded((index, batch["seed"][i]))
        for key in ("global_boxes", "local_boxes", "query_boxes", "global_flips", "local_flips",
                    "skipped", "readable", "reduction"):
            batch[key][i] = item[key]
        return item["image"].to(self.device)


class DeviceCrops:
    """The uint8 crops of a `train_loader` batch on `device`, as Augment takes them:
    globals (B, 2, 3, G, G), locals (B, L, 3, l, l), queries (B, Q, 3, p, p).

    MultiCropDataset's (`--decode pillow`) are moved there. DecodeOnlyDataset's images
    are moved (`cpu`) or decoded there (`gpu`, `JpegDecoder`), their boxes stay on the
    host, and crop_resize cuts the crops, one launch per size. Unflipped: Augment flips
    every crop drawing from the global RNG, as it does MultiCropDataset's, so that
    `--decode cpu` trains on the very pixels of `--decode pillow`.
    """

    def __init__(self, dataset, device):
        self.dataset, self.device = dataset, torch.device(device)
        self.mode = "pillow" if isinstance(dataset, MultiCropDataset) else "gpu" if dataset.encoded else "cpu"
        self.jpegs = JpegDecoder(dataset, self.device) if self.mode == "gpu" else None

    def __call__(self, batch):
        if self.mode == "pillow":
            return {key: batch[key].to(self.device, non_blocking=True) for key in ("globals", "locals", "queries")}
        if "encoded" in batch:
            images = self.jpegs(batch)
        else:
            images = batch["images"].to(self.device, non_blocking=True)
        d = self.dataset
        return cut_crops(batch | {"images": images}, d.image_size, d.local_size, d.patch_size, flip=False)


class StepBatches:
    """Batch sampler over training steps: step s of the run -> this rank's (index, seed) list.

    Each epoch is a fresh permutation seeded by (seed, epoch); step s takes the s-th
    slice of `global_batch` images and each rank its own part. Starting at
    `start_step` resumes exactly, so no batch is repeated or skipped.
    """

    def __init__(self, length, global_batch, seed, rank=0, world_size=1, start_step=0):
        if global_batch % world_size:
            raise ValueError(f"batch size {global_batch} is not divisible by {world_size} processes")
        self.steps_per_epoch = length // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the dataset has {length} images, fewer than one batch of {global_batch}")
        self.length, self.global_batch, self.seed = length, global_batch, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step

    def __iter__(self):
        step, per_rank = self.start_step, self.global_batch // self.world_size
        while True:
            epoch, s = divmod(step, self.steps_per_epoch)
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            first = s * self.global_batch + self.rank * per_rank
            positions = range(first, first + per_rank)
            yield [(int(order[i]), (self.seed * 100003 + epoch) * 10_000_019 + i) for i in positions]
            step += 1


def default_num_workers(world_size=1):
    """Every core this process may run on, shared by the run's processes on this machine
    (torchrun's LOCAL_WORLD_SIZE; `world_size` where that is not set), less one per
    process for the training loop itself."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) if world_size > 1 else 1
    return max(1, cpus // max(1, local) - 1)


def train_loader(cfg, rank=0, world_size=1, start_step=0, images=None, decode="pillow"):
    """DataLoader yielding the batches of steps start_step, start_step + 1, ... (DeviceCrops
    turns each into its crops on the device), and the steps per epoch.

    decode (`decode_mode`): "pillow", workers cut the uint8 crops (MultiCropDataset);
    "cpu", workers decode and draw the boxes (DecodeOnlyDataset); "gpu", the same but
    JPEG files go out undecoded, for nvJPEG. `images`: the training images, when already
    open (default: open_dataset(cfg.data, "train")).
    """
    images = open_dataset(cfg.data, "train") if images is None else images
    crops = (images, cfg.image_size, cfg.local_size, cfg.patch_size, cfg.num_local_crops, cfg.num_queries,
             cfg.global_scale, cfg.local_scale, cfg.query_scale)
    if decode == "pillow":
        dataset, collate = MultiCropDataset(*crops), None  # default_collate
    else:
        dataset, collate = DecodeOnlyDataset(*crops, encoded=decode == "gpu"), collate_decoded
    batches = StepBatches(len(dataset), cfg.batch_size, cfg.seed, rank, world_size, start_step)
    workers = default_num_workers(world_size) if cfg.num_workers < 0 else cfg.num_workers
    # Each batch in flight holds its pixels in shared memory: four ahead per worker, two
    # past four workers, where the others' batches keep the queue full anyway.
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
        worker_init_fn=init_train_worker, pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0, prefetch_factor=(4 if workers <= 4 else 2) if workers > 0 else None)
    return loader, batches.steps_per_epoch


# --------------------------------------------------------------------------- augmentation (batched)

BLUR_SIGMA = (0.1, 2.0)  # DINO's, in pixels
# +-3 sigma of the widest blur, so that sigma 2 is not truncated: 13 taps. kornia pads a
# crop by reflection, which needs half the taps (and one) in each side of it: 7 px.
BLUR_TAPS = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1
SMALLEST_BLURRED_CROP = BLUR_TAPS // 2 + 1


class Augment(torch.nn.Module):
    """DINO's photometric augmentations, batched with kornia, plus normalisation.

    Global view A: blur p=1.0; view B: blur p=0.1, solarize p=0.2; locals: blur p=0.5.
    All: flip p=0.5, colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2. Query
    crops are only normalised: they must be the same pixels for student and teacher.
    Blur sigma is uniform in DINO's (0.1, 2.0) px for every crop, locals included, as
    DINO's PIL blur radius is (a standard deviation in pixels, whatever the crop size).

    plain_view_a: view A gets the flip alone, MAE's input (a random resized crop and a
    flip): ccMIM reads that view only, and rebuilds its pixels, which DINO's blur and
    colour changes would otherwise make the target.
    """

    BLUR_SIGMA = BLUR_SIGMA

    def __init__(self, plain_view_a=False):
        super().__init__()
        import kornia.augmentation as K

        kernel = BLUR_TAPS

        def pipeline(blur, solarize=0.0):
            ops = [K.RandomHorizontalFlip(),
                   K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
                   K.RandomGrayscale(p=0.2),
                   K.RandomGaussianBlur(kernel, self.BLUR_SIGMA, p=blur)]
            if solarize:
                ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarize))
            return torch.nn.Sequential(*ops)

        self.view_a = torch.nn.Sequential(K.RandomHorizontalFlip()) if plain_view_a else pipeline(blur=1.0)
        self.view_b = pipeline(blur=0.1, solarize=0.2)
        self.local = pipeline(blur=0.5)

    @torch.no_grad()
    def forward(self, batch):
        """uint8 crops from `train_loader` (already on the device) -> ready batch."""
        views = batch["globals"].float() / 255  # (B, 2, 3, G, G)
        a = self.view_a(views[:, 0])
        b = self.view_b(views[:, 1])
        local = None
        if batch["locals"].shape[1]:
            local = self.local(batch["locals"].transpose(0, 1).flatten(0, 1).float() / 255)
            local = normalize(local.clamp(0, 1))
        return {"globals": normalize(torch.cat([a, b]).clamp(0, 1)), "locals": local,
                "queries": normalize(batch["queries"])}


def synthetic_batch(cfg, batch_size, device, dtype=torch.float32, generator=None):
    """A random ready-to-train batch (see the module docstring) for benchmarks.

    `cfg` needs image_size, local_size, patch_size, num_local_crops and num_queries
    (an `adclr.config.Config`). Values are standard-normal, like normalised pixels.
    """
    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    G, l, p = cfg.image_size, cfg.local_size, cfg.patch_size
    return {
        "globals": randn(2 * batch_size, 3, G, G),
        "locals": randn(cfg.num_local_crops * batch_size, 3, l, l) if cfg.num_local_crops else None,
        "queries": randn(batch_size, cfg.num_queries, 3, p, p),
    }
