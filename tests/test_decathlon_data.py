"""Decathlon data as 2D slices: split, slicing, normalisation, synthetic generator, bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from amat_monai.data import (
    DecathlonSliceDataset,
    decathlon_info,
    load_case,
    load_datalist,
    load_split,
    make_synthetic_decathlon,
    split_cases,
    to_nnunet_axes,
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return Path(make_synthetic_decathlon(tmp_path_factory.mktemp("syn") / "Task_syn", num_cases=6, seed=1))


def _copy_task(src: Path, dst: Path) -> Path:
    """A writable copy of a (small) synthetic task, to break one file of it."""
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True)
        for f in (src / sub).iterdir():
            (dst / sub / f.name).write_bytes(f.read_bytes())
    (dst / "dataset.json").write_text((src / "dataset.json").read_text())
    return dst


def test_split_sizes_are_the_papers():
    names = [f"hippocampus_{i:03d}" for i in range(260)]
    split = split_cases(names, seed=0)
    assert [len(split[s]) for s in ("training", "validation", "test")] == [208, 17, 35]
    assert set().union(*split.values()) == set(names)
    assert split == split_cases(list(reversed(names)), seed=0)  # depends on the names, not their order
    assert split != split_cases(names, seed=1)


def test_split_small_and_too_small():
    assert [len(v) for v in split_cases(["a", "b", "c"]).values()] == [1, 1, 1]
    with pytest.raises(ValueError, match="at least 3 cases"):
        split_cases(["a", "b"])


def test_split_file_written_then_reused(tmp_path):
    names = [f"c{i}" for i in range(10)]
    path = tmp_path / "split.json"
    first = load_split(names, path, seed=3)
    assert json.loads(path.read_text())["training"] == first["training"]
    # a hand-edited split is used as is
    custom = {"training": names[:8], "validation": names[8:9], "test": names[9:]}
    path.write_text(json.dumps(custom))
    assert load_split(names, path, seed=3) == custom
    with pytest.raises(ValueError, match=f"split file {path} names 1 cases"):
        load_split(names[:9], path)


def test_synthetic_task_and_info(synthetic):
    info = decathlon_info(synthetic)
    assert info["num_classes"] == 3 and info["in_channels"] == 1
    cases = load_datalist(synthetic)
    assert len(cases) == 6 and cases[0]["case"] == "synthetic_000"
    assert len(load_datalist(synthetic, max_cases=4)) == 4


def test_slices_items_and_normalisation(synthetic, tmp_path):
    split_file = tmp_path / "split.json"
    ds = DecathlonSliceDataset(synthetic, "training", patch_size=(32, 24), slices="all", split_file=split_file)
    item = ds[0]
    assert set(item) == {"image", "label", "sample_id", "case", "slice"}
    assert item["image"].shape == (1, 32, 24) and item["image"].dtype == torch.float32
    assert item["label"].shape == (1, 32, 24) and item["label"].dtype == torch.int64
    assert item["sample_id"] == f"{item['case']}:{item['slice']}"
    # every slice of every training case, in order: slice k is the k-th slice along nnU-Net's first axis
    first = ds.cases[0]
    image, label = load_case(first["image"], first["label"], 3, 1)
    n_slices = image.shape[3]
    assert [it["slice"] for it in ds.data[:n_slices]] == list(range(n_slices))
    assert np.allclose(image.mean(), 0, atol=1e-4) and np.allclose(image.std(), 1, atol=1e-3)
    k = 7
    ref = to_nnunet_axes(label)[:, k]  # [1, Y, X]
    y, x = ref.shape[1:]
    got = ds.data[k]["label"].numpy()
    pad_y, pad_x = (32 - y) // 2, (24 - x) // 2
    # centred pad (or crop) of the (y, x) slice
    if pad_y >= 0 and pad_x >= 0:
        assert np.array_equal(got[:, pad_y : pad_y + y, pad_x : pad_x + x], ref)
    # selections nest: all ⊇ foreground ⊇ all_classes, and the sections do not share cases
    fg = DecathlonSliceDataset(synthetic, "training", patch_size=(32, 24), slices="foreground", split_file=split_file)
    both = DecathlonSliceDataset(synthetic, "training", patch_size=(32, 24), slices="all_classes",
                                 split_file=split_file)
    assert len(ds) > len(fg) >= len(both) > 0
    assert all((it["label"] > 0).any() for it in fg.data)
    assert all((it["label"] == 1).any() and (it["label"] == 2).any() for it in both.data)
    test = DecathlonSliceDataset(synthetic, "test", patch_size=(32, 24), split_file=split_file)
    assert not {c["case"] for c in test.cases} & {c["case"] for c in ds.cases}


def test_two_channel_4d_images(tmp_path):
    task = make_synthetic_decathlon(tmp_path / "Task_2ch", num_cases=3, channels=2, seed=2)
    assert nib.load(str(Path(task) / "imagesTr" / "synthetic_000.nii.gz")).ndim == 4
    assert decathlon_info(task)["in_channels"] == 2
    ds = DecathlonSliceDataset(task, "training", patch_size=(40, 32))
    assert ds[0]["image"].shape == (2, 40, 32)
    assert torch.allclose(ds[0]["image"][0], ds[0]["image"][1]) is False


# -- bad input: one clear error naming the file --------------------------------------------------------
def _first(task: Path, sub: str) -> Path:
    return sorted((task / sub).iterdir())[0]


def test_corrupt_and_truncated_files(synthetic, tmp_path):
    task = _copy_task(synthetic, tmp_path / "t")
    image = _first(task, "imagesTr")
    image.write_bytes(image.read_bytes()[:200])  # truncated gzip stream
    with pytest.raises(ValueError, match=f"cannot read {image}"):
        load_case(str(image), str(_first(task, "labelsTr")), 3, 1)
    image.write_bytes(gzip.compress(b"this is not a NIfTI file" * 20))
    with pytest.raises(ValueError, match=f"cannot read {image}"):
        load_case(str(image), str(_first(task, "labelsTr")), 3, 1)


def _write_like(path: Path, data: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def test_shape_mismatch(synthetic, tmp_path):
    task = _copy_task(synthetic, tmp_path / "t")
    label = _first(task, "labelsTr")
    data = np.asarray(nib.load(str(label)).dataobj)
    _write_like(label, data[:-1])
    with pytest.raises(ValueError, match=f"shape mismatch: image .* but label {label}"):
        load_case(str(_first(task, "imagesTr")), str(label), 3, 1)


def test_label_values_outside_classes(synthetic, tmp_path):
    task = _copy_task(synthetic, tmp_path / "t")
    label = _first(task, "labelsTr")
    data = np.asarray(nib.load(str(label)).dataobj).copy()
    data[0, 0, 0] = 5
    _write_like(label, data)
    with pytest.raises(ValueError, match=rf"{label} has label values \[5\] outside the declared classes 0..2"):
        load_case(str(_first(task, "imagesTr")), str(label), 3, 1)


def test_non_finite_intensities(synthetic, tmp_path):
    task = _copy_task(synthetic, tmp_path / "t")
    image = _first(task, "imagesTr")
    data = np.asarray(nib.load(str(image)).dataobj).astype(np.float32)
    data[1, 2, 3] = np.nan
    _write_like(image, data)
    with pytest.raises(ValueError, match=f"{image} contains non-finite intensities"):
        load_case(str(image), str(_first(task, "labelsTr")), 3, 1)


def test_empty_split_and_missing_files(synthetic, tmp_path):
    split_file = tmp_path / "split.json"
    names = [c["case"] for c in load_datalist(synthetic)]
    split_file.write_text(json.dumps({"training": names[:5], "validation": names[5:], "test": []}))
    with pytest.raises(ValueError, match=f"the test section of split file {split_file} is empty"):
        DecathlonSliceDataset(synthetic, "test", patch_size=(32, 24), split_file=split_file)
    with pytest.raises(FileNotFoundError, match="dataset.json not found"):
        DecathlonSliceDataset(tmp_path, "training")
    task = _copy_task(synthetic, tmp_path / "t")
    missing = _first(task, "labelsTr")
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=f"{missing}"):
        load_datalist(task)


@pytest.mark.realdata
def test_real_hippocampus_split_and_slices(tmp_path, hippocampus_dir):
    info = decathlon_info(hippocampus_dir)
    assert info["num_classes"] == 3 and info["in_channels"] == 1
    names = [c["case"] for c in load_datalist(hippocampus_dir)]
    split = load_split(names, tmp_path / "split.json", seed=0)
    assert [len(split[s]) for s in ("training", "validation", "test")] == [208, 17, 35]
    ds = DecathlonSliceDataset(hippocampus_dir, "training", slices="foreground", max_cases=4,
                               split_file=tmp_path / "small.json")
    assert ds[0]["image"].shape == (1, 56, 40)
    assert ds[0]["sample_id"].startswith("hippocampus_")
