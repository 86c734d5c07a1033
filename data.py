"""Datasets, stratified subsets and the two input pipelines.

    python -c "import data; tr, te, info = data.load_dataset('synthetic', './data'); print(info.name, tr[0].shape)"
    # -> synthetic torch.Size([4000, 3, 32, 32])

Two pipelines draw from the same augmentation distribution (random crop with padding, horizontal flip where the dataset has it):

- ``TensorLoader``: the whole uint8 dataset as one tensor on the training
  device; crop, flip and normalisation are applied per batch on that device.
  No workers, no host-to-device copies. For the sets that fit in memory.
- ``torch.utils.data.DataLoader`` over torchvision transforms, with workers
  and pinned memory: the only path for ImageNet, and the reference for the
  fast path's tests.
"""
import copy
import gzip
import math
import os
import pickle
import shutil
import sys
import zlib
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("cifar10", "cifar100", "fashion-mnist", "mnist", "synthetic", "imagenet", "folder")
# Held in memory as uint8 (the fast path); "folder" only when it fits (FOLDER_MEMORY_SHARE).
IN_MEMORY = ("cifar10", "cifar100", "fashion-mnist", "mnist", "synthetic", "folder")
# A folder dataset is loaded into memory when its uint8 pixels take at most this share of the RAM.
FOLDER_MEMORY_SHARE = 0.25
# Mean and std of a folder too big for memory are estimated from this many training images.
FOLDER_STATS_SAMPLE = 2000
# A class folder dataset needs two classes at least: with one, every prediction is right.
MIN_CLASSES = 2
# 16-bit to 8-bit grey: 65535 / 255 = 257, so 0 -> 0 and 65535 -> 255 (the inverse of 8-bit v -> v * 257).
SIXTEEN_TO_EIGHT_BITS = 257
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
SYNTHETIC_SIZES = {"train": 4000, "test": 1000}
IMAGENET_RESIZE, IMAGENET_CROP = 256, 224  # the usual 0.875 centre-crop ratio


# Random streams, told apart by the last key of stream_seed: an epoch's shuffle and augmentation, and the
# draw of the held-out validation split (its own stream, so it does not move when --train-size changes).
SHUFFLE_STREAM, AUGMENT_STREAM, HOLDOUT_STREAM, AUTOAUGMENT_STREAM = 0, 1, 2, 3
# --augment: the training augmentation. crop-flip: the dataset's random crop and flip (INFO); autoaugment:
# those, then torchvision's AutoAugment with its CIFAR-10 policy (Cubuk et al., "AutoAugment", CVPR 2019) per
# image, the small-data protocol of Gauthier et al. (CVPR 2022); none: the images as they are.
AUGMENTATIONS = ("crop-flip", "autoaugment", "none")
# --select val's held-out split by default: this share of the training pool, at most HOLDOUT_MAX images
# (the usual 90/10 split, capped so that ImageNet's stays a 5,000-image evaluation per epoch).
HOLDOUT_SHARE, HOLDOUT_MAX = 0.1, 5000


def stream_seed(*keys):
    """A seed for one random stream, from non-negative integer keys such as (seed, epoch, rank, stream).

    NumPy's SeedSequence hashes the keys, so nearby tuples give unrelated
    streams (with seed + epoch, seed 1 at epoch 2 would replay seed 2 at epoch 1).
    """
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)  # < 2**63 for torch


class DatasetError(Exception):
    """A dataset cannot be found or built; the message says what was looked for and where."""


