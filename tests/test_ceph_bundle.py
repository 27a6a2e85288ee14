"""The ceph_landmarks bundle: data loading, every config as a MONAI ConfigWorkflow, and a real-data smoke run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from amat_monai.data.ceph import ceph_datalist, make_synthetic_ceph, read_landmarks_csv, read_split
from amat_monai.landmarks import LandmarkDecoder
from amat_monai.workflows import build_workflow, calibrate, evaluate_clean, run_workflow, train

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "ceph_landmarks"
# a tiny network on a small grid keeps every run to a second or two on 2 CPU cores
TINY = {"image_size": [48, 40], "radius": 3.0, "features": [4, 4, 8, 8, 16, 4], "batch_size": 2, "validate_max_cases": 2,
        "validate_split": "test1", "test_split": "test1"}  # the synthetic test1 is too small to split


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_synthetic_ceph(tmp_path_factory.mktemp("ceph") / "data", num_train=4, num_test=2, seed=1)


def test_synthetic_data_has_the_real_layout(synthetic):
    assert sorted(p.name for p in synthetic.iterdir()) == [
        "README.md", "images", "landmarks_junior.csv", "landmarks_senior.csv", "meta.json", "test1.txt", "train.txt",
    ]
    assert read_split(synthetic, "train") == ["001", "002", "003", "004"]
    assert read_split(synthetic, "train[:1]") == ["001"] and read_split(synthetic, "train[1:]") == ["002", "003", "004"]
    assert read_split(synthetic, "train[-2:]") == ["003", "004"]
    with pytest.raises(ValueError, match=r"train\[9:\]"):
        read_split(synthetic, "train[9:]")
    items = ceph_datalist(synthetic, "test1")
    assert [i["sample_id"] for i in items] == ["005", "006"]
    senior, junior = (read_landmarks_csv(synthetic / f"landmarks_{a}.csv")["005"] for a in ("senior", "junior"))
    np.testing.assert_allclose(items[0]["landmarks"], (senior + junior) / 2, atol=1e-3)
    assert items[0]["landmarks"].shape == (19, 2) and items[0]["original_size"].tolist() == [2400, 1935]
    assert ceph_datalist(synthetic, "train", max_cases=2)[-1]["sample_id"] == "002"


def test_loader_errors_name_the_file(synthetic, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ceph_datalist(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="test2.txt"):
        ceph_datalist(synthetic, "test2")
    bad = tmp_path / "landmarks_senior.csv"
    bad.write_text("image,x1,y1\n001,3,oops\n")
    with pytest.raises(ValueError, match=r"landmarks_senior.csv, line 2"):
        read_landmarks_csv(bad)


def test_preprocessing_puts_targets_on_the_bright_structures(synthetic):
    """End to end through the bundle's transforms: PNG -> 200×160 image in [-1, 1] -> targets whose decoded
    landmarks map back to the CSV coordinates, and whose disc centres sit on the synthetic blobs."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser["dataset_dir"] = str(synthetic)
    parser["max_cases"] = 2
    item = parser.get_parsed_content("train#dataset")[0]
    image, label = item["image"], item["label"]
    assert image.shape == (3, 200, 160) and label.shape == (57, 200, 160)
    assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert item["sample_id"] == "001"
    back = LandmarkDecoder(10.0, heatmap_activation=None)(label[None].float(), {"original_size": torch.tensor([[2400, 1935]])})
    np.testing.assert_allclose(back[0].numpy(), item["landmarks"], atol=0.2)
    for k in range(19):  # the image is brightest near each landmark's disc centre
        peak = torch.nonzero(label[k] == label[k].max())[0]
        y, x = int(peak[0]), int(peak[1])
        window = image[0, max(0, y - 1) : y + 2, max(0, x - 1) : x + 2]
        assert float(window.max()) > float(image[0].median()) + 0.3


