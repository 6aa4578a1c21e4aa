"""Datasets used by the paper's protocol, loaded offline and checksum-verified.

``load(name, split)`` returns ``(X, y)`` as torch tensors: ``X`` float32 in
[0, 1] shaped ``(N, 1, H, W)``, ``y`` int64 shaped ``(N,)``.

Datasets
--------
``"mnist"``
    The original MNIST IDX files bundled under ``data/mnist/``.
``"fashion-mnist"``
    Read from ``<root>/fashion-mnist/`` if it is there, else from
    ``/usr/share/datasets/fashion-mnist/`` (Debian package
    ``dataset-fashion-mnist``).
``"digits"``
    scikit-learn's bundled ``load_digits`` (1797 images of 8x8, values 0..16,
    scaled to [0, 1] by dividing by 16). No file needed.

Splits (the paper's protocol: split in order, no shuffling)
-----------------------------------------------------------
MNIST and Fashion-MNIST: ``"train"`` is the first 80% of the official
training set (48000 images), ``"val"`` the remaining 20% (12000), ``"test"``
the official test set (10000).

Digits has no official split. We apply the same in-order 80/20 rule twice:
the first ``floor(0.8 * 1797) = 1437`` images play the role of the official
training set (``"train"``: its first ``floor(0.8 * 1437) = 1149``, ``"val"``:
the other 288) and the last 360 images are ``"test"``.

Pixels are divided by 255 exactly once (``pixel_scale="1/255"``, the
default). The paper's reference code divides by 255 twice, which shrinks
inputs to [0, 1/255]; ``pixel_scale="1/255^2"`` reproduces that bug, to
measure whether it matters (for digits it divides the [0, 1] values by 255
once more).

Data root
---------
``root=`` if given, else the environment variable ``TOPONEURO_DATA`` if set,
else the repository's ``data/`` folder next to the package.

Every file is checked against the ``SHA256SUMS`` file of its folder (or,
where a folder has none, e.g. the Debian install, against the checksums
recorded in this module) the first time it is read in a process; the parsed
arrays are cached in memory, so ``train``, ``val`` and ``test`` of the same
dataset parse each file once.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "SPLITS",
    "load",
    "num_classes",
    "input_shape",
    "data_root",
    "PIXEL_SCALES",
]

DATASETS = ("mnist", "fashion-mnist", "digits")
SPLITS = ("train", "val", "test")
#: ``"1/255"``: inputs in [0, 1]; ``"1/255^2"``: the reference code's double division, inputs in [0, 1/255]
PIXEL_SCALES = ("1/255", "1/255^2")

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# Checksums of the files as committed under data/ (copies of their SHA256SUMS),
# used only for a folder that has no SHA256SUMS of its own.
_KNOWN_SHA256 = {
    "mnist": {
        "t10k-images-idx3-ubyte.gz": "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
        "t10k-labels-idx1-ubyte.gz": "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
        "train-images-idx3-ubyte.gz": "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
        "train-labels-idx1-ubyte.gz": "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    },
    "fashion-mnist": {
        "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    },
}

_HOW_TO_GET = {
    "mnist": (
        "restore the bundled copy with `git checkout -- data/mnist`, or copy the original "
        "MNIST IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) with their SHA256SUMS "
        "into that folder"
    ),
    "fashion-mnist": (
        "install the Debian package with `apt-get install dataset-fashion-mnist` "
        f"(it provides {DEBIAN_FASHION_MNIST}/), or copy the Fashion-MNIST IDX files "
        "(https://github.com/zalandoresearch/fashion-mnist) with their SHA256SUMS into "
        "<data root>/fashion-mnist/"
    ),
}

_SHAPES = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "digits": (1, 8, 8)}
_NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10, "digits": 10}


def _check_name(name) -> str:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names are {', '.join(DATASETS)}")
    return name


def _check_split(split) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(SPLITS)}")
    return split


def num_classes(name: str) -> int:
    """Number of classes of dataset ``name`` (10 for all of them)."""
    return _NUM_CLASSES[_check_name(name)]


def input_shape(name: str) -> tuple[int, int, int]:
    """Shape ``(C, H, W)`` of one input of dataset ``name``."""
    return _SHAPES[_check_name(name)]


def data_root(root=None) -> Path:
    """The data folder: ``root``, else ``$TOPONEURO_DATA``, else the repository's ``data/``."""
    if root is None:
        env = os.environ.get("TOPONEURO_DATA")
        if env:
            return Path(env).expanduser()
        return Path(__file__).resolve().parent.parent / "data"
    if not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"root must be a path (str or os.PathLike), got {type(root).__name__}")
    return Path(root).expanduser()


def _dataset_dir(name: str, root: Path) -> Path:
    """The folder holding dataset ``name``'s IDX files."""
    own = root / name
    if name != "fashion-mnist":
        return own
    candidates = [own, DEBIAN_FASHION_MNIST]
    for folder in candidates:
        if all((folder / f).is_file() for f in _FILES.values()):
            return folder
    for folder in candidates:
        if folder.is_dir():
            return folder  # incomplete: the missing file is reported by _read_checked
    raise ValueError(
        f"Fashion-MNIST not found: neither {own} nor {DEBIAN_FASHION_MNIST} exists; "
        + _HOW_TO_GET[name]
    )