def error_line(error):
    """The one line of a DatasetError, also when a DataLoader worker re-raised it with its traceback appended."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    return last.split("DatasetError: ", 1)[-1]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_channels: int
    spatial: int
    nb_classes: int
    mean: tuple
    std: tuple
    crop_padding: int  # RandomCrop(spatial, padding=crop_padding); 0 for ImageNet (RandomResizedCrop)
    flip: bool


# Per-channel means and standard deviations of the training images in [0, 1] (a folder's are
# computed from its own training images when it is loaded: folder_info gives placeholders).
# 28 x 28 sets pad crops by 2 (a 32 x 32 set's 4, scaled) and are not flipped:
# MNIST digits are not mirror-symmetric, and Fashion-MNIST's classes are
# already centred and left-right balanced. Synthetic textures are classified
# by orientation, which a flip changes (theta -> pi - theta), so no flip.
INFO = {
    "cifar10": DatasetInfo("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, True),
    "cifar100": DatasetInfo("cifar100", 3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 4, True),
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 28, 10, (0.2860,), (0.3530,), 2, False),
    "mnist": DatasetInfo("mnist", 1, 28, 10, (0.1307,), (0.3081,), 2, False),
    "synthetic": DatasetInfo("synthetic", 3, 32, 10, (0.5, 0.5, 0.5), (0.19, 0.19, 0.19), 4, False),
    "imagenet": DatasetInfo("imagenet", 3, IMAGENET_CROP, 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0, True),
}


# ----------------------------------------------------------------------------- loading

def synthetic_textures(n, seed, spatial=32, nb_classes=10):
    """Oriented gratings: class k has orientation k*pi/nb_classes; frequency, phase, colour and noise vary.

    Returns uint8 images (n, 3, spatial, spatial) and int64 labels (n,), a
    deterministic function of (n, seed). Orientation is what a bank of
    oriented wavelets followed by a modulus measures, so a scattering
    network separates the classes while a per-pixel linear model cannot.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % nb_classes
    rng.shuffle(labels)
    theta = labels * np.pi / nb_classes + rng.normal(0, 0.04, n)
    freq = rng.uniform(0.7, 1.4, n)  # radians per pixel
    phase = rng.uniform(0, 2 * np.pi, n)
    x, y = np.mgrid[:spatial, :spatial].astype(np.float64)
    along = x[None] * np.cos(theta)[:, None, None] + y[None] * np.sin(theta)[:, None, None]
    grating = np.sin(freq[:, None, None] * along + phase[:, None, None])  # (n, S, S)
    colour = rng.uniform(0.3, 1.0, (n, 3))
    images = 0.5 + 0.3 * colour[:, :, None, None] * grating[:, None] + rng.normal(0, 0.12, (n, 3, spatial, spatial))
    images = np.clip(np.round(images * 255), 0, 255).astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


# An idx file starts with two zero bytes, the element type (0x08: unsigned byte) and the number of dimensions.
IDX_UBYTE = 0x08


def _read_idx(path):
    """The uint8 array of an idx file (plain or .gz); DatasetError naming the file when it is damaged."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"cannot read {path} ({type(e).__name__}: {e}); delete it to download it again") from None
    ndim = raw[3] if len(raw) >= 4 else 0
    if len(raw) < 4 + 4 * ndim or raw[:3] != bytes([0, 0, IDX_UBYTE]) or not ndim:
        raise DatasetError(f"{path} is not an idx file of bytes (bad header); delete it to download it again")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - 4 - 4 * ndim != math.prod(shape):
        raise DatasetError(f"{path} is truncated or padded: its header promises {math.prod(shape):,} bytes of "
                           f"{shape}, it holds {len(raw) - 4 - 4 * ndim:,}; delete it to download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find_idx(folder):
    """Paths of the four idx files in folder (plain or .gz), or None if any is missing."""
    found = {}
    for split, names in IDX_FILES.items():
        for name in names:
            hits = [os.path.join(folder, name + ext) for ext in ("", ".gz") if os.path.isfile(os.path.join(folder, name + ext))]
            if not hits:
                return None
            found[name] = hits[0]
    return found


def _mnist_like(name, data_dir):
    torchvision_name = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}[name]
    folders = [data_dir, os.path.join(data_dir, name), os.path.join(data_dir, torchvision_name, "raw")]
    if name == "fashion-mnist":
        folders.append(DEBIAN_FASHION_MNIST)
    files = next((f for f in map(_find_idx, folders) if f), None)
    if files is None:
        download_error = _download(torchvision_name, data_dir)
        files = _find_idx(folders[2])
        if files is None:
            hint = " (on Debian: apt-get install dataset-fashion-mnist)" if name == "fashion-mnist" else ""
            raise DatasetError(f"{name}: the idx files ({', '.join(n for v in IDX_FILES.values() for n in v)}, "
                               f"optionally .gz) are not in any of {folders}, and the download failed: "
                               f"{download_error}{hint}")
    splits = {}
    for split, (images, labels) in IDX_FILES.items():
        x = torch.from_numpy(_read_idx(files[images]).copy()).unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)
        splits[split] = (x, torch.from_numpy(_read_idx(files[labels]).astype(np.int64)))
    return splits["train"], splits["test"]


def _download(torchvision_name, data_dir):
    """Try torchvision's downloader; return the error in one line, or None on success.

    A failed download removes the folders it created and left without a file.
    """
    import torchvision
    created = [p for p in _download_folders(torchvision_name, data_dir) if not os.path.exists(p)]
    try:
        getattr(torchvision.datasets, torchvision_name)(data_dir, train=True, download=True)
        getattr(torchvision.datasets, torchvision_name)(data_dir, train=False, download=True)
    except Exception as e:  # offline, blocked, or disk errors all mean "not available"
        for folder in created:  # deepest first
            if os.path.isdir(folder) and not any(files for _, _, files in os.walk(folder)):
                shutil.rmtree(folder)
        return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return None


def _download_folders(torchvision_name, data_dir):
    """The folders torchvision's downloader creates, deepest first."""
    if torchvision_name in ("MNIST", "FashionMNIST"):
        return [os.path.join(data_dir, torchvision_name, "raw"), os.path.join(data_dir, torchvision_name), data_dir]
    return [data_dir]


