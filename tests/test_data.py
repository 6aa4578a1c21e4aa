"""toponeuro.data: splits, label counts, scaling, checksums, error messages.

References: the published MNIST / Fashion-MNIST label counts, an
independent IDX read (gzip + numpy offset) for the order and the /255
scaling, scikit-learn's load_digits for digits.
"""

import gzip
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from toponeuro import data

REPO_DATA = Path(__file__).resolve().parent.parent / "data"

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


def _raw_idx(path, header):
    """Independent IDX read: skip the header, keep the bytes."""
    with gzip.open(path, "rb") as fh:
        return np.frombuffer(fh.read()[header:], dtype=np.uint8)


def _link_dataset(src: Path, dst: Path, skip=(), with_sums=True):
    """Make ``dst`` a copy of dataset folder ``src`` made of symlinks (cheap)."""
    dst.mkdir(parents=True)
    for name in FILES:
        if name not in skip:
            (dst / name).symlink_to(src / name)
    if with_sums:
        shutil.copy(src / "SHA256SUMS", dst / "SHA256SUMS")


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_split_sizes_shapes_dtypes_range(name):
    sizes = {}
    for split in data.SPLITS:
        X, y = data.load(name, split)
        assert X.dtype == torch.float32 and y.dtype == torch.int64
        assert X.shape == (len(y), 1, 28, 28)
        assert float(X.min()) == 0.0 and float(X.max()) == 1.0
        assert int(y.min()) == 0 and int(y.max()) == 9
        sizes[split] = len(y)
    assert sizes == {"train": 48000, "val": 12000, "test": 10000}
    assert data.input_shape(name) == (1, 28, 28)
    assert data.num_classes(name) == 10


