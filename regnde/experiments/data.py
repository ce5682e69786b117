"""Data for the experiments: loaders for user-supplied files and the data that ships offline.

Real data sets cannot be downloaded by regnde; point ``--data`` at files you have:

- **MNIST** (``digits-node --data DIR``): the four standard IDX files
  ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``), in ``DIR`` or ``DIR/raw``
  or ``DIR/MNIST/raw`` (torchvision's layout).
- **PhysioNet 2012** (``latent-ode --data PATH``): the preprocessed files of Rubanova et al.'s
  ``latent_ode`` code (also used by TayNODE), ``PATH/processed/set-a_<q>.pt`` (and
  optionally ``set-b_<q>.pt``), or one such ``.pt`` file. Each is a ``torch.save``'d list of
  records ``(record_id, tt, vals, mask, labels)`` with ``tt`` of shape ``(T,)`` in hours,
  ``vals`` and ``mask`` of shape ``(T, 41)``; read with ``weights_only=True``.
- **MINIBOONE** (``cnf-2d --data PATH``): the MAF/FFJORD preprocessed ``data.npy`` (shape
  ``(N, 43)``, float), ``PATH/miniboone/data.npy``, ``PATH/data.npy`` or the file itself; split
  and normalised as the references do (last 10% test, last 10% of the rest validation,
  normalised with the mean and std of train+validation).

Every loader checks the format and raises :class:`DataError` naming the expected files.
"""

from __future__ import annotations

import functools
import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
PHYSIONET_PARAMS = 41
MINIBOONE_DIM = 43


class DataError(ValueError):
    """A data path is missing or its files are not in the expected format."""


# -- MNIST ------------------------------------------------------------------------------------
IDX_TYPES: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4",
                             0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (gzipped or not) as an array; raises :class:`DataError` on a bad header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read an IDX file ({exc}).") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES or raw[3] < 1:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()}).")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header.")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(IDX_TYPES[raw[2]])
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)) * dtype.itemsize:
        raise DataError(f"{path}: IDX header says shape {shape} but the file holds "
                        f"{len(body)} bytes of data.")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _find_mnist(root: Path) -> dict[str, Path]:
    for base in (root, root / "raw", root / "MNIST" / "raw"):
        found = {}
        for name in MNIST_FILES:
            for candidate in (base / name, base / f"{name}.gz"):
                if candidate.is_file():
                    found[name] = candidate
                    break
        if len(found) == len(MNIST_FILES):
            return found
    raise DataError(
        f"no MNIST IDX files under {root}: expected {', '.join(MNIST_FILES)} (each optionally "
        f".gz) in that directory, its raw/ or MNIST/raw/ subdirectory."
    )


def load_mnist(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST from IDX files: ``{"train": (x, y), "test": (x, y)}``.

    ``x`` is ``(N, rows * cols)`` float32 in ``[0, 1]``, ``y`` ``(N,)`` int64.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"MNIST path {root} is not a directory; it should hold "
                        f"{', '.join(MNIST_FILES)} (each optionally .gz).")
    files = _find_mnist(root)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(files[f"{prefix}-images-idx3-ubyte"])
        labels = read_idx(files[f"{prefix}-labels-idx1-ubyte"])
        if images.ndim != 3 or labels.ndim != 1 or images.dtype != np.uint8:
            raise DataError(f"MNIST {split}: expected uint8 images (N, rows, cols) and labels "
                            f"(N,), got {images.shape} {images.dtype} and {labels.shape}.")
        if len(images) != len(labels):
            raise DataError(f"MNIST {split}: {len(images)} images but {len(labels)} labels.")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise DataError(f"MNIST {split}: labels outside 0..9.")
        x = images.reshape(len(images), -1).astype(np.float32) / 255.0
        out[split] = (x, labels.astype(np.int64))
    return out


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file, gzipped when ``path`` ends in ``.gz``."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if Path(path).suffix == ".gz" else open
    with opener(path, "wb") as fh:
        fh.write(header + array.tobytes())


# -- PhysioNet --------------------------------------------------------------------------------
@dataclass
class Records:
    """Irregularly sampled multivariate series in the references' record format.

    Attributes:
        items: list of ``(record_id, tt (T,), vals (T, D), mask (T, D))`` numpy arrays, ``tt``
            increasing, ``mask`` 1 where a value was observed.
    """

    items: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]

    @property
    def dim(self) -> int:
        return int(self.items[0][2].shape[1])


def _physionet_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    for base in (root / "processed", root / "PhysioNet" / "processed", root):
        files = sorted(base.glob("set-[ab]_*.pt")) if base.is_dir() else []
        if files:
            return files
    raise DataError(
        f"no preprocessed PhysioNet files under {root}: expected processed/set-a_<q>.pt "
        f"(and optionally set-b_<q>.pt) as written by the latent_ode code of Rubanova et al., "
        f"or the path of one such .pt file."
    )