# torchvision class, extracted folder and its files, per CIFAR dataset.
CIFAR = {"cifar10": ("CIFAR10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
         "cifar100": ("CIFAR100", "cifar-100-python", ["train", "test"])}


def _cifar(name, data_dir):
    import torchvision
    torchvision_name, folder_name, files = CIFAR[name]
    folder = os.path.join(data_dir, folder_name)
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        error = _download(torchvision_name, data_dir)
        if error:
            raise DatasetError(f"{name}: {', '.join(missing)} not found in {folder}, and the download failed "
                               f"({error}); put the extracted {folder_name} folder under --data-dir")
    splits = []
    for train in (True, False):
        ds = getattr(torchvision.datasets, torchvision_name)(data_dir, train=train, download=False)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)
        splits.append((x, torch.tensor(ds.targets, dtype=torch.int64)))
    return splits[0], splits[1]


# ----------------------------------------------------------------------------- the CIFAR-10 sample

# The CIFAR-10 development sample: the first SAMPLE_PER_BATCH images of each batch, train from batches 1-3 in
# order (3,051 images), val from batch 4 (1,017), saved as <split>/<class>/<index:05d>.png, the index counted
# over the split. A fixed cut anyone with CIFAR-10 can rebuild (python data.py cifar10-sample).
SAMPLE_PER_BATCH = 1017
SAMPLE_SPLITS = {"train": ("data_batch_1", "data_batch_2", "data_batch_3"), "val": ("data_batch_4",)}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_SIDE = 32


