"""The bccd_detection bundle: preprocessing of boxes, every config as a MONAI ConfigWorkflow, the AMAT metric
condition on per-image mAP, and a real-data smoke run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from amat_monai.data.voc import make_synthetic_voc, voc_datalist
from amat_monai.workflows import build_workflow, calibrate, evaluate_clean, run_workflow, train

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "bccd_detection"
# a tiny network keeps every run to a few seconds on 2 CPU cores (synthetic images are 160×120, 80×60 once zoomed)
TINY = {"widths": [4, 8, 8, 16], "fpn_channels": 8, "batch_size": 2}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_synthetic_voc(tmp_path_factory.mktemp("bccd") / "data", num_images=8, seed=2)


def test_preprocessing_zooms_image_and_boxes_together(synthetic):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser["dataset_dir"] = str(synthetic)
    item = parser.get_parsed_content("validate#dataset")[0]
    raw = voc_datalist(synthetic, "val")[0]
    image, label = item["image"], item["label"]
    assert image.shape == (3, 80, 60)  # x first (MONAI's PILReader), zoomed by 0.5
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    n = len(raw["labels"])
    assert label.shape == (64, 5) and (label[n:, 4] == -1).all()  # padded to max_boxes rows
    np.testing.assert_allclose(label[:n, :4].numpy(), raw["boxes"] * 0.5, atol=1e-5)
    np.testing.assert_array_equal(label[:n, 4].numpy(), raw["labels"])
    # the first box is a disc of the synthetic image: its centre pixel is darker than the pale background
    x1, y1, x2, y2 = label[0, :4].tolist()
    centre = image[:, int((x1 + x2) / 2), int((y1 + y2) / 2)]
    assert float(centre.mean()) < float(image[:, 0, 0].mean()) - 0.1


def test_every_config_runs_on_synthetic_boxes(synthetic, tmp_path):
    out = tmp_path / "runs"
    paths = train(BUNDLE, "std", synthetic, out / "std", epochs=1, val_interval=1, **TINY)
    assert Path(paths["model"]).is_file()
    xi_file = calibrate(BUNDLE, synthetic, out / "std", paths["model"], **TINY)
    xi = json.loads(Path(xi_file).read_text())
    assert [t["name"] for t in xi["terms"]] == ["box_regression", "cls_foreground", "cls_background"]
    assert xi["terms"][0]["n"] == 4 and xi["metric"]["name"] == "map" and xi["metric"]["quantile"] == 0.03
    ev = evaluate_clean(BUNDLE, synthetic, out / "std", paths["model"], **TINY)
    assert set(ev["metrics"]) == {"map", "map50", "map75", "map_RBC", "map_WBC", "map_Platelets"}
    assert ev["num_samples"] == 2 and 0.0 <= ev["metrics"]["map"] <= 1.0
    for method, extra in (("vat", {"eps": 1.0}), ("amat", {"xi_file": xi_file}), ("teat", {"eps": 1.0})):
        p = train(BUNDLE, method, synthetic, out / method, epochs=1, attack_steps=2, val_interval=1, **TINY, **extra)
        state = torch.load(next(Path(p["ckpt_dir"]).glob("checkpoint_epoch=*.pt")), weights_only=False)
        assert "adversarial" in state
        if method == "amat":
            assert sorted(state["adversarial"]["margins"]["ids"]) == [f"Synthetic_{i:05d}" for i in range(4)]

    robust = build_workflow(
        BUNDLE, ["train.json", "robust_evaluate.json"], "infer", dataset_dir=str(synthetic),
        output_dir=str(out / "robust"), checkpoint=paths["model"], **{"robust#steps": [2, 2], "robust#sanity_steps": 1},
        **TINY,
    )
    run_workflow(robust)
    report = json.loads((out / "robust" / "robustness.json").read_text())
    assert report["metric"] == "map" and {"map50", "map_WBC"} <= set(report["clean_metrics"])
    assert {(r["attack"], r["eps"]) for r in report["results"]} >= {("pgd", 5.0), ("pgd", 15.0), ("ifgsm", 10.0)}

    infer = ConfigWorkflow(
        config_file=str(BUNDLE / "configs" / "inference.json"), meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=False, workflow_type="infer", bundle_root=str(BUNDLE), dataset_dir=str(synthetic),
        output_dir=str(out / "infer"), checkpoint=paths["model"], score_thresh=0.0, **{k: TINY[k] for k in ("widths", "fpn_channels")},
    )
    infer.initialize()
    assert not infer.check_properties()
    infer.run()
    result = json.loads((out / "infer" / "Synthetic_00000_boxes.json").read_text())
    assert len(result["boxes"]) == 100 and {"label", "name", "score", "x1", "y1", "x2", "y2"} == set(result["boxes"][0])
    # in the original 160×120 pixels (the network saw 80×60)
    assert max(b["x2"] for b in result["boxes"]) > 80 and all(b["x2"] <= 160 and b["y2"] <= 120 for b in result["boxes"])


@pytest.mark.parametrize("threshold, expected", [(-1.0, 2.0), (2.0, 1.0)])
def test_amat_expands_a_margin_only_when_the_image_map_beats_xi(synthetic, tmp_path, threshold, expected):
    # per-image mAP lies in [0, 1]: above -1 always (every margin grows by Δ), above 2 never (margins stay at Δ)
    xi_file = tmp_path / "xi.json"
    xi_file.write_text(json.dumps({"xi": [1.0, 1.0, 1.0], "terms": [{"name": n, "xi": 1.0} for n in ("box_regression", "cls_foreground",
                                                                              "cls_background")],
                                   "metric": {"name": "map", "xi": threshold, "higher_is_better": True}}))
    p = train(BUNDLE, "amat", synthetic, tmp_path / "amat", epochs=1, attack_steps=2, xi_file=str(xi_file), delta=1.0,
              val_interval=5, **TINY)
    state = torch.load(next(Path(p["ckpt_dir"]).glob("checkpoint_epoch=*.pt")), weights_only=False)
    margins = state["adversarial"]["margins"]["margins"]
    torch.testing.assert_close(margins, torch.full((4,), expected, dtype=margins.dtype))


def test_metadata_follows_monai_label_needs():
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert list(fmt["inputs"]) == ["image"] and list(fmt["outputs"]) == ["pred"]
    assert all(k.isdigit() for k in fmt["outputs"]["pred"]["channel_def"])
    inference = json.loads((BUNDLE / "configs" / "inference.json").read_text())
    decoder = inference["postprocessing"]["transforms"][0]
    assert decoder["_target_"].endswith("DetectBoxesd") and decoder["classes"] == "@classes"
    train_cfg = json.loads((BUNDLE / "configs" / "train.json").read_text())
    for key in ("zoom", "widths", "fpn_channels", "base_anchor_shapes", "nms_thresh", "intensity_range"):
        assert inference[key] == train_cfg[key], key  # served as trained


@pytest.mark.realdata
def test_real_images_smoke(amat_data_dir, tmp_path):
    data = amat_data_dir / "BCCD"
    if not data.is_dir():
        pytest.skip(f"BCCD not found at {data}")
    wf = build_workflow(
        BUNDLE, ["train.json"], "train", dataset_dir=str(data), output_dir=str(tmp_path / "std"), max_cases=2,
        epochs=1, val_interval=1, validate_max_cases=2, **TINY,
    )
    run_workflow(wf)
    item = wf.parser.get_parsed_content("train#dataset")[0]
    raw = voc_datalist(data, "train", max_cases=1)[0]
    assert item["image"].shape == (3, 320, 240) and raw["image_size"] == [480, 640]
    n = len(raw["labels"])
    assert (item["label"][:n, 4] >= 0).all() and (item["label"][n:, 4] == -1).all()
    assert (tmp_path / "std" / "models" / "model.pt").is_file()