def load_physionet(path: str | Path) -> Records:
    """The preprocessed PhysioNet 2012 records, values rescaled to ``[0, 1]`` per feature
    (min/max over observed values, as the references do) and times to ``[0, 1]``."""
    import torch

    root = Path(path)
    if not root.exists():
        raise DataError(f"PhysioNet path {root} does not exist; expected a directory with "
                        f"processed/set-a_<q>.pt or one such file.")
    items: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    for file in _physionet_files(root):
        try:
            records = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DataError(f"{file} is not a preprocessed PhysioNet file readable with "
                            f"torch.load(weights_only=True): {type(exc).__name__}.") from None
        if not isinstance(records, (list, tuple)) or not records:
            raise DataError(f"{file}: expected a non-empty list of records "
                            f"(record_id, tt, vals, mask, labels).")
        for i, rec in enumerate(records):
            items.append(_check_record(file, i, rec))
    return _normalise(Records(items))


def _check_record(file: Path, i: int, rec: Any) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    import torch

    bad = f"{file}: record {i} is not (record_id, tt (T,), vals (T, D), mask (T, D), labels)"
    if not isinstance(rec, (list, tuple)) or len(rec) < 4:
        raise DataError(bad + ".")
    rid, tt, vals, mask = rec[:4]
    if not all(isinstance(x, torch.Tensor) for x in (tt, vals, mask)):
        raise DataError(bad + ": tt, vals and mask must be tensors.")
    tt, vals, mask = (x.detach().double().numpy() for x in (tt, vals, mask))
    if tt.ndim != 1 or vals.ndim != 2 or mask.shape != vals.shape or len(tt) != len(vals):
        raise DataError(f"{bad}: got shapes {tt.shape}, {vals.shape}, {mask.shape}.")
    if len(tt) == 0 or np.any(np.diff(tt) <= 0):
        raise DataError(f"{bad}: tt must be non-empty and strictly increasing.")
    return str(rid), tt, vals, mask


def _normalise(records: Records) -> Records:
    dims = {v.shape[1] for _, _, v, _ in records.items}
    if len(dims) != 1:
        raise DataError(f"PhysioNet records have different numbers of features: {sorted(dims)}.")
    d = dims.pop()
    lo, hi = np.full(d, np.inf), np.full(d, -np.inf)
    t_max = 0.0
    for _, tt, v, m in records.items:
        obs = np.where(m > 0, v, np.nan)
        with np.errstate(all="ignore"):
            lo = np.fmin(lo, np.nanmin(obs, axis=0, initial=np.inf))
            hi = np.fmax(hi, np.nanmax(obs, axis=0, initial=-np.inf))
        t_max = max(t_max, float(tt[-1]))
    lo = np.where(np.isfinite(lo), lo, 0.0)
    scale = np.where(np.isfinite(hi) & (hi > lo), hi - lo, 1.0)
    t_max = t_max if t_max > 0 else 1.0
    items = [(rid, tt / t_max, np.where(m > 0, (v - lo) / scale, 0.0), m)
             for rid, tt, v, m in records.items]
    return Records(items)


# -- MINIBOONE --------------------------------------------------------------------------------
def _miniboone_file(root: Path) -> Path:
    if root.is_file():
        return root
    for candidate in (root / "miniboone" / "data.npy", root / "data.npy"):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"no MINIBOONE data under {root}: expected the preprocessed data.npy of MAF/FFJORD "
        f"(shape (N, {MINIBOONE_DIM})) at {root}/miniboone/data.npy, {root}/data.npy, or the "
        f"path of the .npy file itself."
    )


