"""The embedded demo (``amat-monai demo``), shrunk to seconds, and its synthetic task."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from PIL import Image

from amat_monai.data import make_synthetic_decathlon
from amat_monai.demo import DEMO_SETTINGS, run_demo


def test_texture_task_has_equally_bright_structures_and_a_checkerboard_on_one(tmp_path):
    task = make_synthetic_decathlon(tmp_path / "T", num_cases=1, seed=0, texture=0.15, noise=0.0)
    image = np.asarray(nib.load(f"{task}/imagesTr/synthetic_000.nii.gz").dataobj, dtype=np.float64)
    label = np.asarray(nib.load(f"{task}/labelsTr/synthetic_000.nii.gz").dataobj)
    grid = np.indices(image.shape).sum(axis=0) % 2  # the voxel checkerboard's phase
    means = [image[label == c].mean() for c in (1, 2)]
    assert abs(means[0] - means[1]) < 25  # equally bright up to the bias field (without texture: 40 apart)
    for cls, amplitude in ((1, 15.0), (2, 0.0)):
        even, odd = image[(label == cls) & (grid == 0)], image[(label == cls) & (grid == 1)]
        assert abs((even.mean() - odd.mean()) / 2 - amplitude) < 1.5, cls  # ± amplitude on class 1 only


def test_shapes_set_the_structures_sizes(tmp_path):
    def counts(shapes):
        task = make_synthetic_decathlon(tmp_path / str(shapes), num_cases=1, seed=3, texture=0.1, shapes=shapes)
        label = np.asarray(nib.load(f"{task}/labelsTr/synthetic_000.nii.gz").dataobj)
        return [(label == c).sum() for c in (1, 2)]

    same = counts(((1.0, 1.0), (1.0, 1.0)))
    small, large = counts(DEMO_SETTINGS["data"]["shapes"])
    assert 0.8 < same[0] / same[1] < 1.25  # one geometry: about equal (class 1 keeps the voxels they share)
    assert large > 2.5 * small  # the demo's: class 2 ~ (1.1 * 1.7) / 0.7² of class 1 in the plane


def test_demo_trains_every_method_and_writes_the_table_and_pictures(tmp_path, capsys):
    tiny = {
        "data": {"num_cases": 6},
        "std": {"epochs": 2},
        "adversarial": {"epochs": 1, "attack_steps": 2},
        "eval": {"eps": (0.5, 1.0), "steps": (2, 2)},
    }
    result = run_demo(tmp_path / "demo", "cpu", tiny)
    rows = [line.split("|")[1].strip() for line in result["table"].splitlines()[2:]]
    assert rows == ["STD", *(f"VAT{e:g}" for e in DEMO_SETTINGS["vat"]["eps"]), "AMAT"]
    header = result["table"].splitlines()[0]
    assert "PGD0.5" in header and "IFGSM1" in header and "PGD avg" in header
    for path in (result["figure"], result["curves"]):
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size[0] > 300
    out = capsys.readouterr().out
    assert str(tmp_path / "demo" / "demo.png") in out and "summary.md" in out
    summary = (tmp_path / "demo" / "summary.md").read_text()
    assert summary.startswith(result["table"]) and "Evaluator sanity checks" in summary
    # a second demo in the same folder replaces the first one's runs and measures the same (seeded) table
    assert run_demo(tmp_path / "demo", "cpu", tiny)["table"] == result["table"]