class _BatchUnpickler(pickle.Unpickler):
    """A CIFAR python batch holds a dict of bytes, lists and NumPy arrays: refuse any other global (code)."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise DatasetError(f"a CIFAR batch may hold NumPy arrays only, not {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path):
    """(uint8 images (N, 3, 32, 32), labels list) of one CIFAR-10 python batch file."""
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE)  # rows of R,G,B planes
        return images, [int(label) for label in batch[b"labels"]]
    except FileNotFoundError:
        raise DatasetError(f"{path} not found: --cifar-dir must hold CIFAR-10's python batches "
                           f"(cifar-10-batches-py)") from None
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise DatasetError(f"{path} is not a CIFAR-10 python batch ({type(e).__name__})") from None


def build_cifar10_sample(cifar_dir, out):
    """Write the CIFAR-10 sample (SAMPLE_SPLITS) under ``out`` from the python batches in ``cifar_dir``.

    Refuses an ``out`` that already exists (nothing is overwritten); returns {split: images written}.
    """
    from PIL import Image
    if os.path.exists(out):
        raise DatasetError(f"{out} already exists: choose another --out (nothing was overwritten)")
    batches = {name: read_cifar_batch(os.path.join(cifar_dir, name)) for files in SAMPLE_SPLITS.values()
               for name in files}
    short = [name for name, (images, _) in batches.items() if len(images) < SAMPLE_PER_BATCH]
    if short:
        raise DatasetError(f"{', '.join(short)} in {cifar_dir} hold fewer than {SAMPLE_PER_BATCH:,} images")
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    counts = {}
    for split, files in SAMPLE_SPLITS.items():
        index = 0
        for name in files:
            images, labels = batches[name]
            for image, label in zip(images[:SAMPLE_PER_BATCH], labels[:SAMPLE_PER_BATCH]):
                folder = os.path.join(partial, split, CIFAR10_CLASSES[label])
                os.makedirs(folder, exist_ok=True)
                Image.fromarray(image.transpose(1, 2, 0)).save(os.path.join(folder, f"{index:05d}.png"))  # (C, H, W) -> (H, W, C)
                index += 1
        counts[split] = index
    os.rename(partial, out)  # the tree appears whole or not at all
    return counts


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description="Build the CIFAR-10 development sample (an ImageFolder tree).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("task", choices=["cifar10-sample"])
    parser.add_argument("--cifar-dir", required=True, help="the extracted cifar-10-batches-py folder")
    parser.add_argument("--out", default="data/cifar10-sample", help="the tree to write (must not exist)")
    args = parser.parse_args(argv)
    try:
        counts = build_cifar10_sample(args.cifar_dir, args.out)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {counts['train']:,} train and {counts['val']:,} val images to {args.out} "
          f"(train with --dataset folder --data-dir {args.out})")


# ----------------------------------------------------------------------------- image folders

def folder_classes(name, data_dir):
    """Class names of an ImageFolder tree (<data_dir>/train, <data_dir>/val), checked to be the same in both.

    ImageFolder numbers the classes of each split by their sorted names, so a
    class missing from one split would shift every label after it.
    """
    classes = {}
    for split in ("train", "val"):
        root = os.path.join(data_dir, split)
        if not os.path.isdir(root):
            raise DatasetError(f"{name}: no folder {root}; --data-dir must contain train/ and val/, one sub-folder "
                               f"per class")
        classes[split] = sorted(e.name for e in os.scandir(root) if is_folder(e))
        if not classes[split]:
            raise DatasetError(f"{name}: {root} has no class sub-folders")
        if len(classes[split]) < MIN_CLASSES:
            raise DatasetError(f"{name}: {root} has one class sub-folder ({classes[split][0]}): a classifier needs at "
                               f"least {MIN_CLASSES} classes (with one, every answer is right)")
    only_train, only_val = sorted(set(classes["train"]) - set(classes["val"])), sorted(set(classes["val"]) - set(classes["train"]))
    if only_train or only_val:
        raise DatasetError(f"{name}: train/ and val/ must have the same classes (labels would shift): "
                           f"only in train/: {only_train or 'none'}; only in val/: {only_val or 'none'}")
    return classes["train"]


def is_folder(entry):
    """Whether an os.scandir entry is a folder (following links); DatasetError naming a link that loops."""
    try:
        return entry.is_dir()
    except OSError as e:
        raise DatasetError(f"cannot read {entry.path} ({e.strerror or e})") from None


def folder_images(root, classes):
    """[(path, label)] of every image file under root/<class>/, sorted; DatasetError for an empty class."""
    samples = []
    for label, c in enumerate(classes):
        try:
            names = os.listdir(os.path.join(root, c))
        except OSError as e:
            raise DatasetError(f"cannot read class folder {os.path.join(root, c)} ({e.strerror or e})") from None
        files = sorted(f for f in names if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DatasetError(f"class folder {os.path.join(root, c)} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        samples += [(os.path.join(root, c, f), label) for f in files]
    return samples


def open_image(path, mode):
    """A PIL image in ``mode``; DatasetError naming the file when it cannot be decoded.

    A 16-bit grey image (PIL's I;16 modes, or I as Pillow opens 16-bit PNGs) is scaled to 8 bits,
    v -> round(v / 257) (65535 -> 255), not clipped as PIL's own conversion does.
    """
    from PIL import Image
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I"):
                wide = np.asarray(img, dtype=np.float64)
                img = Image.fromarray(np.clip(np.rint(wide / SIXTEEN_TO_EIGHT_BITS), 0, 255).astype(np.uint8), "L")
            return img.convert(mode)
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot read image {path} ({type(e).__name__}: {e})") from None


def folder_info(data_dir, image_size=None):
    """The facts of a folder dataset: classes from the tree, channels and size from the first training image.

    Mean and std are placeholders until load_dataset computes them from the
    training images. Crops pad by image_size // 8 (CIFAR's 4 at 32) and flip.
    """
    classes = folder_classes("folder", data_dir)
    first_path = folder_images(os.path.join(data_dir, "train"), classes[:1])[0][0]
    from PIL import Image
    try:
        with Image.open(first_path) as img:
            channels, size = (1 if img.mode in ("1", "L", "I", "I;16", "F") else 3), min(img.size)
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot read image {first_path} ({type(e).__name__}: {e})") from None
    size = image_size or size
    return DatasetInfo("folder", channels, size, len(classes), (0.5,) * channels, (0.25,) * channels, size // 8, True)


def _folder_transform(info):
    import torchvision.transforms as T
    return T.Compose([T.Resize(info.spatial), T.CenterCrop(info.spatial), T.PILToTensor()])


def _folder_in_memory(samples, info):
    """(uint8 images (N, C, S, S), int64 labels) of [(path, label)], resized and centre-cropped to S."""
    mode, to_tensor = ("L" if info.in_channels == 1 else "RGB"), _folder_transform(info)
    images = torch.empty(len(samples), info.in_channels, info.spatial, info.spatial, dtype=torch.uint8)
    for i, (path, _) in enumerate(samples):
        images[i] = to_tensor(open_image(path, mode))
    return images, torch.tensor([label for _, label in samples], dtype=torch.int64)


class FolderImages(torch.utils.data.Dataset):
    """[(path, label)] read one by one (the DataLoader path of folders too big for memory), uint8 (C, S, S)."""

    def __init__(self, samples, info):
        self.samples, self.mode, self.transform = samples, ("L" if info.in_channels == 1 else "RGB"), _folder_transform(info)
        self.targets = [label for _, label in samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.transform(open_image(path, self.mode)), label


def pixel_mean_std(images):
    """Per-channel mean and std in [0, 1] of uint8 images (N, C, H, W), as tuples."""
    x = images.double().div(255).transpose(0, 1).flatten(1)  # (N, C, H, W) -> (C, N*H*W)
    return tuple(round(v, 4) for v in x.mean(1).tolist()), tuple(round(v, 4) for v in x.std(1).tolist())


def _folder(data_dir, info):
    """A folder dataset: in memory (uint8 tensors) when it fits, else FolderImages; info with its mean/std."""
    classes = folder_classes("folder", data_dir)
    samples = {split: folder_images(os.path.join(data_dir, split), classes) for split in ("train", "val")}
    n_bytes = sum(map(len, samples.values())) * info.in_channels * info.spatial ** 2
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if n_bytes <= FOLDER_MEMORY_SHARE * ram:
        train, val = (_folder_in_memory(samples[split], info) for split in ("train", "val"))
        return train, val, replace(info, **dict(zip(("mean", "std"), pixel_mean_std(train[0]))))
    train, val = FolderImages(samples["train"], info), FolderImages(samples["val"], info)
    picks = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:FOLDER_STATS_SAMPLE]
    stats = pixel_mean_std(torch.stack([train[i][0] for i in picks.tolist()]))
    return train, val, replace(info, **dict(zip(("mean", "std"), stats)))


def _imagenet(data_dir, info):
    import torchvision
    import torchvision.transforms as T
    folder_classes("imagenet", data_dir)
    normalize = T.Normalize(info.mean, info.std)
    train_tf = T.Compose([T.RandomResizedCrop(info.spatial), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    val_tf = T.Compose([T.Resize(IMAGENET_RESIZE), T.CenterCrop(info.spatial), T.ToTensor(), normalize])
    def load_rgb(path):
        return open_image(path, "RGB")
    try:
        return (torchvision.datasets.ImageFolder(os.path.join(data_dir, "train"), train_tf, loader=load_rgb),
                torchvision.datasets.ImageFolder(os.path.join(data_dir, "val"), val_tf, loader=load_rgb))
    except FileNotFoundError as e:  # a class folder without images
        raise DatasetError(f"imagenet: {e}") from None


def dataset_info(name, data_dir, image_size=None):
    """The facts needed to plan a model (channels, size, classes) before loading: INFO, or a folder's own."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose from {DATASETS}")
    if image_size is not None and name != "folder":
        raise DatasetError(f"--image-size is for --dataset folder, not {name} ({INFO[name].spatial}x{INFO[name].spatial})")
    return folder_info(data_dir, image_size) if name == "folder" else INFO[name]


def load_dataset(name, data_dir, seed=0, image_size=None):
    """(train, test, info). In-memory sets give (uint8 images (N, C, H, W), int64 labels); ImageNet gives
    ImageFolders, a folder too big for memory FolderImages."""
    info = dataset_info(name, data_dir, image_size)
    if name == "folder":
        return _folder(data_dir, info)
    if name == "synthetic":
        return (synthetic_textures(SYNTHETIC_SIZES["train"], seed), synthetic_textures(SYNTHETIC_SIZES["test"], seed + 1),
                info)
    if name == "imagenet":
        return (*_imagenet(data_dir, info), info)
    train, test = _cifar(name, data_dir) if name in CIFAR else _mnist_like(name, data_dir)
    return train, test, info


def dataset_labels(dataset):
    """Labels of an in-memory (images, labels) pair or an ImageFolder, as an int64 tensor."""
    if isinstance(dataset, tuple):
        return dataset[1]
    return torch.tensor(dataset.targets, dtype=torch.int64)


# ----------------------------------------------------------------------------- subsets

def parse_size(text, flag="--train-size"):
    """'0.1' -> 0.1 (a fraction), '5000' -> 5000 (a count), None -> None (the default)."""
    if text is None or isinstance(text, (int, float)):
        return text
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"{flag} must be a fraction like 0.1 or a count like 5000, got {text!r}") from None


