"""Medical Segmentation Decathlon data as 2D slices, the way nnU-Net 2D trains on it.

Folder layout (any Decathlon task)::

    dataset.json     "modality" (channels), "labels" (classes), "training": [{"image", "label"}, ...]
    imagesTr/*.nii.gz
    labelsTr/*.nii.gz

Each case is loaded once with MONAI's ``LoadImage``, checked (readable, finite, image and label shapes agree,
label values among the declared classes), z-scored per channel over the whole volume (nnU-Net's MRI
normalisation), and cut into 2D slices along the first axis of nnU-Net's array. nnU-Net reads volumes
with SimpleITK, whose axis order is the reverse of nibabel's, so its first axis is the LAST axis of the
array MONAI loads: slice ``k`` is ``volume[..., k]`` transposed to ``(y, x)``. Each slice is padded or
cropped, centred, to a fixed patch size. Every item is a dict::

    {"image": float32 [C, H, W], "label": int64 [1, H, W],
     "sample_id": "hippocampus_001:12", "case": "hippocampus_001", "slice": 12}

Cases are split deterministically into training / validation / test (80% / 6.5% / rest, a fixed seed;
208 / 17 / 35 for 260 cases) and the split is kept in a JSON file so that every run uses the same one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import Dataset, load_decathlon_datalist
from monai.transforms import LoadImage, ResizeWithPadOrCrop
from monai.utils import convert_to_tensor

from amat_monai.checkpoints import atomic_write_text, read_json
from amat_monai.data.labelled import check_labelled_fraction, select_pool

__all__ = [
    "SECTIONS",
    "SLICE_SELECTIONS",
    "decathlon_info",
    "load_datalist",
    "case_name",
    "split_cases",
    "load_split",
    "load_case",
    "volume_to_slices",
    "to_nnunet_axes",
    "DecathlonSliceDataset",
    "read_case_list",
]

SECTIONS = ("training", "validation", "test")
#: which slices a data set keeps: every slice, slices with any foreground, slices with every foreground class
SLICE_SELECTIONS = ("all", "foreground", "all_classes")
DEFAULT_FRACTIONS = (0.8, 0.065)

logger = logging.getLogger(__name__)


def _read_dataset_json(dataset_dir: str | os.PathLike) -> dict:
    path = Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: dataset_dir must be a Medical Segmentation Decathlon task folder "
            "(dataset.json, imagesTr/, labelsTr/)"
        )
    return read_json(path)


def decathlon_info(dataset_dir: str | os.PathLike) -> dict:
    """Number of classes and input channels, and the class names, from a task's ``dataset.json``.

    Returns:
        ``{"num_classes": int, "in_channels": int, "labels": {index: name}, "modality": {index: name}}``.
    """
    meta = _read_dataset_json(dataset_dir)
    path = Path(dataset_dir) / "dataset.json"
    try:
        labels = {int(k): str(v) for k, v in meta["labels"].items()}
        modality = {int(k): str(v) for k, v in meta["modality"].items()}
    except (KeyError, AttributeError, ValueError) as e:
        raise ValueError(f"{path}: needs 'labels' and 'modality' dictionaries keyed by integers ({e!r})") from None
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        raise ValueError(f"{path}: 'labels' must be numbered 0..C-1 with C >= 2, got {sorted(labels)}")
    if sorted(modality) != list(range(len(modality))) or not modality:
        raise ValueError(f"{path}: 'modality' must be numbered 0..M-1, got {sorted(modality)}")
    return {"num_classes": len(labels), "in_channels": len(modality), "labels": labels, "modality": modality}


def case_name(path: str | os.PathLike) -> str:
    """``.../hippocampus_001.nii.gz`` -> ``hippocampus_001``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def load_datalist(dataset_dir: str | os.PathLike, max_cases: int | None = None,
                  check_labels: bool = True) -> list[dict]:
    """The labelled cases of a Decathlon task, in ``dataset.json`` order: ``[{"image", "label", "case"}]``.

    Args:
        dataset_dir: the task folder.
        max_cases: keep only the first ``max_cases`` cases (quick runs); ``None`` keeps all.
        check_labels: check that every label file exists (off: the caller checks those of the cases it loads,
            so that a semi-supervised run does not depend on the label files of its unlabelled cases).

    Raises:
        FileNotFoundError: naming ``dataset.json`` or the first image / label file that is missing.
    """
    _read_dataset_json(dataset_dir)  # a clear message when the folder is not a Decathlon task
    json_path = Path(dataset_dir) / "dataset.json"
    items = load_decathlon_datalist(str(json_path), is_segmentation=True, data_list_key="training",
                                    base_dir=str(dataset_dir))
    if max_cases is not None:
        if int(max_cases) < 1:
            raise ValueError(f"max_cases must be >= 1 or null, got {max_cases}")
        items = items[: int(max_cases)]
    out = []
    for item in items:
        for key in ("image", "label") if check_labels else ("image",):
            if not Path(item[key]).is_file():
                raise FileNotFoundError(f"{item[key]} (listed in {json_path}) does not exist")
        out.append({"image": item["image"], "label": item["label"], "case": case_name(item["image"])})
    names = [c["case"] for c in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{json_path}: case names are not unique")
    return out


def split_cases(
    cases: Sequence[str], seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS
) -> dict[str, list[str]]:
    """Deterministic training / validation / test split of case names.

    The sorted names are shuffled with ``numpy.random.default_rng(seed)``; the first ``round(f_train·n)`` go
    to training, the next ``round(f_val·n)`` (at least 1) to validation, the rest (at least 1) to test.
    260 cases give 208 / 17 / 35.
    """
    n = len(cases)
    if n < 3:
        raise ValueError(f"need at least 3 cases to split into training / validation / test, got {n}")
    f_train, f_val = float(fractions[0]), float(fractions[1])
    if not (0 < f_train < 1 and 0 < f_val < 1 and f_train + f_val < 1):
        raise ValueError(f"split fractions must be positive and sum to less than 1, got {list(fractions)}")
    n_val = max(1, int(round(f_val * n)))
    n_test = max(1, n - int(round(f_train * n)) - n_val)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{n} cases are too few for the split fractions {list(fractions)}")
    order = np.random.default_rng(seed).permutation(n)
    names = sorted(cases)
    shuffled = [names[i] for i in order]
    return {
        "training": sorted(shuffled[:n_train]),
        "validation": sorted(shuffled[n_train : n_train + n_val]),
        "test": sorted(shuffled[n_train + n_val :]),
    }


def load_split(
    cases: Sequence[str],
    split_file: str | os.PathLike | None,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> dict[str, list[str]]:
    """The split of ``cases``: read from ``split_file`` when it exists, else computed and written there.

    An existing file is used as is (so a hand-made split can be given), after checking that every case it
    names is in the data set.
    """
    if split_file is not None and Path(split_file).is_file():
        split = read_json(split_file, "split file")
        try:
            split = {s: [str(c) for c in split[s]] for s in SECTIONS}
        except (KeyError, TypeError) as e:
            raise ValueError(f"split file {split_file} is not a valid split ({e!r}); expected lists under {SECTIONS}") from None
        unknown = sorted(set().union(*split.values()) - set(cases))
        if unknown:
            raise ValueError(
                f"split file {split_file} names {len(unknown)} cases that are not in the data set "
                f"(e.g. {unknown[:3]}): delete it or point split_file elsewhere; to evaluate on another data set, "
                "take all of its cases or a list of them (`amat-monai evaluate --split all` or `--cases FILE`)"
            )
        return split
    split = split_cases(cases, seed, fractions)
    if split_file is not None:
        atomic_write_text(split_file, json.dumps({**split, "seed": seed, "fractions": list(fractions)}, indent=1))
    return split


def _read(loader: LoadImage, path: str) -> np.ndarray:
    try:
        return np.asarray(loader(path))
    except Exception as e:  # nibabel / gzip / MONAI reader errors have many types
        cause = e.__cause__ or e
        raise ValueError(f"cannot read {path}: it is corrupt, truncated or not an image ({cause})") from None


def load_case(image_path: str, label_path: str | None, num_classes: int,
              in_channels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Load, check and z-score one case.

    Returns:
        image ``float32 [C, X, Y, Z]`` (z-scored per channel) and label ``int64 [1, X, Y, Z]`` (``None`` when
        ``label_path`` is: an unlabelled case, whose label file is never opened), in MONAI's (nibabel's) axis
        order.

    Raises:
        ValueError: naming the file, when it cannot be read, is not 3D, has the wrong number of channels,
            holds non-finite intensities, disagrees in shape with its label, or has undeclared label values.
    """
    loader = LoadImage(image_only=True, ensure_channel_first=True, dtype=None)
    image = _read(loader, image_path).astype(np.float32)
    if image.ndim != 4:
        raise ValueError(f"{image_path}: expected a 3D volume (optionally with channels), got shape {image.shape}")
    if image.shape[0] != in_channels:
        raise ValueError(f"{image_path} has {image.shape[0]} channels but dataset.json declares {in_channels}")
    if not np.isfinite(image).all():
        raise ValueError(f"{image_path} contains non-finite intensities (NaN or inf)")
    label = None if label_path is None else _checked_label(loader, label_path, image_path, image.shape, num_classes)
    flat = image.reshape(image.shape[0], -1).astype(np.float64)
    mean, std = flat.mean(axis=1), flat.std(axis=1)
    if (std == 0).any():
        # a blank channel (e.g. an export that lost its intensities) trains silently on nothing
        logger.warning(f"{image_path}: channel(s) {np.flatnonzero(std == 0).tolist()} are constant "
                       f"(every voxel {mean[std == 0].tolist()}); the case carries no image information")
    image = ((image - mean[:, None, None, None]) / np.maximum(std, 1e-8)[:, None, None, None]).astype(np.float32)
    return image, label


def _checked_label(loader: LoadImage, label_path: str, image_path: str, image_shape: tuple[int, ...],
                   num_classes: int) -> np.ndarray:
    """The label volume ``int64 [1, X, Y, Z]``, checked against its image (see :func:`load_case`)."""
    label = _read(loader, label_path)
    if label.ndim != 4 or label.shape[0] != 1:
        raise ValueError(f"{label_path}: expected a single-channel 3D label volume, got shape {label.shape}")
    if tuple(image_shape[1:]) != tuple(label.shape[1:]):
        raise ValueError(
            f"shape mismatch: image {image_path} is {tuple(image_shape[1:])} but label {label_path} is {label.shape[1:]}"
        )
    if not np.isfinite(label).all():
        raise ValueError(f"{label_path} contains non-finite values")
    values = np.unique(label)
    bad = [v for v in values.tolist() if v != int(v) or not 0 <= int(v) < num_classes]
    if bad:
        raise ValueError(
            f"{label_path} has label values {bad[:5]} outside the declared classes 0..{num_classes - 1}"
        )
    return label.astype(np.int64)


def to_nnunet_axes(volume: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """``[C, X, Y, Z]`` (nibabel / MONAI order) -> ``[C, Z, Y, X]`` (SimpleITK / nnU-Net order). Its own inverse."""
    return volume.transpose(0, 3, 2, 1) if isinstance(volume, np.ndarray) else volume.permute(0, 3, 2, 1)


def volume_to_slices(
    image: np.ndarray,
    label: np.ndarray | None,
    case: str,
    patch_size: Sequence[int],
    slices: str = "all",
    num_classes: int | None = None,
) -> list[dict]:
    """Cut a checked, normalised case into fixed-size 2D items (see the module docstring).

    Args:
        image: ``[C, X, Y, Z]``; label: ``[1, X, Y, Z]``, or ``None`` for an unlabelled case (its items have no
            ``"label"``; only ``slices="all"`` can be chosen without one).
        case: the case name, the prefix of every ``sample_id``.
        patch_size: ``(H, W)``; each ``(y, x)`` slice is padded (with 0, the z-scored mean) or cropped, centred.
        slices: ``"all"``, ``"foreground"`` (any label > 0) or ``"all_classes"`` (every foreground class
            present in the patch; the papers' evaluation protocol, needs ``num_classes``).
    """
    if slices not in SLICE_SELECTIONS:
        raise ValueError(f"slices must be one of {SLICE_SELECTIONS}, got {slices!r}")
    if slices == "all_classes" and num_classes is None:
        raise ValueError("slices='all_classes' needs num_classes")
    if label is None and slices != "all":
        raise ValueError(f"slices={slices!r} selects slices by their label; an unlabelled case can only give 'all'")
    resize = ResizeWithPadOrCrop(spatial_size=tuple(int(s) for s in patch_size), mode="constant")
    img = torch.from_numpy(np.ascontiguousarray(to_nnunet_axes(image)))
    lab = None if label is None else torch.from_numpy(np.ascontiguousarray(to_nnunet_axes(label)))
    items = []
    for k in range(img.shape[1]):
        x = convert_to_tensor(resize(img[:, k]), track_meta=False)
        item = {"image": x.float().contiguous(), "sample_id": f"{case}:{k}", "case": case, "slice": k}
        if lab is not None:
            y = convert_to_tensor(resize(lab[:, k]), track_meta=False)
            if slices == "foreground" and not bool((y > 0).any()):
                continue
            if slices == "all_classes" and not all(bool((y == c).any()) for c in range(1, num_classes)):
                continue
            item["label"] = y.long().contiguous()
        items.append(item)
    return items


def read_case_list(path: str | os.PathLike) -> list[str]:
    """Case ids from a text file, one per line (blank lines and ``#`` comments skipped).

    Raises:
        FileNotFoundError / ValueError: naming the file when it is missing or names no case.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"case list not found: {path}")
    cases = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    cases = [c for c in cases if c]
    if not cases:
        raise ValueError(f"case list {path} names no case (expected one case id per line)")
    return cases


class DecathlonSliceDataset(Dataset):
    """One section (training / validation / test / all) or a list of cases of a Decathlon task, as in-memory
    2D slices.

    Args:
        dataset_dir: the task folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``).
        section: ``"training"``, ``"validation"``, ``"test"`` (of the split) or ``"all"`` (every case of
            ``dataset.json``, no split: e.g. another site's data that a model never saw).
        patch_size: ``(H, W)`` of every slice (nnU-Net's 2D patch; 56×40 for hippocampus).
        slices: which slices to keep, see :func:`volume_to_slices`.
        split_file: JSON split to read, or to write when missing; ``None`` computes it without writing.
        max_cases: limits the cases. A new split is made of the first ``max_cases`` cases of ``dataset.json``
            (quick training runs); a section read from an existing split file, ``"all"`` or ``cases`` keeps its
            first ``max_cases`` cases, so evaluating fewer (or more) cases than a run was trained with works.
        seed: split seed.
        fractions: training and validation fractions of the cases.
        cases: case ids (names of ``dataset.json``'s images, e.g. ``hippocampus_001``) to use instead of a
            section, or the path of a text file listing them (:func:`read_case_list`).
        transform: optional MONAI transform applied to each item (e.g. augmentation).
        pool: with ``section="training"``: ``"labelled"`` (the labelled cases) or ``"unlabelled"`` (the rest of
            the training cases, images only: their label files are never opened, and every slice is kept).
        labelled_fraction: share of the training cases that are labelled (``None``: all), split by case with
            ``labelled_seed`` (:func:`amat_monai.data.labelled.split_labelled`); other sections ignore it.
        labelled_seed: seed of that split.

    Raises:
        ValueError: when the section has no case or no slice (naming the split file), a listed case is not
            in the data set, or a case is bad (naming the file, see :func:`load_case`).
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        section: str = "training",
        patch_size: Sequence[int] = (56, 40),
        slices: str = "all",
        split_file: str | os.PathLike | None = None,
        max_cases: int | None = None,
        seed: int = 0,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        cases: Sequence[str] | str | os.PathLike | None = None,
        transform=None,
        pool: str = "labelled",
        labelled_fraction: float | None = None,
        labelled_seed: int = 0,
    ) -> None:
        if cases is None and section not in (*SECTIONS, "all"):
            raise ValueError(f"section must be one of {(*SECTIONS, 'all')}, got {section!r}")
        if pool == "unlabelled" and (section != "training" or cases is not None):
            raise ValueError(f"the unlabelled pool is part of the training section, not of {section!r} or a case list")
        # labelled_fraction splits the training cases only: validation and test stay whole
        semi = section == "training" and cases is None and (
            pool == "unlabelled" or check_labelled_fraction(labelled_fraction) < 1.0)
        if len(patch_size) != 2:
            raise ValueError(f"patch_size must be (H, W), got {list(patch_size)}")
        if max_cases is not None and int(max_cases) < 1:
            raise ValueError(f"max_cases must be >= 1 or null, got {max_cases}")
        info = decathlon_info(dataset_dir)
        if isinstance(cases, (str, os.PathLike)):
            cases = read_case_list(cases)
        new_split = cases is None and section != "all" and not (split_file and Path(split_file).is_file())
        datalist = load_datalist(dataset_dir, max_cases if new_split else None, check_labels=False)
        names = [c["case"] for c in datalist]
        if cases is not None:
            unknown = [c for c in cases if c not in set(names)]
            if unknown:
                raise ValueError(f"{len(unknown)} listed case(s) are not in {Path(dataset_dir) / 'dataset.json'}: "
                                 f"{unknown[:5]} (it has e.g. {names[:3]})")
            wanted, where, section = set(cases), "the case list", "cases"
        elif section == "all":
            wanted, where = set(names), str(Path(dataset_dir) / "dataset.json")
        else:
            wanted = load_split(names, split_file, seed, fractions)[section]
            where = f"split file {split_file}" if split_file else f"the split of {dataset_dir}"
            if semi:
                wanted = select_pool(wanted, pool, labelled_fraction, labelled_seed)
                where += f" ({pool} pool, labelled_fraction={labelled_fraction})"
            wanted = set(wanted)
        if not wanted:
            raise ValueError(f"the {section} section of {where} is empty")
        self.info = info
        self.section = section
        self.cases = [c for c in datalist if c["case"] in wanted]
        if max_cases is not None and not new_split:
            self.cases = self.cases[: int(max_cases)]
        self.pool = pool
        labelled = pool == "labelled"
        if not labelled and slices != "all":
            raise ValueError(f"slices={slices!r} chooses slices by their label; the unlabelled pool can only keep 'all'")
        items: list[dict] = []
        for c in self.cases:
            if labelled and not Path(c["label"]).is_file():
                raise FileNotFoundError(f"{c['label']} (listed in {Path(dataset_dir) / 'dataset.json'}) does not exist")
            image, label = load_case(c["image"], c["label"] if labelled else None, info["num_classes"],
                                     info["in_channels"])
            items.extend(volume_to_slices(image, label, c["case"], patch_size, slices, info["num_classes"]))
        if not items:
            raise ValueError(f"the {section} section of {where} has no slice with slices={slices!r}")
        logger.info(f"{section}{'' if labelled else ' (unlabelled)'}: {len(self.cases)} cases, {len(items)} slices "
                    f"({slices}) from {dataset_dir}")
        super().__init__(data=items, transform=transform)
