import gzip
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

N_DRAWS = 4000  # augmentation samples per path; 25 crop offsets -> 160 expected per offset


def test_stratified_fraction_keeps_class_proportions_exactly():
    labels = torch.arange(1000) % 10
    labels[:300] = 0  # unbalanced: class 0 has 300 + 70 samples
    idx = data.stratified_subset(labels, 0.1, seed=0)
    counts = torch.bincount(labels[idx], minlength=10)
    expected = torch.bincount(labels, minlength=10).double() * 0.1
    assert len(idx) == 100 and (counts - expected).abs().max() <= 1
    assert len(set(idx.tolist())) == 100


def test_stratified_count_sums_exactly_and_is_repeatable():
    labels = torch.arange(997) % 7
    idx = data.stratified_subset(labels, 500, seed=3)
    assert len(idx) == 500
    assert torch.equal(idx, data.stratified_subset(labels, 500, seed=3))
    assert not torch.equal(idx, data.stratified_subset(labels, 500, seed=4))
    quota = torch.bincount(labels).double() * 500 / 997
    assert (torch.bincount(labels[idx]) - quota).abs().max() < 1


def test_full_set_and_parse():
    assert torch.equal(data.stratified_subset(torch.zeros(5, dtype=torch.long), None), torch.arange(5))
    assert data.parse_size("0.1") == 0.1 and data.parse_size("5000") == 5000
    assert data.parse_size("1.0") == 1.0 and data.parse_size(None) is None and data.parse_size(0.2) == 0.2


@pytest.mark.parametrize("size,message", [
    (0, "--train-size count must be between 1 and the dataset size 100, got 0"),
    (-5, "--train-size count must be between 1 and the dataset size 100, got -5"),
    (101, "--train-size count must be between 1 and the dataset size 100, got 101"),
    (1.5, "--train-size fraction must be in (0, 1], got 1.5"),
    (0.0, "--train-size fraction must be in (0, 1], got 0.0"),
])
def test_subset_errors(size, message):
    with pytest.raises(data.DatasetError) as e:
        data.stratified_subset(torch.arange(100) % 10, size)
    assert str(e.value) == message


def test_parse_error():
    with pytest.raises(data.DatasetError, match="--train-size must be a fraction like 0.1 or a count like 5000, got 'ten'"):
        data.parse_size("ten")
    with pytest.raises(data.DatasetError, match="--val-size must be a fraction like 0.1 or a count like 5000, got '1/2'"):
        data.parse_size("1/2", "--val-size")


def test_held_out_split_is_stratified_disjoint_and_leaves_the_training_fraction_of_the_pool():
    labels = torch.arange(1000) % 10
    train, held = data.split_pool(labels, 0.5, seed=3, holdout=True)
    assert len(held) == 100 and len(train) == 500  # 10 % held out; 0.5 is half of the whole pool
    assert not set(train.tolist()) & set(held.tolist())
    assert torch.bincount(labels[held]).tolist() == [10] * 10 and torch.bincount(labels[train]).tolist() == [50] * 10
    # its own random stream: the held-out images do not depend on --train-size
    assert torch.equal(held, data.split_pool(labels, 200, seed=3, holdout=True)[1])
    assert not torch.equal(held, data.split_pool(labels, 200, seed=4, holdout=True)[1])
    everything, held = data.split_pool(labels, None, seed=3, holdout=True, val_size=0.25)
    assert len(held) == 250 and len(everything) == 750
    assert torch.equal(data.split_pool(labels, 1.0, seed=3, holdout=True, val_size=0.25)[0], everything)  # 1.0: all
    # without a held-out split: the subset of the whole pool, as before --select existed
    train, held = data.split_pool(labels, 0.5, seed=3)
    assert torch.equal(train, data.stratified_subset(labels, 0.5, seed=3)) and len(held) == 0


def test_default_held_out_split_is_a_tenth_capped_at_5000():
    assert data.holdout_count(None, 3051) == 305 and data.holdout_count(None, 60000) == 5000
    assert data.holdout_count(123, 3051) == 123 and data.holdout_count(0.2, 1000) == 200


@pytest.mark.parametrize("train_size,val_size,message", [
    (950, None, "--train-size 950 (950 images) and the held-out validation split (100) need more than the 1,000 "
                "training images: lower one (--val-size)"),
    (None, 1000, "--val-size 1000 leaves no training images (the pool has 1,000)"),
    (None, 0, "--val-size count must be between 1 and the dataset size 1000, got 0"),
    (None, 1.5, "--val-size fraction must be in (0, 1], got 1.5"),
])
def test_held_out_split_errors(train_size, val_size, message):
    with pytest.raises(data.DatasetError) as e:
        data.split_pool(torch.arange(1000) % 10, train_size, holdout=True, val_size=val_size)
    assert str(e.value) == message