def test_mnist_label_counts():
    _, y_train = data.load("mnist", "train")
    _, y_val = data.load("mnist", "val")
    _, y_test = data.load("mnist", "test")
    full_train = torch.cat([y_train, y_val])
    assert torch.bincount(full_train, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(y_test, minlength=10).tolist() == MNIST_TEST_COUNTS


def test_fashion_mnist_label_counts():
    _, y_train = data.load("fashion-mnist", "train")
    _, y_val = data.load("fashion-mnist", "val")
    _, y_test = data.load("fashion-mnist", "test")
    assert torch.bincount(torch.cat([y_train, y_val]), minlength=10).tolist() == [6000] * 10
    assert torch.bincount(y_test, minlength=10).tolist() == [1000] * 10


def test_mnist_split_is_in_order_and_scaled_once():
    images = _raw_idx(REPO_DATA / "mnist" / "train-images-idx3-ubyte.gz", 16).reshape(60000, 784)
    labels = _raw_idx(REPO_DATA / "mnist" / "train-labels-idx1-ubyte.gz", 8)
    X_train, y_train = data.load("mnist", "train")
    X_val, y_val = data.load("mnist", "val")
    # dividing by 255 once: multiplying back gives the raw bytes exactly
    np.testing.assert_array_equal(
        np.rint(X_train.reshape(48000, 784).numpy() * 255).astype(np.uint8), images[:48000]
    )
    np.testing.assert_array_equal(
        np.rint(X_val.reshape(12000, 784).numpy() * 255).astype(np.uint8), images[48000:]
    )
    np.testing.assert_array_equal(y_train.numpy(), labels[:48000])
    np.testing.assert_array_equal(y_val.numpy(), labels[48000:])


def test_returned_arrays_do_not_alias_the_cache():
    X, y = data.load("mnist", "test")
    X.fill_(7.0)
    y.fill_(3)
    X2, y2 = data.load("mnist", "test")
    assert float(X2.max()) == 1.0
    assert torch.bincount(y2, minlength=10).tolist() == MNIST_TEST_COUNTS


def test_digits_split_matches_sklearn():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16
    parts = {"train": slice(0, 1149), "val": slice(1149, 1437), "test": slice(1437, 1797)}
    for split, rows in parts.items():
        X, y = data.load("digits", split)
        assert X.dtype == torch.float32 and y.dtype == torch.int64
        assert X.shape == (rows.stop - rows.start, 1, 8, 8)
        np.testing.assert_allclose(X[:, 0].numpy(), images[rows])
        np.testing.assert_array_equal(y.numpy(), bunch.target[rows])
    assert data.input_shape("digits") == (1, 8, 8)


def test_corrupt_file_is_a_value_error_naming_it(tmp_path):
    src = REPO_DATA / "mnist"
    name = "train-labels-idx1-ubyte.gz"
    _link_dataset(src, tmp_path / "mnist", skip=(name,))
    with gzip.open(src / name, "rb") as fh:
        raw = bytearray(fh.read())
    raw[8] = (raw[8] + 1) % 10  # a valid IDX file with one label changed
    with gzip.open(tmp_path / "mnist" / name, "wb") as fh:
        fh.write(bytes(raw))
    with pytest.raises(ValueError, match=r"checksum mismatch.*train-labels-idx1-ubyte\.gz"):
        data.load("mnist", "train", root=tmp_path)
    # the test split does not use that file and still loads
    _, y = data.load("mnist", "test", root=tmp_path)
    assert torch.bincount(y, minlength=10).tolist() == MNIST_TEST_COUNTS


def test_missing_file_is_a_clear_error(tmp_path):
    name = "t10k-images-idx3-ubyte.gz"
    _link_dataset(REPO_DATA / "mnist", tmp_path / "mnist", skip=(name,))
    with pytest.raises(ValueError, match=r"missing data file .*t10k-images-idx3-ubyte\.gz.*git checkout"):
        data.load("mnist", "test", root=tmp_path)


def test_malformed_idx_with_matching_checksum(tmp_path):
    folder = tmp_path / "mnist"
    _link_dataset(REPO_DATA / "mnist", folder, skip=("t10k-labels-idx1-ubyte.gz",), with_sums=False)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(b"\x00\x00\x08\x03" + b"\x00" * 20)  # magic says 3 dims, labels need 1
    import hashlib

    sums = (REPO_DATA / "mnist" / "SHA256SUMS").read_text().splitlines()
    digest = hashlib.sha256((folder / "t10k-labels-idx1-ubyte.gz").read_bytes()).hexdigest()
    sums = [f"{digest}  t10k-labels-idx1-ubyte.gz" if "t10k-labels" in s else s for s in sums]
    (folder / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz is not an IDX file"):
        data.load("mnist", "test", root=tmp_path)


def _with_labels_file(tmp_path, payload: bytes):
    """An MNIST folder whose test labels file is ``payload``, with a SHA256SUMS made from it."""
    import hashlib

    folder = tmp_path / "mnist"
    _link_dataset(REPO_DATA / "mnist", folder, skip=("t10k-labels-idx1-ubyte.gz",), with_sums=False)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    sums = (REPO_DATA / "mnist" / "SHA256SUMS").read_text().splitlines()
    sums = [f"{digest}  t10k-labels-idx1-ubyte.gz" if "t10k-labels" in s else s for s in sums]
    (folder / "SHA256SUMS").write_text("\n".join(sums) + "\n")


@pytest.mark.parametrize("payload", [
    (REPO_DATA / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes()[:-100],  # truncated download
    b"<html>not found</html>",                                                # not gzip at all
])
def test_a_broken_gzip_with_matching_checksum_is_a_value_error(tmp_path, payload):
    _with_labels_file(tmp_path, payload)
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz is not a complete gzip file"):
        data.load("mnist", "test", root=tmp_path)


def test_labels_outside_0_to_9_are_refused(tmp_path):
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as fh:
        fh.write(b"\x00\x00\x08\x01" + (10000).to_bytes(4, "big") + bytes([3] * 9999 + [200]))
    _with_labels_file(tmp_path, buf.getvalue())
    with pytest.raises(ValueError, match="label 200 where classes are 0..9"):
        data.load("mnist", "test", root=tmp_path)


def test_env_var_sets_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPONEURO_DATA", str(tmp_path))
    with pytest.raises(ValueError, match=str(tmp_path)):
        data.load("mnist", "test")
    _link_dataset(REPO_DATA / "mnist", tmp_path / "mnist")
    X, _ = data.load("mnist", "test")
    assert X.shape == (10000, 1, 28, 28)
    # an explicit root wins over the environment variable
    X, _ = data.load("mnist", "val", root=REPO_DATA)
    assert X.shape == (12000, 1, 28, 28)


def test_fashion_mnist_falls_back_to_debian_folder(tmp_path, monkeypatch):
    debian = tmp_path / "usr-share" / "fashion-mnist"
    # the Debian package ships no SHA256SUMS: the built-in checksums apply
    _link_dataset(REPO_DATA / "fashion-mnist", debian, with_sums=False)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", debian)
    empty_root = tmp_path / "empty"
    empty_root.mkdir()
    _, y = data.load("fashion-mnist", "test", root=empty_root)
    assert torch.bincount(y, minlength=10).tolist() == [1000] * 10

    # neither place exists: the error names both and the Debian package
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"apt-get install dataset-fashion-mnist"):
        data.load("fashion-mnist", "train", root=empty_root)


def test_unknown_name_or_split_lists_valid_ones():
    with pytest.raises(ValueError, match=r"mnist, fashion-mnist, digits"):
        data.load("cifar10", "train")
    with pytest.raises(ValueError, match=r"train, val, test"):
        data.load("mnist", "validation")
    with pytest.raises(ValueError, match=r"valid names"):
        data.input_shape("svhn")
    with pytest.raises(ValueError, match=r"root must be a path"):
        data.load("mnist", "test", root=3)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_builtin_checksums_match_the_bundled_sha256sums(name):
    # the fallback table (for folders without SHA256SUMS) must agree with the bundled files
    folder = REPO_DATA / name
    table = {f: data._expected_sha256(name, folder, f) for f in FILES}
    assert table == data._KNOWN_SHA256[name]
    import hashlib

    for f in FILES:
        assert hashlib.sha256((folder / f).read_bytes()).hexdigest() == table[f]