def subset_count(size, n, flag="--train-size"):
    """How many images a --train-size / --val-size of a pool of n means: a fraction of n, or a count."""
    if isinstance(size, float):
        if not 0 < size <= 1:
            raise DatasetError(f"{flag} fraction must be in (0, 1], got {size}")
        return max(1, round(size * n))
    if not 1 <= size <= n:
        raise DatasetError(f"{flag} count must be between 1 and the dataset size {n}, got {size}")
    return size


def stratified_subset(labels, train_size, seed=0):
    """Indices of a class-stratified subset, sorted; the same for the same (labels, train_size, seed).

    train_size: None (all), a float fraction in (0, 1] or an int count in
    [1, N]. Each class keeps its share of the total: counts are the exact
    quotas rounded by largest remainder, so they sum to the requested size.
    """
    n = len(labels)
    if train_size is None:
        return torch.arange(n)
    total = subset_count(train_size, n)
    classes, counts = torch.unique(labels, return_counts=True)
    quota = counts.double() * total / n
    take = quota.floor().long()
    remainder_order = torch.argsort(quota - take, descending=True, stable=True)
    take[remainder_order[:total - int(take.sum())]] += 1
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c, k in zip(classes, take):
        members = torch.nonzero(labels == c).flatten()
        chosen.append(members[torch.randperm(len(members), generator=g)[:int(k)]])
    return torch.cat(chosen).sort().values


