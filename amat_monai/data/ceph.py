"""ISBI 2015 cephalometric landmarks: data lists for MONAI datasets, and a synthetic stand-in.

Folder layout (the shared copy's, see its README; any folder laid out the same way works)::

    images/NNN.png                 8-bit grayscale radiographs (stored at a reduced size)
    landmarks_senior.csv           image,x1,y1,...,xK,yK   in ORIGINAL pixel units (x right, y down)
    landmarks_junior.csv           the second doctor (optional; the ground truth is the mean of those present)
    train.txt, test1.txt, ...      one image id per line (the official splits)
    meta.json                      optional: {"original_size": [H, W], "spacing_mm": 0.1}

Without ``meta.json`` the original grid is the challenge's 2400×1935 (H×W) pixels of 0.1 mm.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from amat_monai.checkpoints import read_json
from amat_monai.data.labelled import check_labelled_fraction, select_pool
from amat_monai.data.root import data_root

__all__ = [
    "CEPH_ORIGINAL_SIZE",
    "CEPH_SPACING_MM",
    "CEPH_NUM_LANDMARKS",
    "default_ceph_dir",
    "read_landmarks_csv",
    "read_split",
    "ceph_datalist",
    "make_synthetic_ceph",
]

#: Original grid of the ISBI 2015 images, (H, W) pixels, and its pixel size.
CEPH_ORIGINAL_SIZE = (2400, 1935)
CEPH_SPACING_MM = 0.1
CEPH_NUM_LANDMARKS = 19
ANNOTATORS = ("senior", "junior")


def default_ceph_dir() -> str:
    """``$AMAT_DATA_DIR/isbi2015_ceph``; ``AMAT_DATA_DIR`` defaults to ``../shared/data`` next to the project."""
    return str(data_root() / "isbi2015_ceph")


def read_landmarks_csv(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{image id: [K, 2] (x, y)}`` from a ``image,x1,y1,...`` CSV file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"landmark file not found: {path}")
    out: dict[str, np.ndarray] = {}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][0].strip().lower() != "image":
        raise ValueError(f"{path}: expected a header 'image,x1,y1,...', got {rows[0] if rows else 'an empty file'}")
    width = len(rows[0])
    if width < 3 or (width - 1) % 2:
        raise ValueError(f"{path}: the header must list x/y pairs, got {width - 1} coordinate columns")
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != width:
            raise ValueError(f"{path}, line {line}: expected {width} columns, got {len(row)}")
        try:
            values = np.asarray([float(v) for v in row[1:]], dtype=np.float64)
        except ValueError:
            raise ValueError(f"{path}, line {line}: coordinates must be numbers") from None
        out[row[0].strip()] = values.reshape(-1, 2)
    return out


_SLICE = re.compile(r"^(?P<name>.+)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


def read_split(root: str | os.PathLike, split: str | Sequence[str], split_file: str | os.PathLike | None = None) -> list[str]:
    """Image ids of a split.

    Args:
        root: the data folder.
        split: a split name (``"train"``, ``"test1"``: read from ``root/<name>.txt`` or from ``split_file``), the
            path of a text file with one id per line, or a list of ids. A name may end with a Python slice of
            the list, ``"test1[:50]"`` / ``"test1[50:]"``: the bundle validates on the first 50 images of the
            challenge's test1 set and tests on the other 100, so that no model is chosen on its test images.
        split_file: optional JSON file ``{"train": [ids], "test1": [ids], ...}`` overriding the text files.
    """
    if not isinstance(split, str):
        return [str(i) for i in split]
    sliced = _SLICE.match(split)
    if sliced:
        start, stop = (int(v) if v else None for v in (sliced["start"], sliced["stop"]))
        ids = read_split(root, sliced["name"], split_file)[start:stop]
        if not ids:
            raise ValueError(f"split {split!r} selects no image of {sliced['name']!r}")
        return ids
    if split_file:
        path = Path(split_file)
        splits = read_json(path, "split file")
        if not isinstance(splits, dict):
            raise ValueError(f"{path}: a split file maps split names to lists of image ids")
        if split not in splits:
            raise ValueError(f"{path}: no split {split!r} (has {sorted(splits)})")
        return [str(i) for i in splits[split]]
    path = Path(split) if split.endswith(".txt") or os.sep in split else Path(root) / f"{split}.txt"
    if not path.is_file():
        lists = sorted(f.stem for f in Path(root).glob("*.txt"))
        raise FileNotFoundError(f"split list not found: {path} (the lists of {root} are {lists}; a list is a text "
                                "file with one image id per line)")
    ids = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [i for i in ids if i]


def _meta(root: Path) -> tuple[list[int], float]:
    path = root / "meta.json"
    if not path.is_file():
        return list(CEPH_ORIGINAL_SIZE), CEPH_SPACING_MM
    meta = read_json(path)
    size = [int(v) for v in meta.get("original_size", CEPH_ORIGINAL_SIZE)]
    if len(size) != 2:
        raise ValueError(f"{path}: original_size must be [H, W], got {size}")
    return size, float(meta.get("spacing_mm", CEPH_SPACING_MM))


def ceph_datalist(
    root: str | os.PathLike,
    split: str | Sequence[str] = "train",
    max_cases: int | None = None,
    split_file: str | os.PathLike | None = None,
    annotators: Sequence[str] = ANNOTATORS,
    pool: str = "labelled",
    labelled_fraction: float | None = None,
    labelled_seed: int = 0,
) -> list[dict]:
    """Items for a MONAI dataset, one per image of the split, in the split's order.

    Each item: ``image`` (PNG path), ``landmarks`` (``[K, 2]`` float32, the mean of the annotators present, in
    original pixel units), ``sample_id`` (the image id), ``original_size`` (``[H, W]`` of the original grid) and
    ``spacing`` (mm per original pixel).

    With ``labelled_fraction`` below 1 the split's images are divided, seeded by ``labelled_seed``
    (:func:`amat_monai.data.labelled.split_labelled`), into a labelled pool and an unlabelled one; ``pool`` says
    which to return. Unlabelled items have no ``landmarks``: the landmark files are not read for them.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"cephalometric data folder not found: {root} (set AMAT_DATA_DIR or dataset_dir)")
    labelled = pool == "labelled"
    tables = []
    if labelled:
        tables = [read_landmarks_csv(root / f"landmarks_{a}.csv") for a in annotators
                  if (root / f"landmarks_{a}.csv").is_file()]
        if not tables:
            names = ", ".join(f"landmarks_{a}.csv" for a in annotators)
            raise FileNotFoundError(f"no landmark file ({names}) in {root}")
    original_size, spacing = _meta(root)
    ids = read_split(root, split, split_file)
    if pool == "unlabelled" or check_labelled_fraction(labelled_fraction) < 1.0:
        ids = select_pool(ids, pool, labelled_fraction, labelled_seed)
    if max_cases is not None:
        ids = ids[: int(max_cases)]
    items = []
    for sample_id in ids:
        image = root / "images" / f"{sample_id}.png"
        if not image.is_file():
            raise FileNotFoundError(f"image {sample_id!r} of split {split!r} not found: {image}")
        item = {
            "image": str(image),
            "sample_id": str(sample_id),
            "original_size": np.asarray(original_size, dtype=np.int64),
            "spacing": np.float32(spacing),
        }
        if labelled:
            coords = [t[sample_id] for t in tables if sample_id in t]
            if not coords:
                raise ValueError(f"image {sample_id!r} has no landmarks in {root}/landmarks_*.csv")
            item["landmarks"] = np.mean(coords, axis=0).astype(np.float32)
        items.append(item)
    if not items:
        raise ValueError(f"split {split!r} of {root} is empty")
    return items