@pytest.mark.parametrize("fast_path", [True, False])
def test_held_out_loader_reads_training_images_without_augmentation(fast_path):
    loaders = data.build_loaders("synthetic", "unused", 0.1, 64, "cpu", fast_path=fast_path, workers=0, seed=5,
                                 holdout=True)
    train, _, info = data.load_dataset("synthetic", "unused", seed=5)
    _, held = data.split_pool(train[1], 0.1, seed=5, holdout=True)
    assert loaders.n_train == 400 and loaders.n_val == len(held) == 400 and loaders.n_test == 1000
    images = torch.cat([x for x, _ in loaders.val])
    expected = (train[0][held].float() / 255 - torch.tensor(info.mean).view(1, -1, 1, 1)) / \
        torch.tensor(info.std).view(1, -1, 1, 1)
    assert torch.allclose(images, expected, atol=1e-5)  # the held-out images as they are, twice the same
    assert torch.allclose(images, torch.cat([x for x, _ in loaders.val]))


def test_synthetic_is_deterministic_and_balanced():
    a, b = data.synthetic_textures(200, seed=1), data.synthetic_textures(200, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], data.synthetic_textures(200, seed=2)[0])
    assert a[0].shape == (200, 3, 32, 32) and a[0].dtype == torch.uint8
    assert torch.bincount(a[1]).tolist() == [20] * 10


def position_image(H=8, W=8):
    """One-channel float image whose pixels are 1..H*W, so a crop's content reveals its offset and flip."""
    return torch.arange(1, H * W + 1, dtype=torch.float32).view(1, 1, H, W)


def recover_offsets(crops, padding):
    """(dy, dx, flipped) of each crop, by matching every possible crop of the padded position image."""
    img = position_image()
    padded = torch.nn.functional.pad(img, (padding,) * 4)[0, 0]
    found = []
    for crop in crops:
        for dy in range(2 * padding + 1):
            for dx in range(2 * padding + 1):
                window = padded[dy:dy + 8, dx:dx + 8]
                if torch.equal(crop, window):
                    found.append((dy, dx, False))
                elif torch.equal(crop, window.flip(-1)):
                    found.append((dy, dx, True))
    assert len(found) == len(crops)  # every crop is one of the 2 * 25 candidates, exactly once
    return np.array(found)


def assert_uniform_crops_and_fair_flips(found, padding):
    counts = np.zeros((2 * padding + 1, 2 * padding + 1))
    np.add.at(counts, (found[:, 0], found[:, 1]), 1)
    expected = len(found) / counts.size
    assert counts.min() > 0.6 * expected and counts.max() < 1.4 * expected
    assert abs(found[:, 2].mean() - 0.5) < 0.035


def test_fast_path_augmentation_matches_torchvision_distribution():
    info = data.DatasetInfo("t", 1, 8, 10, (0.0,), (1.0,), crop_padding=2, flip=True)
    img = position_image()
    g = torch.Generator().manual_seed(0)
    fast = data.random_crop_flip(img.expand(N_DRAWS, 1, 8, 8), info.crop_padding, info.flip, g)[:, 0]
    assert fast.shape == (N_DRAWS, 8, 8)
    assert_uniform_crops_and_fair_flips(recover_offsets(fast, 2), 2)
    torch.manual_seed(0)
    reference = data.torchvision_transforms(info, train=True)  # the DataLoader path's own transforms
    slow = torch.stack([reference(img[0]) for _ in range(N_DRAWS)])[:, 0]
    assert_uniform_crops_and_fair_flips(recover_offsets(slow, 2), 2)


def test_no_flip_datasets_are_never_flipped():
    found = recover_offsets(data.random_crop_flip(position_image().expand(500, 1, 8, 8), 2, False)[:, 0], 2)
    assert not found[:, 2].any()


def test_fast_path_normalisation_equals_torchvision_path():
    images, labels = data.synthetic_textures(64, seed=0)
    info = data.INFO["synthetic"]
    fast = torch.cat([x for x, _ in data.TensorLoader(images, labels, info, 16, "cpu", train=False)])
    transform = data.torchvision_transforms(info, train=False)
    slow = torch.stack([transform(img) for img in images])
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    train_batch, _ = next(iter(data.TensorLoader(images, labels, info, 64, "cpu", train=True)))
    assert train_batch.shape == (64, 3, 32, 32) and train_batch.dtype == torch.float32