def _expected_sha256(name: str, folder: Path, filename: str) -> str:
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return _KNOWN_SHA256[name][filename]
    table = {}
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            table[parts[1].lstrip("*")] = parts[0].lower()
    if filename not in table:
        raise ValueError(f"{sums} has no checksum for {filename}; " + _HOW_TO_GET[name])
    return table[filename]


@functools.lru_cache(maxsize=32)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the cache key so that a file replaced on disk
    # is hashed again; otherwise each file is hashed once per process.
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_IDX_DTYPES = {0x08: np.uint8}


@functools.lru_cache(maxsize=16)
def _parse_idx(path: str, size: int, mtime_ns: int, ndim: int) -> np.ndarray:
    """Parse a gzipped IDX file into a read-only array of ``ndim`` dimensions."""
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as err:  # truncated, or not gzip at all
        raise ValueError(f"{path} is not a complete gzip file ({type(err).__name__}: {err}); "
                         "download it again, and its SHA256SUMS from the same source") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] != ndim:
        raise ValueError(
            f"{path} is not an IDX file of {ndim} dimension(s) of unsigned bytes "
            f"(magic number {raw[:4].hex() if len(raw) >= 4 else 'missing'}, "
            f"expected 0000080{ndim})"
        )
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    if len(raw) - header != int(np.prod(dims)):
        raise ValueError(
            f"{path}: header says shape {dims} ({int(np.prod(dims))} bytes) but the file "
            f"holds {len(raw) - header} bytes of data"
        )
    arr = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=header).reshape(dims)
    arr.flags.writeable = False
    return arr


def _read_checked(name: str, folder: Path, filename: str, ndim: int) -> np.ndarray:
    path = folder / filename
    if not path.is_file():
        raise ValueError(f"missing data file {path}; " + _HOW_TO_GET[name])
    expected = _expected_sha256(name, folder, filename)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    actual = _sha256_of(*key)
    if actual != expected:
        raise ValueError(
            f"checksum mismatch for {path}: SHA256 {actual}, expected {expected}; "
            "the file is corrupt or a different version; " + _HOW_TO_GET[name]
        )
    return _parse_idx(*key, ndim)


def _idx_arrays(name: str, part: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, H, W)`` uint8 and labels ``(N,)`` uint8 of ``part`` ("train"/"test")."""
    folder = _dataset_dir(name, root)
    images = _read_checked(name, folder, _FILES[f"{part}_images"], ndim=3)
    labels = _read_checked(name, folder, _FILES[f"{part}_labels"], ndim=1)
    if len(images) != len(labels):
        raise ValueError(
            f"{folder}: {len(images)} {part} images but {len(labels)} labels; "
            + _HOW_TO_GET[name]
        )
    if len(labels) and int(labels.max()) >= 10:
        raise ValueError(
            f"{folder / _FILES[f'{part}_labels']}: label {int(labels.max())} where classes are 0..9; "
            + _HOW_TO_GET[name]
        )
    return images, labels


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _first_80(n: int) -> int:
    return (4 * n) // 5


def load(name: str, split: str, root=None, pixel_scale: str = "1/255") -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of a dataset.

    Parameters
    ----------
    name : {"mnist", "fashion-mnist", "digits"}
    split : {"train", "val", "test"}
        ``train``: first 80% of the official training set, ``val``: the rest,
        ``test``: the official test set (see the module docstring for digits).
    root : path, optional
        Data folder; defaults to ``$TOPONEURO_DATA`` or the repository's ``data/``.
    pixel_scale : {"1/255", "1/255^2"}
        ``"1/255^2"`` divides by 255 once more (the reference code's bug).

    Returns
    -------
    X : (N, 1, H, W) float32 tensor, values in [0, 1] (in [0, 1/255] with ``"1/255^2"``)
    y : (N,) int64 tensor, class labels 0..9

    Raises
    ------
    ValueError
        Unknown name or split; a missing, corrupt or malformed data file
        (the message names the file and how to get it).
    """
    _check_name(name)
    _check_split(split)
    if pixel_scale not in PIXEL_SCALES:
        raise ValueError(f"unknown pixel_scale {pixel_scale!r}; choose from {', '.join(PIXEL_SCALES)}")
    if name == "digits":
        images, labels = _digits_arrays()
        n_pool = _first_80(len(images))  # 1437 images stand in for the official training set
        test = slice(n_pool, len(images))  # the last 360
        scale = None  # already in [0, 1]
    else:
        part = "test" if split == "test" else "train"
        images, labels = _idx_arrays(name, part, data_root(root))
        n_pool = len(images)
        test = slice(0, len(images))
        scale = np.float32(255.0)
    n_train = _first_80(n_pool)
    rows = {"train": slice(0, n_train), "val": slice(n_train, n_pool), "test": test}[split]

    X = images[rows].astype(np.float32)  # a fresh copy: the cache stays untouched
    if scale is not None:
        X /= scale
    if pixel_scale == "1/255^2":
        X /= np.float32(255.0)  # the second division of the reference code
    X = X[:, None, :, :]
    y = labels[rows].astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(X)), torch.from_numpy(y)