def _template(num_landmarks: int, rng: np.random.Generator) -> np.ndarray:
    """Well separated landmark positions in [0.15, 0.85]² (fractions of width, height) on a jittered grid."""
    cols = int(np.ceil(np.sqrt(num_landmarks * 0.8)))
    rows = int(np.ceil(num_landmarks / cols))
    cells = [(c, r) for r in range(rows) for c in range(cols)][:num_landmarks]
    pos = np.array([[(c + 0.5) / cols, (r + 0.5) / rows] for c, r in cells])
    pos += rng.uniform(-0.15, 0.15, pos.shape) / np.array([cols, rows])
    return 0.15 + 0.7 * pos


def make_synthetic_ceph(
    root: str | os.PathLike,
    num_train: int = 8,
    num_test: int = 4,
    num_landmarks: int = CEPH_NUM_LANDMARKS,
    stored_size: Sequence[int] = (600, 484),
    original_size: Sequence[int] = CEPH_ORIGINAL_SIZE,
    spacing_mm: float = CEPH_SPACING_MM,
    jitter: float = 0.03,
    seed: int = 0,
) -> Path:
    """Write a synthetic data set in the ISBI 2015 layout and return its folder.

    Each image is a smooth, noisy background with ``num_landmarks`` bright blobs; landmark ``k`` lies near a fixed
    template position (moved by ``jitter``, a fraction of the image size, per image), so that it can be told
    from the others by where it is. The two "doctors" are the truth ± the same small offset, so their mean is
    the exact blob centre. ``meta.json`` records the original grid.
    """
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in stored_size)
    oh, ow = (int(v) for v in original_size)
    template = _template(num_landmarks, rng)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    sigma = max(1.5, 0.008 * (h + w))
    ids = [f"{i + 1:03d}" for i in range(num_train + num_test)]
    rows_senior, rows_junior = [], []
    for sample_id in ids:
        frac = np.clip(template + rng.uniform(-jitter, jitter, template.shape), 0.05, 0.95)
        pts = frac * np.array([w - 1, h - 1])  # stored-grid pixels
        gx, gy = rng.uniform(-1, 1, 2)
        image = 60 + 30 * (gx * (xs / w - 0.5) + gy * (ys / h - 0.5))
        for k, (x, y) in enumerate(pts):
            image += (110 + 60 * (k % 3) / 2) * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
        image += rng.normal(0, 6, image.shape)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="L").save(root / "images" / f"{sample_id}.png")
        orig = (pts + 0.5) * np.array([ow / w, oh / h]) - 0.5  # pixel centres aligned, as amat_monai.landmarks
        noise = rng.uniform(-2, 2, orig.shape)
        rows_senior.append([sample_id, *np.round(orig + noise, 3).ravel().tolist()])
        rows_junior.append([sample_id, *np.round(orig - noise, 3).ravel().tolist()])
    header = ["image"] + [f"{a}{k + 1}" for k in range(num_landmarks) for a in ("x", "y")]
    for name, rows in (("senior", rows_senior), ("junior", rows_junior)):
        with open(root / f"landmarks_{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    (root / "train.txt").write_text("\n".join(ids[:num_train]) + "\n")
    (root / "test1.txt").write_text("\n".join(ids[num_train:]) + "\n")
    (root / "meta.json").write_text(
        json.dumps({"original_size": [oh, ow], "spacing_mm": spacing_mm, "synthetic": True, "seed": seed}, indent=2) + "\n"
    )
    (root / "README.md").write_text(
        "Synthetic cephalometric-like landmark data written by amat_monai.data.ceph.make_synthetic_ceph "
        f"(seed {seed}): {num_train} training and {num_test} test images of {h}x{w} pixels, {num_landmarks} "
        f"landmarks in original {oh}x{ow} pixel units ({spacing_mm} mm per pixel).\n"
    )
    return root