def test_tensor_loader_shards_like_distributed_sampler():
    images, labels = torch.zeros(10, 1, 4, 4, dtype=torch.uint8), torch.arange(10)
    info = data.DatasetInfo("t", 1, 4, 10, (0.0,), (1.0,), 0, False)
    shards = [data.TensorLoader(images, labels, info, 3, "cpu", True, seed=5, rank=r, world_size=3) for r in range(3)]
    seen = [torch.cat([y for _, y in s]) for s in shards]
    assert [len(s) for s in seen] == [4, 4, 4] and set(torch.cat(seen).tolist()) == set(range(10))
    val = [data.TensorLoader(images, labels, info, 3, "cpu", False, rank=r, world_size=3) for r in range(3)]
    val_seen = torch.cat([y for v in val for _, y in v])
    assert sorted(val_seen.tolist()) == list(range(10))  # disjoint: every sample exactly once
    first = torch.cat([y for _, y in shards[0]])
    shards[0].set_epoch(1)
    assert not torch.equal(first, torch.cat([y for _, y in shards[0]]))


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_reads_mnist_idx_files_from_data_dir(tmp_path):
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 256, (5, 28, 28))
    for name, arr in (("train-images-idx3-ubyte", train_x), ("train-labels-idx1-ubyte", np.arange(20) % 10),
                      ("t10k-images-idx3-ubyte", test_x), ("t10k-labels-idx1-ubyte", np.arange(5))):
        write_idx(tmp_path / f"{name}.gz", arr)
    (x, y), (xt, yt), info = data.load_dataset("mnist", str(tmp_path))
    assert x.shape == (20, 1, 28, 28) and torch.equal(x[:, 0], torch.from_numpy(train_x.astype(np.uint8)))
    assert yt.tolist() == [0, 1, 2, 3, 4] and info.in_channels == 1


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(data, "_download", lambda name, root: "offline (test)")
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", "/nonexistent/fashion-mnist")


def test_missing_fashion_mnist_names_files_and_folders(tmp_path, offline):
    with pytest.raises(data.DatasetError) as e:
        data.load_dataset("fashion-mnist", str(tmp_path))
    message = str(e.value)
    assert "train-images-idx3-ubyte" in message and str(tmp_path) in message
    assert "/nonexistent/fashion-mnist" in message and "apt-get install dataset-fashion-mnist" in message


def test_missing_cifar10_names_files_and_folder(tmp_path, offline):
    with pytest.raises(data.DatasetError) as e:
        data.load_dataset("cifar10", str(tmp_path))
    assert str(e.value).startswith(f"cifar10: data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, "
                                   f"test_batch not found in {os.path.join(tmp_path, 'cifar-10-batches-py')}")


def test_missing_imagenet_folder(tmp_path):
    with pytest.raises(data.DatasetError, match=r"imagenet: no folder .*/train; --data-dir must contain train/ and val/"):
        data.load_dataset("imagenet", str(tmp_path))


def test_build_loaders_subset_and_paths():
    fast = data.build_loaders("synthetic", "unused", 0.1, 32, "cpu", fast_path=True)
    slow = data.build_loaders("synthetic", "unused", 0.1, 32, "cpu", fast_path=False, workers=0)
    assert fast.n_train == slow.n_train == 400 and fast.n_test == 1000 and fast.val is None and fast.n_val == 0
    assert isinstance(fast.train, data.TensorLoader) and isinstance(slow.train, data.EpochDataLoader)
    x, y = next(iter(slow.train))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32
    assert len(fast.train) == len(slow.train) == 13


@pytest.mark.parametrize("fast_path", [True, False])
def test_no_augment_trains_on_the_images_as_they_are(fast_path):
    plain = data.build_loaders("synthetic", "unused", 200, 50, "cpu", fast_path=fast_path, workers=0, augment="none")
    augmented = data.build_loaders("synthetic", "unused", 200, 50, "cpu", fast_path=fast_path, workers=0)
    (train, _), _, info = data.load_dataset("synthetic", "unused")
    lookup = {img.numpy().tobytes() for img in train}  # every un-augmented training image, as uint8
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (info.mean, info.std))

    def as_uint8(x):  # undo the normalisation: (B, C, H, W) float -> uint8
        return (x * std + mean).mul(255).round().to(torch.uint8)

    batches = [as_uint8(x) for x, _ in plain.train]
    assert sum(len(x) for x in batches) == 200 and all(xi.numpy().tobytes() in lookup for x in batches for xi in x)
    x = as_uint8(next(iter(augmented.train))[0])
    assert sum(xi.numpy().tobytes() in lookup for xi in x) < len(x)  # crops (4 px padding) move most images