def load_miniboone(path: str | Path) -> dict[str, np.ndarray]:
    """MINIBOONE as the references split and normalise it: ``{"train", "val", "test"}``
    arrays of shape ``(n, 43)`` float32."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"MINIBOONE path {root} does not exist; expected data.npy of shape "
                        f"(N, {MINIBOONE_DIM}) or a directory holding it.")
    file = _miniboone_file(root)
    try:
        data = np.load(file, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{file} is not a .npy array file ({type(exc).__name__}: {exc}).") \
            from None
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != MINIBOONE_DIM \
            or not np.issubdtype(data.dtype, np.floating):
        raise DataError(f"{file}: expected a float array of shape (N, {MINIBOONE_DIM}), got "
                        f"{getattr(data, 'shape', None)} {getattr(data, 'dtype', None)}.")
    n_test = int(0.1 * data.shape[0])
    test, rest = data[data.shape[0] - n_test:], data[:data.shape[0] - n_test]
    n_val = int(0.1 * rest.shape[0])
    val, train = rest[rest.shape[0] - n_val:], rest[:rest.shape[0] - n_val]
    if min(len(train), len(val), len(test)) < 1:
        raise DataError(f"{file}: {data.shape[0]} rows are too few to split.")
    both = np.vstack([train, val])
    mu, sd = both.mean(axis=0), both.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    return {k: ((v - mu) / sd).astype(np.float32)
            for k, v in (("train", train), ("val", val), ("test", test))}


# -- data that ships offline ------------------------------------------------------------------
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: ``x`` ``(1797, 64)`` float32 in ``[0, 1]``, ``y`` int64."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


def toy_2d(name: str, n: int, seed: int) -> np.ndarray:
    """``n`` points of scikit-learn's ``moons`` or ``circles``, standardised, float32."""
    from sklearn.datasets import make_circles, make_moons

    if name == "moons":
        x, _ = make_moons(n, noise=0.05, random_state=seed)
    elif name == "circles":
        x, _ = make_circles(n, noise=0.04, factor=0.5, random_state=seed)
    else:
        raise DataError(f"unknown 2-D data set {name!r}; valid: circles, moons.")
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    return x.astype(np.float32)


def irregular_series(n: int, n_points: int, dim: int, seed: int, horizon: float = 4.0,
                     freq: tuple[float, float] = (0.5, 1.0), missing: float = 0.3,
                     decay: float = 0.0, noise: float = 0.0) -> Records:
    """Synthetic irregular series: one oscillator per series, seen by every feature.

    Each series has a random frequency (uniform in ``freq``, in half cycles per unit time),
    amplitude (uniform in ``[0.5, 1]``), phase and decay rate (uniform in ``[0, decay]`` per
    ``horizon``); feature ``d`` reads the oscillator with a fixed phase offset ``2 pi d / dim``,
    so all features of a series are linear in one two-dimensional rotation and a model must infer
    the frequency, amplitude and phase from the observations. The series are observed at
    ``n_points`` random times of a grid of 100 in ``(0, horizon]`` with features missing at
    random (fraction ``missing``; every time keeps at least one). Noiseless values lie in
    ``[0, 1]``, like normalised PhysioNet; ``noise`` adds independent Gaussian noise of that
    standard deviation to every observed value (unclipped), drawn from a generator of its own so
    that the noiseless part of the series does not depend on ``noise``.

    The defaults (one to two undamped periods over a horizon of 4) are what ``latent-ode``
    learns in a few hundred iterations with its NFE growing; the former series (each feature
    its own frequency of 2-6 half cycles and decay, over a horizon of 1) were fitted by the
    mean only.
    """
    rng = np.random.default_rng(seed)
    noise_rng = np.random.default_rng((seed, 1))
    offsets = 2 * np.pi * np.arange(dim) / dim
    items = []
    for i in range(n):
        tt = np.sort(rng.choice(np.arange(1, 101), size=n_points, replace=False)) / 100.0
        tt = tt * horizon
        f = rng.uniform(*freq)
        amp = rng.uniform(0.5, 1.0)
        phase = rng.uniform(0, 2 * np.pi)
        rate = rng.uniform(0.0, decay) / horizon
        vals = 0.5 + 0.45 * amp * np.exp(-rate * tt[:, None]) * np.sin(
            f * np.pi * tt[:, None] + phase + offsets)
        vals = vals + noise * noise_rng.standard_normal(vals.shape)
        mask = (rng.uniform(size=vals.shape) >= missing).astype(np.float64)
        mask[np.arange(n_points), rng.integers(0, dim, n_points)] = 1.0
        items.append((f"synthetic-{i}", tt, vals * mask, mask))
    return Records(items)


@functools.cache
def _mnist1d() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST-1D (Greydanus 2020), its standard split generated offline by the ``mnist1d``
    package from the templates it ships (never its download path): ``train`` 4000 and ``test``
    1000 sequences, ``x`` float32 ``(N, 40)``, ``y`` int64 ``(N,)``."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise ModuleNotFoundError(
            "MNIST-1D needs the mnist1d package: pip install 'regnde[experiments]'",
            name="mnist1d") from None
    d = make_dataset(get_dataset_args())  # about 2 s: made once per process
    return {"train": (d["x"].astype(np.float32), d["y"].astype(np.int64)),
            "test": (d["x_test"].astype(np.float32), d["y_test"].astype(np.int64))}


def mnist1d() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST-1D's standard split (see :func:`_mnist1d`), fresh copies."""
    return {k: (x.copy(), y.copy()) for k, (x, y) in _mnist1d().items()}