def holdout_count(val_size, n):
    """Images in the held-out split of a pool of n: --val-size, or HOLDOUT_SHARE of n capped at HOLDOUT_MAX."""
    if val_size is None:
        return max(1, min(HOLDOUT_MAX, round(HOLDOUT_SHARE * n)))
    count = subset_count(val_size, n, "--val-size")
    if count >= n:
        raise DatasetError(f"--val-size {val_size} leaves no training images (the pool has {n:,})")
    return count


def split_pool(labels, train_size, seed=0, holdout=False, val_size=None):
    """(training indices, held-out validation indices) into the training pool, both sorted.

    Without holdout: the stratified_subset of the whole pool, and no
    validation indices (the behaviour before held-out selection existed).
    With holdout: the validation split is drawn first, class-stratified, from
    its own random stream (HOLDOUT_STREAM); the training subset is then drawn
    from the rest. A --train-size fraction is still a fraction of the whole
    pool, so a run's training-set size does not depend on whether it holds
    images out; 1.0 (the whole pool) means every image not held out.
    """
    if not holdout:
        return stratified_subset(labels, train_size, seed), torch.arange(0)
    n = len(labels)
    held = stratified_subset(labels, holdout_count(val_size, n), stream_seed(seed, HOLDOUT_STREAM))
    rest = torch.ones(n, dtype=torch.bool)
    rest[held] = False
    rest = torch.nonzero(rest).flatten()
    if train_size is None or train_size == 1.0:
        return rest, held
    count = subset_count(train_size, n)
    if count > len(rest):
        raise DatasetError(f"--train-size {train_size} ({count:,} images) and the held-out validation split "
                           f"({len(held):,}) need more than the {n:,} training images: lower one (--val-size)")
    return rest[stratified_subset(labels[rest], count, seed)], held


# ----------------------------------------------------------------------------- fast path

def random_crop_flip(images, padding, flip, generator=None):
    """Per-sample RandomCrop(size, padding) with zero fill, then RandomHorizontalFlip(0.5), on any device.

    images: (B, C, H, W). Offsets are uniform in [0, 2*padding] on each
    axis, as torchvision's RandomCrop draws them.
    """
    B, C, H, W = images.shape
    device = images.device
    if padding:
        padded = F.pad(images, (padding,) * 4)  # (B, C, H, W) -> (B, C, H+2p, W+2p)
        dy = torch.randint(0, 2 * padding + 1, (B,), device=device, generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (B,), device=device, generator=generator)
        rows = (dy[:, None] + torch.arange(H, device=device))[:, None, :, None]  # (B, 1, H, 1)
        cols = (dx[:, None] + torch.arange(W, device=device))[:, None, None, :]  # (B, 1, 1, W)
        batch = torch.arange(B, device=device)[:, None, None, None]
        channel = torch.arange(C, device=device)[None, :, None, None]
        images = padded[batch, channel, rows, cols]  # gather the crops: (B, C, H, W)
    if flip:
        mirror = torch.rand(B, device=device, generator=generator) < 0.5
        images = torch.where(mirror[:, None, None, None], images.flip(-1), images)
    return images


