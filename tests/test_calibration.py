import hashlib
import json

import pytest
import torch
from monai.engines import SupervisedEvaluator
from monai.networks.nets import UNet
from torch.utils.data import DataLoader

from amat_monai.calibration import compute_xi, huber_location_scale, load_xi, write_xi
from amat_monai.handlers import XiCalibrationHandler
from amat_monai.losses import SegmentationLoss


def test_xi_from_a_known_list_of_losses():
    (term,) = compute_xi(torch.tensor([1.0, 2.0, 3.0, 4.0]), z=0.0)
    assert term["n"] == 4 and term["mean"] == 2.5 and term["xi"] == 2.5
    (term,) = compute_xi(torch.tensor([1.0, 2.0, 3.0, 4.0]), z=2.0)
    assert term["std"] == pytest.approx(1.2909944487)  # sample standard deviation, ddof = 1
    assert term["xi"] == pytest.approx(2.5 + 2 * 1.2909944487)


def test_one_xi_per_term_with_names():
    losses = torch.tensor([[0.1, 1.0, 5.0], [0.3, 3.0, 5.0], [0.2, 2.0, 5.0]])
    terms = compute_xi(losses, z=1.0, term_names=["heatmap", "offset_x", "offset_y"])
    assert [t["name"] for t in terms] == ["heatmap", "offset_x", "offset_y"]
    assert [t["xi"] for t in terms] == pytest.approx([0.3, 3.0, 5.0])


def test_huber_estimate_solves_its_estimating_equation_and_resists_outliers():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0], dtype=torch.float64)
    location, scale = huber_location_scale(values)
    assert scale == pytest.approx(1.4826)  # normalised MAD: median |v - 3| = 1
    psi = ((values - location) / scale).clamp(-1.345, 1.345)
    assert float(psi.sum()) == pytest.approx(0.0, abs=1e-9)
    assert location == pytest.approx(3.0)  # the mean (22) follows the outlier; the clipped residuals balance at 3
    (term,) = compute_xi(values, z=1.0, estimator="huber")
    assert term["xi"] == pytest.approx(location + scale)


@pytest.mark.parametrize(
    "losses, match", [(torch.tensor([1.0]), "at least 2"), (torch.tensor([1.0, float("nan")]), "non-finite")]
)
def test_bad_losses(losses, match):
    with pytest.raises(ValueError, match=match):
        compute_xi(losses)


def test_xi_file_round_trip_with_checkpoint_hash(tmp_path):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights")
    content = write_xi(tmp_path / "xi.json", compute_xi(torch.tensor([[1.0, 2.0], [3.0, 4.0]])), ckpt)
    assert content["checkpoint_sha256"] == hashlib.sha256(b"weights").hexdigest()
    on_disk = json.loads((tmp_path / "xi.json").read_text())
    assert on_disk == content and on_disk["xi"] == [2.0, 3.0]
    torch.testing.assert_close(load_xi(tmp_path / "xi.json"), torch.tensor([2.0, 3.0], dtype=torch.float64))
    assert load_xi([0.5, 1.0]).tolist() == [0.5, 1.0]


def test_load_xi_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_xi(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        load_xi(tmp_path / "broken.json")
    (tmp_path / "nan.json").write_text('{"xi": [NaN]}')
    with pytest.raises(ValueError, match="nan.json"):
        load_xi(tmp_path / "nan.json")


def test_calibration_handler_on_an_evaluator_matches_the_losses(tmp_path):
    net = UNet(2, 1, 3, (8, 16), (2,), num_res_units=0, norm="instance").eval()
    items = [{"image": torch.randn(1, 16, 16), "label": torch.randint(0, 3, (1, 16, 16))} for _ in range(6)]
    loss = SegmentationLoss()
    handler = XiCalibrationHandler(loss, tmp_path / "xi.json", z=0.0)
    evaluator = SupervisedEvaluator(
        device="cpu", val_data_loader=DataLoader(items, batch_size=4), network=net, val_handlers=[handler], decollate=False
    )
    evaluator.run()
    with torch.no_grad():
        expected = loss(net(torch.stack([i["image"] for i in items])), torch.stack([i["label"] for i in items]))
    xi = json.loads((tmp_path / "xi.json").read_text())
    assert [t["name"] for t in xi["terms"]] == ["dice", "ce"] and xi["terms"][0]["n"] == 6
    assert xi["xi"] == pytest.approx(expected.mean(0).tolist(), rel=1e-5)


def test_calibration_writes_total_metric_and_feasibility(tmp_path):
    from amat_monai.metrics import PresentClassDice

    torch.manual_seed(0)
    net = UNet(2, 1, 3, (8, 16), (2,), num_res_units=0, norm="instance").eval()
    items = [{"image": torch.randn(1, 16, 16), "label": torch.randint(0, 3, (1, 16, 16))} for _ in range(6)]
    loss = SegmentationLoss()
    handler = XiCalibrationHandler(loss, tmp_path / "xi.json", condition_metric=PresentClassDice(),
                                   metric_quantile=0.5, feasibility_eps=[0.0, 0.5], attack_steps=2)
    evaluator = SupervisedEvaluator(
        device="cpu", val_data_loader=DataLoader(items, batch_size=4), network=net, val_handlers=[handler], decollate=False
    )
    evaluator.run()
    x, y = torch.stack([i["image"] for i in items]), torch.stack([i["label"] for i in items])
    with torch.no_grad():
        pred = net(x)
    terms, dice = loss(pred, y).double(), PresentClassDice()(pred, y).double()
    xi = json.loads((tmp_path / "xi.json").read_text())
    assert xi["total"]["xi"] == pytest.approx(float(terms.sum(1).mean()), rel=1e-5)
    assert xi["metric"]["name"] == "dice_present" and xi["metric"]["xi"] == pytest.approx(float(dice.quantile(0.5)), rel=1e-5)
    f = xi["feasibility"]
    assert f["eps"] == [0.0, 0.5] and f["attack_steps"] == 2
    assert f["terms"][0] == pytest.approx(float((terms < torch.tensor(xi["xi"], dtype=torch.float64)).all(1).double().mean()))
    assert f["total"][0] == pytest.approx(float((terms.sum(1) < xi["total"]["xi"]).double().mean()))
    assert f["metric"][0] == pytest.approx(float((dice > xi["metric"]["xi"]).double().mean()))
    assert all(0.0 <= v <= 1.0 for k in ("terms", "total", "metric") for v in f[k])