def test_no_augment_is_for_in_memory_sets():
    with pytest.raises(data.DatasetError, match=r"--augment none \(--no-augment\) is for the in-memory datasets .*, not imagenet"):
        data.build_loaders("imagenet", "unused", None, 50, "cpu", augment="none")


def make_folder(root, classes=("cat", "dog", "frog"), per_class=(4, 2), size=12, mode="RGB", seed=0):
    """An ImageFolder tree root/{train,val}/<class>/<i>.png of random images; returns {split: uint8 array}."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    pixels = {}
    for split, n in zip(("train", "val"), per_class):
        arrays = []
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                shape = (size, size, 3) if mode == "RGB" else (size, size)
                arrays.append(rng.integers(0, 256, shape, dtype=np.uint8))
                Image.fromarray(arrays[-1], mode).save(root / split / c / f"{i}.png")
        pixels[split] = np.stack(arrays)
    return pixels


def test_folder_dataset_in_memory_with_its_own_statistics(tmp_path):
    pixels = make_folder(tmp_path)
    (x, y), (xv, yv), info = data.load_dataset("folder", str(tmp_path))
    assert x.shape == (12, 3, 12, 12) and x.dtype == torch.uint8 and xv.shape == (6, 3, 12, 12)
    assert torch.equal(x, torch.from_numpy(pixels["train"]).permute(0, 3, 1, 2))  # files in sorted order
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and yv.tolist() == [0, 0, 1, 1, 2, 2]
    expected_mean = pixels["train"].reshape(-1, 3).mean(0) / 255
    assert info.mean == pytest.approx(tuple(expected_mean), abs=1e-4) and info.nb_classes == 3
    assert info.spatial == 12 and info.crop_padding == 1 and info.flip  # CIFAR's 4 px at 32, scaled
    loaders = data.build_loaders("folder", str(tmp_path), None, 4, "cpu")
    assert isinstance(loaders.train, data.TensorLoader) and loaders.n_train == 12 and loaders.n_test == 6


def test_folder_image_size_and_grayscale(tmp_path):
    make_folder(tmp_path, size=20, mode="L")
    info = data.dataset_info("folder", str(tmp_path), image_size=8)
    assert (info.in_channels, info.spatial, info.nb_classes) == (1, 8, 3)
    (x, _), _, _ = data.load_dataset("folder", str(tmp_path), image_size=8)
    assert x.shape == (12, 1, 8, 8)


def test_folder_too_big_for_memory_reads_from_disk(tmp_path, monkeypatch):
    make_folder(tmp_path)
    monkeypatch.setattr(data, "FOLDER_MEMORY_SHARE", 0.0)
    loaders = data.build_loaders("folder", str(tmp_path), None, 4, "cpu", workers=0)
    assert isinstance(loaders.train, data.EpochDataLoader)
    x, y = next(iter(loaders.train))
    assert x.shape == (4, 3, 12, 12) and x.dtype == torch.float32
    with pytest.raises(data.DatasetError, match="too large to hold in memory"):
        data.build_loaders("folder", str(tmp_path), None, 4, "cpu", fast_path=True)


def test_folder_splits_must_have_the_same_classes(tmp_path):
    make_folder(tmp_path)
    os.rename(tmp_path / "val" / "dog", tmp_path / "val" / "horse")
    with pytest.raises(data.DatasetError) as e:
        data.dataset_info("folder", str(tmp_path))
    assert str(e.value) == ("folder: train/ and val/ must have the same classes (labels would shift): only in train/: "
                            "['dog']; only in val/: ['horse']")


def test_folder_empty_class_and_corrupt_image_are_named(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "train" / "cat" / "1.png").write_bytes(b"not a png")
    with pytest.raises(data.DatasetError, match=r"cannot read image .*train/cat/1.png \(UnidentifiedImageError"):
        data.load_dataset("folder", str(tmp_path))
    os.makedirs(tmp_path / "val" / "zebra")
    os.makedirs(tmp_path / "train" / "zebra")
    with pytest.raises(data.DatasetError, match=r"class folder .*train/zebra has no images"):
        data.load_dataset("folder", str(tmp_path))


def test_missing_cifar100_names_its_folder(tmp_path, offline):
    with pytest.raises(data.DatasetError) as e:
        data.load_dataset("cifar100", str(tmp_path))
    assert str(e.value).startswith(f"cifar100: train, test not found in {os.path.join(tmp_path, 'cifar-100-python')}")
    assert data.INFO["cifar100"].nb_classes == 100


def test_image_size_is_for_folders_only():
    with pytest.raises(data.DatasetError, match=r"--image-size is for --dataset folder, not cifar10 \(32x32\)"):
        data.dataset_info("cifar10", "unused", image_size=16)


@pytest.mark.parametrize("damage,message", [
    ("truncated", "is truncated or padded: its header promises"),
    ("not gzip", "cannot read"),
    ("bad header", "is not an idx file of bytes (bad header)"),
])
def test_damaged_idx_files_are_named(tmp_path, damage, message):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, np.zeros((5, 28, 28)))
    if damage == "truncated":
        raw = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(raw[:len(raw) - 100]))
    elif damage == "not gzip":
        path.write_bytes(b"plain text, not gzip")
    else:
        path.write_bytes(gzip.compress(b"\x01\x02\x03\x04" + bytes(100)))
    with pytest.raises(data.DatasetError) as e:
        data._read_idx(str(path))
    assert message in str(e.value) and str(path) in str(e.value)


def test_a_failed_download_is_one_line_and_leaves_no_empty_folders(tmp_path, monkeypatch):
    import torchvision

    class Offline:
        def __init__(self, root, train, download):
            os.makedirs(os.path.join(root, "MNIST", "raw"), exist_ok=True)
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried mirror 1\nTried mirror 2")
    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    error = data._download("MNIST", str(tmp_path / "data"))
    assert error == "RuntimeError: Error downloading train-images-idx3-ubyte.gz: Tried mirror 1 Tried mirror 2"
    assert not (tmp_path / "data").exists()


def test_dataloader_workers_repeat_an_epoch_after_a_restart():
    """A resumed run builds its loader anew and starts at epoch k: its batches must be those of epoch k."""
    def batches(loader, epoch):
        loader.set_epoch(epoch)
        return [x for x, _ in loader]
    make = lambda: data.build_loaders("synthetic", "unused", 64, 16, "cpu", fast_path=False, workers=1, seed=3)
    running = make().train
    batches(running, 1)
    second = batches(running, 2)
    restarted = batches(make().train, 2)
    assert all(torch.equal(a, b) for a, b in zip(second, restarted)) and len(second) == 4


def write_cifar_batches(folder, extra=2):
    """CIFAR-10 python batches 1-4 of random images (SAMPLE_PER_BATCH + extra each), in CIFAR's format."""
    import pickle
    rng = np.random.default_rng(0)
    batches = {}
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4"):
        n = data.SAMPLE_PER_BATCH + extra
        batches[name] = (rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8), rng.integers(0, 10, n).tolist())
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": b"x", b"data": batches[name][0], b"labels": batches[name][1]}, f)
    return batches


