"""Training you can watch: TensorBoard event files from every bundle's training, and MONAI's bundle tracking
(``python -m monai.bundle run ... --tracking mlflow``) into a local MLflow store, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from amat_monai.data import make_synthetic_ceph, make_synthetic_decathlon
from amat_monai.workflows import calibrate, train
from conftest import PROJECT_ROOT, SEG_TINY

SEG = PROJECT_ROOT / "bundles" / "hippocampus_seg"
CEPH = PROJECT_ROOT / "bundles" / "ceph_landmarks"


def _events(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_synthetic_decathlon(tmp_path_factory.mktemp("track") / "Task_track", num_cases=5, seed=7)


def test_amat_training_writes_losses_margins_and_rates_to_tensorboard(task, tmp_path):
    std = train(SEG, "std", task, tmp_path / "std", epochs=1, device="cpu", **SEG_TINY)
    xi = calibrate(SEG, task, tmp_path / "std", std["model"], device="cpu", **SEG_TINY)
    train(SEG, "amat", task, tmp_path / "amat", epochs=2, device="cpu", xi_file=xi, init_checkpoint=std["model"],
          delta=0.5, **SEG_TINY)
    events = _events(tmp_path / "amat" / "tensorboard")
    tags = events.Tags()
    for tag in ("train_loss", "val_mean_dice", "adv/clean_loss", "adv/adversarial_loss", "adv/radius",
                "adv/margin_mean", "adv/grown_rate", "adv/shrunk_rate", "adv/frozen_rate"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in events.Scalars("adv/adversarial_loss")] == [1, 2]
    rates = [sum(events.Scalars(f"adv/{k}_rate")[i].value for k in ("grown", "shrunk", "frozen")) for i in range(2)]
    assert rates == pytest.approx([1.0, 1.0])  # every update of an epoch has one outcome
    histograms = events.Histograms("adv/margins")
    assert [h.step for h in histograms] == [1, 2]
    history = json.loads((tmp_path / "amat" / "margins.json").read_text())
    final = history["samples"]["margins_per_epoch"][-1]
    assert histograms[-1].histogram_value.num == len(final)  # one entry per training slice
    assert histograms[-1].histogram_value.max == pytest.approx(max(final), abs=1e-3)
    assert events.Scalars("adv/margin_mean")[-1].value == pytest.approx(history["epochs"][-1]["margins"]["mean"], abs=1e-4)


def test_std_training_writes_loss_and_validation_but_no_adversarial_statistics(task, tmp_path):
    train(SEG, "std", task, tmp_path / "std", epochs=1, device="cpu", **SEG_TINY)
    tags = _events(tmp_path / "std" / "tensorboard").Tags()
    assert {"train_loss", "val_mean_dice"} <= set(tags["scalars"])
    assert not [t for t in tags["scalars"] if t.startswith("adv/")] and not tags["histograms"]


def test_tensorboard_can_be_turned_off(task, tmp_path):
    train(SEG, "std", task, tmp_path / "std", epochs=1, device="cpu", tensorboard=False, **SEG_TINY)
    assert not (tmp_path / "std" / "tensorboard").exists()


def test_ceph_training_writes_tensorboard_events(tmp_path):
    from test_ceph_bundle import TINY as CEPH_TINY

    data = make_synthetic_ceph(tmp_path / "ceph", num_train=4, num_test=2, seed=3)
    train(CEPH, "vat", data, tmp_path / "vat", epochs=1, device="cpu", eps=0.5, **CEPH_TINY)
    tags = _events(tmp_path / "vat" / "tensorboard").Tags()
    assert {"train_loss", "adv/clean_loss", "adv/adversarial_loss", "adv/radius"} <= set(tags["scalars"])
    radius = _events(tmp_path / "vat" / "tensorboard").Scalars("adv/radius")
    assert [r.value for r in radius] == pytest.approx([0.5])  # VAT attacks every sample at ε


def test_monai_bundle_run_with_mlflow_tracking_logs_to_a_local_store(task, tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="the [mlflow] extra is not installed")
    out = tmp_path / "run"
    overrides = []
    for key, value in {**SEG_TINY, "epochs": 1}.items():
        overrides += [f"--{key}", str(value)]  # Python literals, as `fire` (MONAI's command line) reads them
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "['configs/train.json','configs/vat.json']",
           "--tracking", "mlflow", "--dataset_dir", str(task), "--output_dir", str(out), "--device",
           "$torch.device('cpu')", "--eps", "0.5", *overrides]
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI="")
    bundle = tmp_path / "hippocampus_seg"  # a copy: MLflow leaves an empty ./mlruns (its Default experiment) in the cwd
    shutil.copytree(SEG / "configs", bundle / "configs")
    done = subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "mlruns.db").is_file() and (out / "tensorboard").is_dir()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("hippocampus_seg")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert {"train_loss", "val_mean_dice", "adv/clean_loss", "adv/adversarial_loss", "adv/radius"} <= set(run.data.metrics)
    assert run.data.metrics["adv/radius"] == pytest.approx(0.5)