def test_every_config_runs_on_synthetic_data(synthetic, tmp_path):
    out = tmp_path / "runs"
    paths = train(BUNDLE, "std", synthetic, out / "std", epochs=1, val_interval=1, **TINY)
    assert Path(paths["model"]).is_file()
    xi_file = calibrate(BUNDLE, synthetic, out / "std", paths["model"], **TINY)
    xi = json.loads(Path(xi_file).read_text())
    assert [t["name"] for t in xi["terms"]] == ["heatmap", "offset_x", "offset_y"]
    assert xi["terms"][0]["z"] == 2.0 and xi["terms"][0]["n"] == 4
    assert all(t["xi"] == pytest.approx(t["mean"] + 2 * t["std"]) for t in xi["terms"])
    ev = evaluate_clean(BUNDLE, synthetic, out / "std", paths["model"], **TINY)
    assert set(ev["metrics"]) == {"mre_mm", "sdr_2mm", "sdr_2.5mm", "sdr_3mm", "sdr_4mm"}
    assert ev["num_samples"] == 2 and ev["metrics"]["mre_mm"] > 0
    for method, extra in (("vat", {"eps": 1.0}), ("amat", {"xi_file": xi_file}), ("teat", {"eps": 1.0})):
        p = train(BUNDLE, method, synthetic, out / method, epochs=1, attack_steps=2, val_interval=1, **TINY, **extra)
        state = torch.load(next(Path(p["ckpt_dir"]).glob("checkpoint_epoch=*.pt")), weights_only=False)
        assert "adversarial" in state
        if method == "amat":
            margins = state["adversarial"]["margins"]
            assert sorted(margins["ids"]) == ["001", "002", "003", "004"]  # one margin per training image

    robust = build_workflow(
        BUNDLE, ["train.json", "robust_evaluate.json"], "infer", dataset_dir=str(synthetic),
        output_dir=str(out / "robust"), checkpoint=paths["model"], **{"robust#steps": [2, 2], "robust#sanity_steps": 1},
        **TINY,
    )
    run_workflow(robust)
    report = json.loads((out / "robust" / "robustness.json").read_text())
    cells = {(r["attack"], r["eps"]) for r in report["results"]}
    assert {("pgd", 0.5), ("pgd", 1.0), ("pgd", 2.0), ("ifgsm", 2.0)} <= cells

    infer = ConfigWorkflow(
        config_file=str(BUNDLE / "configs" / "inference.json"), meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=False, workflow_type="infer", bundle_root=str(BUNDLE), dataset_dir=str(synthetic),
        output_dir=str(out / "infer"), checkpoint=paths["model"], image_size=TINY["image_size"], radius=TINY["radius"],
        features=TINY["features"],
    )
    infer.initialize()
    assert not infer.check_properties()
    infer.run()
    result = json.loads((out / "infer" / "001_landmarks.json").read_text())
    assert len(result["landmarks"]) == 19 and result["landmarks"][0]["name"] == "sella"
    assert result["original_size"] == [2400, 1935] and result["spacing_mm"] == 0.1


def test_metadata_follows_monai_label_needs():
    import jsonschema

    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    jsonschema.validate(meta, json.loads((BUNDLE.parent / "meta_schema.json").read_text()))
    fmt = meta["network_data_format"]
    assert list(fmt["inputs"]) == ["image"] and list(fmt["outputs"]) == ["pred"]
    assert all(k.isdigit() for k in fmt["outputs"]["pred"]["channel_def"])  # MONAI Label reads int(k)
    inference = json.loads((BUNDLE / "configs" / "inference.json").read_text())
    assert {"network_def", "preprocessing", "postprocessing", "inferer"} <= set(inference)
    assert "detection" not in BUNDLE.name  # MONAI Label would pick a box writer


@pytest.mark.realdata
def test_real_images_smoke(amat_data_dir, tmp_path):
    data = amat_data_dir / "isbi2015_ceph"
    if not data.is_dir():
        pytest.skip(f"ISBI 2015 data not found at {data}")
    items = ceph_datalist(data, "train", max_cases=3)
    assert [i["sample_id"] for i in items] == ["001", "002", "003"]
    assert len(read_split(data, "test1")) == 150
    val, test = read_split(data, "test1[:50]"), read_split(data, "test1[50:]")  # the bundle's splits
    assert len(val) == 50 and len(test) == 100 and not set(val) & set(test)
    wf = build_workflow(
        BUNDLE, ["train.json"], "train", dataset_dir=str(data), output_dir=str(tmp_path / "std"), max_cases=2,
        epochs=1, val_interval=1, validate_max_cases=2, features=[4, 4, 8, 8, 16, 4], batch_size=2,
    )
    run_workflow(wf)
    item = wf.parser.get_parsed_content("train#dataset")[0]
    assert item["image"].shape == (3, 200, 160) and item["label"].shape == (57, 200, 160)
    back = LandmarkDecoder(10.0, heatmap_activation=None)(item["label"][None].float(), {"original_size": torch.tensor([[2400, 1935]])})
    np.testing.assert_allclose(back[0].numpy(), item["landmarks"], atol=0.2)  # original pixels
    assert (tmp_path / "std" / "models" / "model.pt").is_file()


@pytest.mark.parametrize(
    "xi, expected",
    [
        ([1e9, 1e9, 1e9], 0.6),  # every term under its threshold: every margin expands, Δ -> 2Δ
        ([1e9, 1e9, -1.0], 0.3),  # offset-y above its threshold: no expansion (the shrink is floored at Δ)
        ([-1.0, 1e9, 1e9], 0.3),  # heatmap above its threshold: no expansion
    ],
)
def test_amat_expands_a_margin_only_when_all_three_terms_are_under_xi(synthetic, tmp_path, xi, expected):
    xi_file = tmp_path / "xi.json"
    xi_file.write_text(json.dumps({"xi": xi}))
    p = train(BUNDLE, "amat", synthetic, tmp_path / "amat", epochs=1, attack_steps=2, xi_file=str(xi_file),
              delta=0.3, amat_condition="terms", amat_xi_follows_model=False, **{**TINY, "val_interval": 5})
    state = torch.load(next(Path(p["ckpt_dir"]).glob("checkpoint_epoch=*.pt")), weights_only=False)
    margins = state["adversarial"]["margins"]["margins"]
    assert len(margins) == 4
    torch.testing.assert_close(margins, torch.full((4,), expected, dtype=margins.dtype))
