"""Pascal VOC object detection folders (BCCD blood cells): annotations, splits, data lists, a synthetic stand-in.

Folder layout (the shared BCCD copy's; any VOC folder laid out the same way works)::

    JPEGImages/<id>.jpg            the images
    Annotations/<id>.xml           one <object> per box: <name>, <bndbox> xmin ymin xmax ymax
    ImageSets/Main/<split>.txt     one image id per line (BCCD: train, val, trainval, test)

VOC coordinates are 1-based and inclusive; boxes are returned 0-based and half-open,
``[xmin - 1, ymin - 1, xmax, ymax]``, so that a box's width is ``xmax - xmin + 1`` pixels and a box that touches the
right edge ends at the image width. A box whose corners coincide (BCCD has two, single points marked as RBC) has no
extent to detect: it is dropped with a warning that names the file; every other problem is an error naming the
file and the object.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from amat_monai.data.labelled import check_labelled_fraction, select_pool
from amat_monai.data.root import data_root

logger = logging.getLogger(__name__)

__all__ = ["BCCD_CLASSES", "default_bccd_dir", "VocAnnotation", "read_voc_annotation", "read_voc_split", "voc_datalist",
           "make_synthetic_voc"]

#: the BCCD classes, in label order (label ``k`` is ``BCCD_CLASSES[k]``)
BCCD_CLASSES = ("RBC", "WBC", "Platelets")


def default_bccd_dir() -> str:
    """``$AMAT_DATA_DIR/BCCD``; ``AMAT_DATA_DIR`` defaults to ``../shared/data`` next to the project."""
    return str(data_root() / "BCCD")


@dataclass(frozen=True)
class VocAnnotation:
    """One image's boxes: ``boxes`` ``[N, 4]`` float32 (0-based ``x1, y1, x2, y2``), ``labels`` ``[N]`` int64."""

    filename: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray


def _number(node: ET.Element | None, tag: str, where: str) -> float:
    child = node.find(tag) if node is not None else None
    if child is None or child.text is None:
        raise ValueError(f"{where}: no <{tag}>")
    try:
        return float(child.text.strip())
    except ValueError:
        raise ValueError(f"{where}: <{tag}> is {child.text.strip()!r}, not a number") from None


def read_voc_annotation(path: str | os.PathLike, classes: Sequence[str] = BCCD_CLASSES,
                        allow_empty: bool = False) -> VocAnnotation:
    """Read one VOC annotation file.

    Args:
        path: the ``.xml`` file.
        classes: class names in label order; another name is an error.
        allow_empty: accept an image without boxes (by default an error: a detection training image with no
            object is more often a broken annotation than a true negative).

    Raises:
        ValueError: naming the file (and object) for malformed XML, a missing or non-numeric size or coordinate,
            an unknown class, a box outside the image, or an image without boxes.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: malformed XML ({e})") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation not found: {path}") from None
    size = root.find("size")
    width, height = int(_number(size, "width", f"{path} <size>")), int(_number(size, "height", f"{path} <size>"))
    if width <= 0 or height <= 0:
        raise ValueError(f"{path}: image size {width}×{height} is empty")
    boxes, labels = [], []
    for i, obj in enumerate(root.findall("object")):
        name_node = obj.find("name")
        name = (name_node.text or "").strip() if name_node is not None else ""
        where = f"{path} object {i} ({name or 'no name'})"
        if name not in classes:
            raise ValueError(f"{where}: class {name!r} is not one of {list(classes)}")
        box = obj.find("bndbox")
        xmin, ymin, xmax, ymax = (_number(box, k, where) for k in ("xmin", "ymin", "xmax", "ymax"))
        if xmin < 1 or ymin < 1 or xmax > width or ymax > height:
            raise ValueError(f"{where}: box ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}) lies outside the "
                             f"{width}×{height} image (VOC coordinates run from 1 to the width / height)")
        if xmax < xmin or ymax < ymin:
            raise ValueError(f"{where}: box ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}) has its corners swapped")
        if xmax == xmin and ymax == ymin:
            logger.warning(f"{where}: box ({xmin:g}, {ymin:g}) is a single point; dropped")
            continue
        boxes.append([xmin - 1.0, ymin - 1.0, xmax, ymax])
        labels.append(classes.index(name))
    if not boxes and not allow_empty:
        raise ValueError(f"{path}: the image has no boxes (pass allow_empty=True to keep it as a negative)")
    filename = (root.findtext("filename") or f"{path.stem}.jpg").strip()
    return VocAnnotation(filename, width, height, np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                         np.asarray(labels, dtype=np.int64))


def read_voc_split(root: str | os.PathLike, split: str) -> list[str]:
    """Image ids of ``ImageSets/Main/<split>.txt``, or of the text file ``split`` names (one id per line, e.g.
    ``amat-monai evaluate --cases FILE``); a missing list names the lists that exist."""
    lists = Path(root) / "ImageSets" / "Main"
    path = Path(split) if str(split).endswith(".txt") and Path(split).is_file() else lists / f"{split}.txt"
    if not path.is_file():
        available = sorted(p.stem for p in lists.glob("*.txt")) if lists.is_dir() else []
        raise FileNotFoundError(f"split list not found: {path} (available: {available})")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{path} lists no images")
    return ids


#: image file suffixes tried for an unlabelled VOC image (its annotation, which names the file, is not read)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def voc_datalist(root: str | os.PathLike, split: str, classes: Sequence[str] = BCCD_CLASSES,
                 max_cases: int | None = None, allow_empty: bool = False, pool: str = "labelled",
                 labelled_fraction: float | None = None, labelled_seed: int = 0) -> list[dict]:
    """MONAI data list of a split: ``{"image", "boxes", "labels", "sample_id", "image_size"}`` per image.

    With ``labelled_fraction`` below 1 the split's images are divided, seeded by ``labelled_seed``
    (:func:`amat_monai.data.labelled.split_labelled`), into a labelled pool and an unlabelled one; ``pool`` says which
    to return. Unlabelled items are ``{"image", "sample_id"}``: their annotation files are not read.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"VOC folder not found: {root}")
    ids = read_voc_split(root, split)
    if pool == "unlabelled" or check_labelled_fraction(labelled_fraction) < 1.0:
        ids = select_pool(ids, pool, labelled_fraction, labelled_seed)
    ids = ids[: max_cases or None]
    if pool == "unlabelled":
        return [{"image": str(_image_file(root, i, split)), "sample_id": i} for i in ids]
    items = []
    for sample_id in ids:
        ann = read_voc_annotation(root / "Annotations" / f"{sample_id}.xml", classes, allow_empty)
        image = root / "JPEGImages" / ann.filename
        if not image.is_file():
            raise FileNotFoundError(f"image {sample_id!r} of split {split!r} not found: {image}")
        items.append({"image": str(image), "boxes": ann.boxes, "labels": ann.labels, "sample_id": sample_id,
                      "image_size": [ann.height, ann.width]})
    return items