def auto_augment(images, seed):
    """AutoAugment (torchvision, CIFAR-10 policy) drawn per image of a uint8 batch (B, C, H, W), on its device.

    torchvision draws from torch's global generator: here it is seeded with
    ``seed`` inside ``fork_rng``, so the draws are a function of the caller's
    stream (a resumed run repeats them) and the global state is left as it was.
    """
    import torchvision.transforms as T
    policy = T.AutoAugment(T.AutoAugmentPolicy.CIFAR10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([policy(image) for image in images])  # (B, C, H, W), one policy draw per image


class TensorLoader:
    """Batches of an in-memory uint8 dataset held on the training device.

    Shuffles per epoch (``set_epoch``), shards across ranks like
    ``DistributedSampler`` (training: padded to equal shards; evaluation:
    disjoint shards with no sample twice), augments on the device and
    normalises to float32.
    """

    def __init__(self, images, labels, info, batch_size, device, train, seed=0, rank=0, world_size=1,
                 augment="crop-flip"):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1) * 255  # (C,) -> (1, C, 1, 1)
        self.std = torch.tensor(info.std, device=device).view(1, -1, 1, 1) * 255
        self.info, self.batch_size, self.device, self.train = info, batch_size, torch.device(device), train
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self.generator = torch.Generator(device=self.device)
        self.auto_augment = augment == "autoaugment"

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _indices(self):
        n = len(self.labels)
        if not self.train:
            return torch.arange(self.rank, n, self.world_size, device=self.device)
        g = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch, SHUFFLE_STREAM))
        order = torch.randperm(n, generator=g)  # the same on every rank
        per_rank = math.ceil(n / self.world_size)
        order = torch.cat([order, order[:per_rank * self.world_size - n]])  # pad so every rank has per_rank
        return order[self.rank::self.world_size].to(self.device)

    def __len__(self):
        n = len(self.labels)
        per_rank = math.ceil(n / self.world_size) if self.train else len(range(self.rank, n, self.world_size))
        return math.ceil(per_rank / self.batch_size)

    def __iter__(self):
        self.generator.manual_seed(stream_seed(self.seed, self.epoch, self.rank, AUGMENT_STREAM))
        for i, batch in enumerate(self._indices().split(self.batch_size)):
            x = self.images[batch]  # uint8 (B, C, H, W)
            if self.train:
                x = random_crop_flip(x, self.info.crop_padding, self.info.flip, self.generator)
                if self.auto_augment:
                    x = auto_augment(x, stream_seed(self.seed, self.epoch, self.rank, i, AUTOAUGMENT_STREAM))
            yield (x.float() - self.mean) / self.std, self.labels[batch]


# ----------------------------------------------------------------------------- DataLoader path

class TensorImageDataset(torch.utils.data.Dataset):
    """(uint8 images, labels) through torchvision transforms, one sample at a time."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def torchvision_transforms(info, train, augment="crop-flip"):
    """The augmentation table (INFO; --augment) as torchvision transforms on uint8 tensors."""
    import torchvision.transforms as T
    steps = []
    if train and info.crop_padding:
        steps.append(T.RandomCrop(info.spatial, padding=info.crop_padding))
    if train and info.flip:
        steps.append(T.RandomHorizontalFlip())
    if train and augment == "autoaugment":
        steps.append(T.AutoAugment(T.AutoAugmentPolicy.CIFAR10))
    steps += [T.ConvertImageDtype(torch.float32), T.Normalize(info.mean, info.std)]
    return T.Compose(steps)


class EpochDataLoader:
    """A DataLoader whose sampler is told the epoch (shuffling under DDP differs per epoch)."""

    def __init__(self, dataset, batch_size, train, workers, device, seed=0, rank=0, world_size=1):
        self.sampler, self.generator, self.seed, self.rank = None, torch.Generator().manual_seed(seed), seed, rank
        if world_size > 1 and train:
            self.sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed)
        elif world_size > 1:  # disjoint shards: DistributedSampler would repeat samples to even them out
            dataset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
        elif train:
            self.sampler = torch.utils.data.RandomSampler(dataset, generator=self.generator)
        # Workers are started anew every epoch, seeded from self.generator: their augmentation draws are a
        # function of (seed, epoch), so a resumed run repeats an uninterrupted one (persistent workers
        # would carry their random state over from the epochs before the interruption).
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers, generator=self.generator,
            pin_memory=torch.device(device).type == "cuda", persistent_workers=False, drop_last=False)

    def set_epoch(self, epoch):
        """Shuffle and augment as a function of (seed, epoch), so that a resumed run repeats an uninterrupted one."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self.generator.manual_seed(stream_seed(self.seed, epoch, self.rank, SHUFFLE_STREAM))

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


