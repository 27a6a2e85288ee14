"""The hippocampus_seg bundle: every config through MONAI's ConfigWorkflow on a tiny synthetic task, the MONAI
bundle tools (verify_metadata offline, verify_net_in_out, ckpt_export), resuming, and failure safety."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out

from amat_monai.checkpoints import file_sha256
from amat_monai.data import DecathlonSliceDataset, make_synthetic_decathlon
from amat_monai.workflows import build_workflow, run_workflow
from conftest import SEG_TINY

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "hippocampus_seg"
CONFIGS = BUNDLE / "configs"
TINY = {**SEG_TINY, "epochs": 1, "device": "$torch.device('cpu')"}


def workflow(names, workflow_type="train", **overrides) -> ConfigWorkflow:
    return build_workflow(BUNDLE, names, workflow_type, **{**TINY, **overrides})


def run(wf: ConfigWorkflow) -> ConfigWorkflow:
    wf.initialize()
    assert not wf.check_properties()
    wf.run()
    wf.finalize()
    return wf


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> str:
    return make_synthetic_decathlon(tmp_path_factory.mktemp("data") / "Task_syn", num_cases=6, seed=0)


@pytest.fixture(scope="module")
def std_run(task, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("std")
    wf = run(workflow(["train.json"], dataset_dir=task, output_dir=str(out)))
    xi_wf = run(workflow(["train.json", "calibrate.json"], "infer", dataset_dir=task, output_dir=str(out)))
    n_train = len(wf.parser.get_parsed_content("train#dataset"))
    return {"out": out, "model": out / "models" / "model.pt", "xi": out / "xi.json", "n_train": n_train,
            "xi_wf": xi_wf}


def test_std_train_workflow(std_run):
    out = std_run["out"]
    assert std_run["model"].is_file() and (out / "models" / "checkpoint_epoch=1.pt").is_file()
    split = json.loads((out / "split.json").read_text())
    assert [len(split[s]) for s in ("training", "validation", "test")] == [4, 1, 1]
    # model.pt is the model-zoo state dict of network_def
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({**TINY, "dataset_dir": std_run["xi_wf"].parser["dataset_dir"]})
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(std_run["model"], weights_only=True))
    full = torch.load(out / "models" / "checkpoint_epoch=1.pt", weights_only=False)
    assert {"network", "optimizer", "trainer"} <= set(full) and "adversarial" not in full


def test_calibrate_workflow_writes_xi(std_run):
    xi = json.loads(std_run["xi"].read_text())
    assert [t["name"] for t in xi["terms"]] == ["dice", "ce"]
    assert all(t["n"] == std_run["n_train"] for t in xi["terms"])  # every clean training slice
    assert xi["xi"] == [t["mean"] for t in xi["terms"]]  # z = 0
    assert xi["checkpoint_sha256"] == file_sha256(std_run["model"])


@pytest.mark.parametrize("method", ["vat", "amat", "teat"])
def test_adversarial_workflows(method, task, std_run, tmp_path):
    extra = {"xi_file": str(std_run["xi"]), "delta": 0.5} if method == "amat" else {"eps": 1.0}
    wf = run(workflow(["train.json", f"{method}.json"], dataset_dir=task, output_dir=str(tmp_path), **extra))
    handler = wf.parser.get_parsed_content("adversarial_handler")
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.has_event_handler(handler, Events.ITERATION_STARTED)
    ckpt = torch.load(tmp_path / "models" / "checkpoint_epoch=1.pt", weights_only=False)
    assert "adversarial" in ckpt
    if method == "amat":
        margins = handler.state_dict()["margins"]
        assert len(handler.table) == std_run["n_train"]
        assert ckpt["adversarial"]["margins"].keys() == margins.keys()
    if method == "teat":
        assert len(ckpt["adversarial"]["ensemble"]) == std_run["n_train"]


def test_evaluate_workflow(task, std_run):
    wf = run(workflow(["train.json", "evaluate.json"], "infer", dataset_dir=task, output_dir=str(std_run["out"])))
    result = json.loads((std_run["out"] / "evaluation.json").read_text())
    assert 0.0 <= result["metrics"]["mean_dice"] <= 1.0
    assert len(result["metrics"]["class_dice"]) == 2
    assert result["num_samples"] == len(wf.parser.get_parsed_content("dataset")) > 0
    assert result["section"] == "test" and result["slices"] == "all_classes"


def test_inference_on_a_volume_matches_the_slice_pipeline(task, std_run, tmp_path):
    ds = DecathlonSliceDataset(task, "training", patch_size=TINY["patch_size"], slices="all")
    image = ds.cases[0]["image"]
    tiny = {k: v for k, v in TINY.items() if k.startswith("network_") or k in ("patch_size", "device")}
    wf = build_workflow(BUNDLE, ["inference.json"], "infer", datalist=[image], checkpoint=str(std_run["model"]),
                        output_dir=str(tmp_path), **tiny)
    run(wf)
    out = nib.load(str(tmp_path / (Path(image).name.replace(".nii.gz", "_seg.nii.gz"))))
    src = nib.load(image)
    pred = np.asarray(out.dataobj)
    assert pred.shape == src.shape and np.allclose(out.affine, src.affine)
    assert set(np.unique(pred)) <= {0, 1, 2}
    # the same network on the training pipeline's slices gives the same labels (the volume fits the patch in y)
    net = wf.parser.get_parsed_content("network").eval()
    items = [it for it in ds.data if it["case"] == ds.cases[0]["case"]]
    with torch.no_grad():
        labels = net(torch.stack([it["image"] for it in items])).argmax(1)  # [Z, 32, 24]
    y, x = src.shape[1], src.shape[0]
    oy, ox = (32 - y) // 2, (24 - x) // 2
    if oy < 0 or ox < 0:
        pytest.skip("volume larger than the patch")
    ref = labels[:, oy : oy + y, ox : ox + x].permute(2, 1, 0).numpy()  # back to (x, y, z)
    assert np.mean(ref == pred) > 0.999


def test_verify_metadata_offline():
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(BUNDLE.parent / "meta_schema.json"))
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background", "1": "anterior", "2": "posterior"}


def test_verify_net_in_out():
    verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"),
                      config_file=str(CONFIGS / "inference.json"), device="cpu", n=7)


def test_ckpt_export_torchscript_matches_state_dict(tmp_path):
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    net = parser.get_parsed_content("network_def").eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(tmp_path / "model.pt"),
                meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "inference.json"))
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.randn(2, 1, 56, 40)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-5)


def test_resume_continues_where_it_stopped(task, std_run, tmp_path):
    common = {"dataset_dir": task, "output_dir": str(tmp_path), "xi_file": str(std_run["xi"]), "delta": 0.5}
    first = run(workflow(["train.json", "amat.json"], **common))
    margins = dict(first.parser.get_parsed_content("adversarial_handler").state_dict()["margins"])
    wf = workflow(["train.json", "amat.json"], resume=True, **{**common, "epochs": 2})
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    handler = wf.parser.get_parsed_content("adversarial_handler")
    seen = {}
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.setdefault(
        "start", (e.state.epoch, dict(handler.state_dict()["margins"]))))
    wf.run()
    epoch_at_start, restored = seen["start"]
    assert epoch_at_start == 2  # epoch 1 was not run again
    assert restored["ids"] == margins["ids"] and len(margins["ids"]) == std_run["n_train"]
    assert torch.equal(restored["margins"], margins["margins"])
    assert trainer.state.epoch == 2 and (tmp_path / "models" / "checkpoint_epoch=2.pt").is_file()


def test_failed_run_keeps_the_good_checkpoint(task, std_run, tmp_path):
    run(workflow(["train.json"], dataset_dir=task, output_dir=str(tmp_path)))
    model = tmp_path / "models" / "model.pt"
    before = {p.name: file_sha256(p) for p in (tmp_path / "models").iterdir()}
    # the run, resumed in the same folder, fails during its first iteration
    boom = "$lambda p, y: (_ for _ in ()).throw(RuntimeError('boom in the middle of training'))"
    with pytest.raises(RuntimeError, match="boom in the middle of training"):
        run_workflow(workflow(["train.json"], dataset_dir=task, output_dir=str(tmp_path), loss=boom, epochs=3,
                              resume=True))
    after = {p.name: file_sha256(p) for p in (tmp_path / "models").iterdir()}
    assert after == before and model.is_file()


def test_missing_xi_for_amat(task, tmp_path):
    missing = tmp_path / "nowhere" / "xi.json"
    with pytest.raises(FileNotFoundError, match=f"ξ file not found: {missing}"):
        run_workflow(workflow(["train.json", "amat.json"], dataset_dir=task, output_dir=str(tmp_path),
                              xi_file=str(missing)))
    assert not (tmp_path / "models" / "model.pt").exists()