def _image_file(root: Path, sample_id: str, split: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        path = root / "JPEGImages" / f"{sample_id}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"image {sample_id!r} of split {split!r} not found: no {root / 'JPEGImages' / sample_id}"
                            f"{{{','.join(IMAGE_SUFFIXES)}}}")


def _xml(filename: str, width: int, height: int, objects: Sequence[tuple[str, Sequence[float]]]) -> str:
    parts = [f"<annotation><folder>JPEGImages</folder><filename>{filename}</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, (x1, y1, x2, y2) in objects:
        parts.append(f"<object><name>{name}</name><bndbox><xmin>{x1:g}</xmin><ymin>{y1:g}</ymin>"
                     f"<xmax>{x2:g}</xmax><ymax>{y2:g}</ymax></bndbox></object>")
    return "\n".join(parts + ["</annotation>\n"])


def make_synthetic_voc(root: str | os.PathLike, num_images: int = 12, size: Sequence[int] = (160, 120),
                       seed: int = 0, splits: Sequence[float] = (0.5, 0.25)) -> Path:
    """A BCCD-like VOC folder: discs on a textured background, 3 classes that differ in size and colour.

    Each image holds 3–6 "RBC" (medium, red), 0–1 "WBC" (large, purple, with a dark core) and 1–3 "Platelets"
    (small, dark). ``splits``: the train and val fractions; the rest is test (``trainval`` too, as in BCCD).
    Returns the folder.
    """
    from PIL import Image

    root = Path(root)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    width, height = int(size[0]), int(size[1])
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    ids = []
    kinds = {"RBC": ((0.09, 0.12), (200, 90, 90)), "WBC": ((0.16, 0.2), (120, 60, 160)),
             "Platelets": ((0.03, 0.045), (90, 50, 110))}
    for n in range(num_images):
        image = np.full((height, width, 3), (235, 215, 215), dtype=np.float32)
        image += rng.normal(0, 6, image.shape)
        objects = []
        counts = {"RBC": rng.integers(3, 7), "WBC": rng.integers(0, 2), "Platelets": rng.integers(1, 4)}
        for name, count in counts.items():
            (r_lo, r_hi), colour = kinds[name]
            for _ in range(count):
                r = rng.uniform(r_lo, r_hi) * min(width, height)
                cx, cy = rng.uniform(r + 1, width - r - 1), rng.uniform(r + 1, height - r - 1)
                disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
                image[disc] = colour
                if name == "WBC":
                    image[(xx - cx) ** 2 + (yy - cy) ** 2 <= (0.5 * r) ** 2] = (70, 30, 110)
                # 1-based inclusive pixel corners of the disc's bounding box
                x1, y1 = int(np.floor(cx - r)) + 1, int(np.floor(cy - r)) + 1
                x2, y2 = min(int(np.ceil(cx + r)) + 1, width), min(int(np.ceil(cy + r)) + 1, height)
                objects.append((name, (x1, y1, x2, y2)))
        sample_id = f"Synthetic_{n:05d}"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "JPEGImages" / f"{sample_id}.jpg",
                                                                       quality=95)
        (root / "Annotations" / f"{sample_id}.xml").write_text(_xml(f"{sample_id}.jpg", width, height, objects))
        ids.append(sample_id)
    n_train = max(1, int(round(splits[0] * num_images)))
    n_val = max(1, int(round(splits[1] * num_images)))
    lists = {"train": ids[:n_train], "val": ids[n_train: n_train + n_val], "test": ids[n_train + n_val:]}
    lists["trainval"] = lists["train"] + lists["val"]
    for name, members in lists.items():
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in members))
    (root / "README.md").write_text("Synthetic BCCD-like VOC folder made by amat_monai.data.voc.make_synthetic_voc.\n")
    return root