@dataclass
class Loaders:
    train: object  # TensorLoader or EpochDataLoader, both with set_epoch()
    val: object  # the held-out validation split (--select val), or None
    test: object
    info: DatasetInfo
    n_train: int  # images in the (subset of the) training set
    n_val: int  # images held out of the training pool for model selection (0: none)
    n_test: int


class Transformed(torch.utils.data.Dataset):
    """A dataset of (uint8 image, label) with a transform applied to each image."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return self.transform(image), label


def build_loaders(name, data_dir, train_size, batch_size, device, fast_path=None, workers=4, seed=0, rank=0,
                  world_size=1, augment="crop-flip", image_size=None, holdout=False, val_size=None):
    """Train, held-out validation and test loaders (per-rank batch_size) with the dataset's facts, as ``Loaders``.

    fast_path None: on for the datasets held in memory (on CPU too, where it
    is faster than worker processes for these small images), off for
    ImageNet and folders too big for memory. The subsets depend only on
    (dataset, train_size, val_size, seed), so every rank draws the same ones
    (split_pool). holdout: carve a validation split out of the training pool
    (val None without it). augment (AUGMENTATIONS): 'none' trains on the
    images as they are (no crop, no flip; in-memory datasets only), the
    protocol of the usual fixed-scattering + linear baselines; 'autoaugment'
    adds AutoAugment after the crop and flip (not ImageNet's pipeline).
    """
    if augment not in AUGMENTATIONS:
        raise DatasetError(f"--augment must be one of {AUGMENTATIONS}, got {augment!r}")
    if augment == "none" and name not in IN_MEMORY:
        raise DatasetError(f"--augment none (--no-augment) is for the in-memory datasets {IN_MEMORY}, not {name}")
    if augment == "autoaugment" and name == "imagenet":
        raise DatasetError("--augment autoaugment uses the CIFAR-10 policy: not for imagenet (its pipeline is "
                           "RandomResizedCrop + flip)")
    if fast_path and name not in IN_MEMORY:
        raise DatasetError(f"the in-memory fast path supports {IN_MEMORY}, not {name}")
    train, test, info = load_dataset(name, data_dir, seed, image_size)
    in_memory = isinstance(train, tuple)
    if (fast_path or augment == "none") and not in_memory:
        raise DatasetError(f"{data_dir} is too large to hold in memory ({FOLDER_MEMORY_SHARE:.0%} of the RAM at most): "
                           f"--fast-path and --no-augment need it there")
    if augment == "none":
        info = replace(info, crop_padding=0, flip=False)
    subset, held = split_pool(dataset_labels(train), train_size, seed, holdout, val_size)
    fast_path = in_memory if fast_path is None else fast_path
    sizes = (len(subset), len(held), len(dataset_labels(test)))
    if fast_path:
        def loader(images, labels, training):
            return TensorLoader(images, labels, info, batch_size, device, training, seed, rank, world_size, augment)
        return Loaders(loader(train[0][subset], train[1][subset], True),
                       loader(train[0][held], train[1][held], False) if holdout else None,
                       loader(*test, False), info, *sizes)
    if name == "imagenet":  # ImageFolders with their transforms; the held-out images get the test one
        untransformed = copy.copy(train)
        untransformed.transform = test.transform
        train_ds, held_ds, test_ds = (torch.utils.data.Subset(train, subset.tolist()),
                                      torch.utils.data.Subset(untransformed, held.tolist()), test)
    elif in_memory:
        train_ds = TensorImageDataset(train[0][subset], train[1][subset], torchvision_transforms(info, True, augment))
        held_ds = TensorImageDataset(train[0][held], train[1][held], torchvision_transforms(info, train=False))
        test_ds = TensorImageDataset(*test, torchvision_transforms(info, train=False))
    else:
        evaluation = torchvision_transforms(info, train=False)
        train_ds = Transformed(torch.utils.data.Subset(train, subset.tolist()), torchvision_transforms(info, True, augment))
        held_ds = Transformed(torch.utils.data.Subset(train, held.tolist()), evaluation)
        test_ds = Transformed(test, evaluation)

    def loader(dataset, training):
        return EpochDataLoader(dataset, batch_size, training, workers, device, seed, rank, world_size)
    return Loaders(loader(train_ds, True), loader(held_ds, False) if holdout else None, loader(test_ds, False), info,
                   *sizes)


if __name__ == "__main__":
    main()