def test_the_cifar10_sample_is_rebuilt_from_cifars_python_batches(tmp_path):
    from PIL import Image
    batches = write_cifar_batches(tmp_path)
    out = tmp_path / "sample"
    proc = subprocess.run([sys.executable, "data.py", "cifar10-sample", "--cifar-dir", str(tmp_path), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("wrote 3,051 train and 1,017 val images to")
    for split, names in (("train", ["data_batch_1", "data_batch_2", "data_batch_3"]), ("val", ["data_batch_4"])):
        images = np.concatenate([batches[n][0][:data.SAMPLE_PER_BATCH] for n in names])
        labels = sum((batches[n][1][:data.SAMPLE_PER_BATCH] for n in names), [])
        for index in sorted({0, 1016, len(labels) - 1, min(1017, len(labels) - 1)}):
            path = out / split / data.CIFAR10_CLASSES[labels[index]] / f"{index:05d}.png"
            pixels = np.asarray(Image.open(path)).transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
            assert np.array_equal(pixels, images[index].reshape(3, 32, 32))  # rows hold the R, G, B planes
        assert sum(len(files) for _, _, files in os.walk(out / split)) == len(labels)
    (x, y), (xv, _), info = data.load_dataset("folder", str(out))
    assert x.shape == (3051, 3, 32, 32) and xv.shape == (1017, 3, 32, 32) and info.nb_classes == 10


def test_the_cifar10_sample_refuses_what_it_cannot_build(tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    for argv, message in (
            (["--cifar-dir", str(tmp_path), "--out", str(tmp_path / "exists")],
             f"error: {tmp_path / 'exists'} already exists: choose another --out (nothing was overwritten)"),
            (["--cifar-dir", str(tmp_path), "--out", str(tmp_path / "new")],
             f"error: {tmp_path / 'data_batch_1'} not found: --cifar-dir must hold CIFAR-10's python batches "
             f"(cifar-10-batches-py)")):
        with pytest.raises(SystemExit) as e:
            data.main(["cifar10-sample", *argv])
        assert e.value.code == 2 and capsys.readouterr().err.strip() == message
    import pickle
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump(os.system, f)  # a pickle that would run code
    with pytest.raises(data.DatasetError, match="may hold NumPy arrays only, not posix.system"):
        data.read_cifar_batch(tmp_path / "data_batch_1")
    assert not (tmp_path / "new").exists() and not (tmp_path / "new.partial").exists()


def test_a_16_bit_image_is_scaled_not_clipped(tmp_path):
    from PIL import Image
    make_folder(tmp_path, mode="L")
    wide = np.arange(144, dtype=np.uint16).reshape(12, 12) * 455  # 0 .. 65065, the whole 16-bit range
    Image.fromarray(wide).save(tmp_path / "train" / "cat" / "0.png")
    assert Image.open(tmp_path / "train" / "cat" / "0.png").mode.startswith("I")  # as Pillow opens 16-bit PNGs
    (x, _), _, _ = data.load_dataset("folder", str(tmp_path))
    assert torch.equal(x[0, 0], torch.from_numpy(np.rint(wide / 257).astype(np.uint8)))  # PIL's convert would clip
    assert (x[0, 0] == 255).float().mean() < 0.01


def test_a_looping_link_and_a_single_class_are_one_line(tmp_path):
    make_folder(tmp_path, classes=("cat",))
    with pytest.raises(data.DatasetError) as e:
        data.dataset_info("folder", str(tmp_path))
    assert str(e.value) == (f"folder: {tmp_path}/train has one class sub-folder (cat): a classifier needs at least 2 "
                            f"classes (with one, every answer is right)")
    os.symlink("loop", tmp_path / "train" / "loop")  # a link to itself
    with pytest.raises(data.DatasetError) as e:
        data.dataset_info("folder", str(tmp_path))
    assert str(e.value) == f"cannot read {tmp_path}/train/loop (Too many levels of symbolic links)"


def test_auto_augment_draws_a_policy_per_image_from_the_callers_stream():
    image = data.synthetic_textures(1, seed=0)[0][0]  # (3, 32, 32) uint8
    batch = image.expand(64, -1, -1, -1)
    before = torch.random.get_rng_state()
    out = data.auto_augment(batch, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global generator is left as it was
    assert out.shape == batch.shape and out.dtype == torch.uint8
    distinct = {x.numpy().tobytes() for x in out}
    assert len(distinct) > 16  # one draw per image, not one per batch
    assert torch.equal(data.auto_augment(batch, seed=7), out) and not torch.equal(data.auto_augment(batch, 8), out)


@pytest.mark.parametrize("fast_path", [True, False])
def test_autoaugment_loaders_repeat_per_epoch_and_differ_from_crop_flip(fast_path):
    def first_batch(augment, epoch=0):
        loaders = data.build_loaders("synthetic", "unused", 200, 50, "cpu", fast_path=fast_path,
                                     workers=0 if fast_path else 1, augment=augment)  # a worker seeded per epoch
        loaders.train.set_epoch(epoch)
        return next(iter(loaders.train))[0]

    auto = first_batch("autoaugment")
    assert torch.equal(auto, first_batch("autoaugment"))  # a function of (seed, epoch): resumes repeat it
    assert not torch.equal(auto, first_batch("autoaugment", epoch=1))
    assert not torch.equal(auto, first_batch("crop-flip"))


def test_augment_errors():
    with pytest.raises(data.DatasetError, match=r"^--augment must be one of \('crop-flip', 'autoaugment', 'none'\), "
                                                r"got 'mixup'$"):
        data.build_loaders("synthetic", "unused", 200, 50, "cpu", augment="mixup")
    with pytest.raises(data.DatasetError, match=r"^--augment autoaugment uses the CIFAR-10 policy: not for imagenet"):
        data.build_loaders("imagenet", "unused", None, 50, "cpu", augment="autoaugment")
