"""Image classification data for the CNN benchmark: CIFAR-10 from disk, or an embedded default.

Nothing is downloaded. ``load_images(path)`` reads CIFAR-10 in the on-disk format torchvision
uses (``cifar-10-batches-py``: pickled numpy batches) directly, without torchvision. With no
path it uses scikit-learn's bundled handwritten digits (1797 images of 8x8, 10 classes; the
optional ``bench`` extra installs scikit-learn), upsampled to 32x32 so the same CNN runs on both.
Three splits by default (train / valid / test: settings are chosen on valid, results reported on
test); ``test_split=False`` gives the two-way split of the earlier benchmarks (no test).
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
CIFAR_META_FILE = "batches.meta"
DIGITS_VALID_FRACTION = 0.2
DIGITS_TEST_FRACTION = 0.2  # carved from what was train in the two-way split
DIGITS_SPLIT_SEED = 0
CIFAR_VALID_FRACTION = 0.1  # of the train images (5000 of 50000): CIFAR-10 has no valid split
CIFAR_SPLIT_SEED = 0


@dataclasses.dataclass
class ImageData:
    """Images as float32 (N, C, 32, 32) in [0, 1] with int64 (N,) labels in [0, num_classes).
    ``test_x``/``test_y`` are None when loaded with ``test_split=False``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    valid_x: torch.Tensor
    valid_y: torch.Tensor
    class_names: tuple
    source: str  # "cifar10:<folder>" or "digits"
    test_x: Optional[torch.Tensor] = None
    test_y: Optional[torch.Tensor] = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_images(path: str | os.PathLike | None = None, channels: int = 3,
                test_split: bool = True) -> ImageData:
    """CIFAR-10 from ``path``, or the embedded digits when ``path`` is None.

    ``path`` is the ``cifar-10-batches-py`` folder or the folder holding it (a torchvision
    root), with 3 channels; ``channels`` must then be 3. CIFAR-10: 45000 train and 5000 valid
    images (a fixed random split of data_batch_1..5) and 10000 test (test_batch). The digits:
    1079 train, 359 valid and 359 test images (a fixed random split), bilinearly upsampled from
    8x8 to 32x32, with the grey level repeated over ``channels`` (3, default, to match CIFAR-10,
    or 1).
    ``test_split=False``: the earlier two-way split, no test images (``test_x`` is None):
    CIFAR-10 50000 train / 10000 valid (test_batch), digits 1438 train / 359 valid (the same
    valid images as with a test split; train is train + test of the three-way split).
    Raises DataError for a missing or malformed folder, or when scikit-learn is missing.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if path is None:
        return _load_digits(channels, test_split)
    if channels != 3:
        raise ValueError("CIFAR-10 images have 3 channels; channels=1 is only for the digits")
    return load_cifar10(path, test_split)


def load_cifar10(path: str | os.PathLike, test_split: bool = True) -> ImageData:
    """CIFAR-10 from a ``cifar-10-batches-py`` folder (or its parent); see ``load_images``."""
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise DataError(f"CIFAR-10 path {folder!r} is not a folder")
    if os.path.isdir(os.path.join(folder, CIFAR_FOLDER)):
        folder = os.path.join(folder, CIFAR_FOLDER)
    missing = [f for f in CIFAR_TRAIN_FILES + (CIFAR_TEST_FILE,)
               if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataError(f"{folder!r} is not a CIFAR-10 folder ({CIFAR_FOLDER}): missing "
                        f"{', '.join(missing)}")
    train = [_read_cifar_batch(os.path.join(folder, f)) for f in CIFAR_TRAIN_FILES]
    valid_x, valid_y = _read_cifar_batch(os.path.join(folder, CIFAR_TEST_FILE))
    meta_path = os.path.join(folder, CIFAR_META_FILE)
    if os.path.isfile(meta_path):
        meta = _unpickle(meta_path)
        names = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n)
                      for n in _field(meta, "label_names", meta_path))
    else:
        names = tuple(str(i) for i in range(10))
    train_x, train_y = torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])
    source = f"cifar10:{folder}"
    if not test_split:
        return ImageData(train_x, train_y, valid_x, valid_y, names, source)
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(CIFAR_SPLIT_SEED))
    n_valid = round(CIFAR_VALID_FRACTION * len(train_y))
    valid, rest = order[:n_valid], order[n_valid:]
    return ImageData(train_x[rest], train_y[rest], train_x[valid], train_y[valid], names, source,
                     test_x=valid_x, test_y=valid_y)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    # CIFAR-10 batches hold dicts, lists, bytes and numpy arrays only; refusing every other
    # global keeps a crafted file from running code when it is loaded.
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def _unpickle(path: str):
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DataError(f"cannot read CIFAR-10 file {path!r}: {exc}") from exc


def _field(batch, name: str, path: str):
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR-10 file {path!r} does not hold a dict")
    for key in (name.encode(), name):
        if key in batch:
            return batch[key]
    raise DataError(f"CIFAR-10 file {path!r} has no {name!r} entry")


def _read_cifar_batch(path: str) -> tuple:
    batch = _unpickle(path)
    data = np.asarray(_field(batch, "data", path))
    labels = np.asarray(_field(batch, "labels", path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"CIFAR-10 file {path!r}: data must be uint8 (N, 3072), got "
                        f"{data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],) or (labels.size and not 0 <= labels.min() <= labels.max() < 10):
        raise DataError(f"CIFAR-10 file {path!r}: labels must be N={data.shape[0]} ints in [0, 10)")
    # Rows are 1024 red, 1024 green, 1024 blue values, each plane row-major 32x32.
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    return x, torch.from_numpy(labels.astype(np.int64))


def _load_digits(channels: int, test_split: bool) -> ImageData:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError("the embedded image data (scikit-learn's digits) needs scikit-learn: "
                        "pip install 'mat_cuda[bench]' (or scikit-learn), or give a CIFAR-10 "
                        f"folder ({exc})") from exc
    digits = load_digits()
    x = torch.from_numpy(np.asarray(digits.images, dtype=np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    x = x.expand(-1, channels, -1, -1).contiguous()  # (1797, channels, 32, 32)
    y = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_valid = round(DIGITS_VALID_FRACTION * len(y))
    names = tuple(str(i) for i in range(10))
    valid, train = order[:n_valid], order[n_valid:]
    if not test_split:
        return ImageData(x[train], y[train], x[valid], y[valid], names, "digits")
    # The test images come from the front of the two-way split's train part, so train + test
    # here is exactly the two-way split's train set.
    n_test = round(DIGITS_TEST_FRACTION * len(y))
    test, train = train[:n_test], train[n_test:]
    return ImageData(x[train], y[train], x[valid], y[valid], names, "digits",
                     test_x=x[test], test_y=y[test])
