import json
import math

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.networks.nets import UNet
from torch.utils.data import DataLoader

from amat_monai.conditions import TotalLossCondition
from amat_monai.handlers import AdaptiveMarginHandler, FixedMarginHandler, TemporalEnsemblingHandler
from amat_monai.handlers.temporal_ensembling import teat_weight
from amat_monai.losses import MeanLoss, SegmentationLoss

TERMS = SegmentationLoss()


def _items(n: int = 8):
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        label = torch.zeros(1, 16, 16, dtype=torch.long)
        label[:, 4:10, 3 + i % 4 : 9 + i % 4] = 1
        label[:, 10:13, 5:11] = 2
        image = label.float() + 0.3 * torch.randn(1, 16, 16, generator=g)
        items.append({"image": image, "label": label, "sample_id": f"case{i // 4}:{i % 4}"})
    return items


def _trainer(handler, epochs=1, lr=1e-3, network=None, epoch_length=None, items=None):
    network = network or UNet(2, 1, 3, (8, 16), (2,), num_res_units=0, norm="instance")
    loader = DataLoader(items or _items(), batch_size=4, shuffle=False)
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=loader,
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=lr),
        loss_function=MeanLoss(TERMS),
        train_handlers=[handler],
        epoch_length=epoch_length,
        decollate=False,
    )
    return trainer, network


def test_fixed_margin_trains_on_clean_and_adversarial_halves():
    handler = FixedMarginHandler(TERMS, eps=1.0, steps=2)
    trainer, net = _trainer(handler, lr=0.0)  # lr 0: the weights stay those the loss was computed with
    trainer.run()
    out, cur = trainer.state.output, handler.current
    assert out["image"].shape[0] == 8 and torch.equal(out["image"][:4], cur.x) and torch.equal(out["image"][4:], cur.x_adv)
    torch.testing.assert_close(cur.margins, torch.full((4,), 1.0))
    net.train()
    with torch.no_grad():
        expected = 0.5 * MeanLoss(TERMS)(net(cur.x), cur.y) + 0.5 * MeanLoss(TERMS)(net(cur.x_adv), cur.y)
    torch.testing.assert_close(out["loss"].detach(), expected)


def test_amat_changes_exactly_the_margins_of_the_batch():
    handler = AdaptiveMarginHandler(TERMS, xi=[100.0, 100.0], delta=0.5, steps=2)  # huge xi: every sample expands
    for i, item in enumerate(_items()):
        handler.table.set([item["sample_id"]], torch.tensor([1.0 + i]))
    trainer, _ = _trainer(handler, epoch_length=1)
    trainer.run()  # one batch: the first four samples
    margins = handler.table.as_dict()
    assert margins == {f"case{i // 4}:{i % 4}": 1.0 + i + (0.5 if i < 4 else 0.0) for i in range(8)}


def test_amat_shrink_rules_on_a_batch_that_always_fails():
    for kwargs, expected in (({"shrink": "step"}, 1.5), ({"boundary": "bisect"}, 1.0), ({}, 1.0),
                             ({"shrink": "none"}, 2.0)):
        # xi = 0: the clean input already violates, so the boundary is the clean input (norm 0)
        handler = AdaptiveMarginHandler(TERMS, xi=[0.0, 0.0], delta=0.5, steps=2, freeze_clean_failures=False,
                                        **kwargs)
        handler.table.set([f"case0:{i}" for i in range(4)], torch.full((4,), 2.0))
        trainer, _ = _trainer(handler, epoch_length=1)
        trainer.run()
        assert handler.table.as_dict() == {f"case0:{i}": expected for i in range(4)}, kwargs


def test_amat_keeps_the_margin_of_a_sample_that_fails_on_its_clean_input(tmp_path):
    # xi = 0: every sample fails clean, so no margin moves (by default), and the history says so
    history = tmp_path / "margins.json"
    handler = AdaptiveMarginHandler(TERMS, xi=[0.0, 0.0], delta=0.5, steps=2, history_path=history)
    handler.table.set([f"case0:{i}" for i in range(4)], torch.full((4,), 2.0))
    trainer, _ = _trainer(handler, epoch_length=1)
    trainer.run()
    assert handler.table.as_dict() == {f"case0:{i}": 2.0 for i in range(4)}
    report = json.loads(history.read_text())
    assert report["epochs"][0]["outcomes"] == {"grown": 0, "shrunk": 0, "frozen": 4}
    assert report["samples"]["last_outcome"] == ["frozen"] * 4
    assert report["samples"]["mean_training_radius"] == [2.0] * 4


def test_interpolated_and_bisected_boundaries_agree_on_a_real_network():
    # a threshold between the clean and the attacked loss: the samples cross inside the ball; both boundary
    # searches land between 0 and the margin, and the interpolated one within a bisection's reach of it
    results = {}
    for boundary in ("interpolate", "bisect"):
        torch.manual_seed(0)
        handler = AdaptiveMarginHandler(TERMS, xi=[100.0, 100.0], delta=0.5, steps=8, boundary=boundary,
                                        bisect_steps=12, random_start=False)
        trainer, net = _trainer(handler, epoch_length=1, lr=0.0)
        with torch.no_grad():
            x = torch.stack([i["image"] for i in _items()[:4]])
            y = torch.stack([i["label"] for i in _items()[:4]])
            clean = TERMS(net.train()(x), y).sum(1)
        handler.condition = TotalLossCondition(float(clean.max()) + 0.05)
        handler.table.set([f"case0:{i}" for i in range(4)], torch.full((4,), 3.0))
        trainer.run()
        results[boundary] = torch.tensor(list(handler.table.as_dict().values()))
    assert ((results["bisect"] > 0.5) & (results["bisect"] < 3.0)).all()
    torch.testing.assert_close(results["interpolate"], results["bisect"], atol=0.15, rtol=0)


def test_geometric_growth_is_capped():
    handler = AdaptiveMarginHandler(TERMS, xi=[100.0, 100.0], delta=0.5, steps=1, growth="geometric",
                                    growth_factor=2.0, eps_max=3.0)
    handler.table.set([f"case0:{i}" for i in range(4)], torch.tensor([0.5, 1.0, 1.4, 2.0]))
    trainer, _ = _trainer(handler, epoch_length=1)
    trainer.run()
    assert list(handler.table.as_dict().values()) == pytest.approx([1.0, 2.0, 2.8, 3.0])


def test_amat_condition_terms_choose_which_thresholds_count():
    # term 0 always passes (xi 100), term 1 always fails (xi 0): testing term 0 alone expands every margin,
    # testing term 1 alone (or both, the default) shrinks them halfway to the clean input
    for terms, expected in (([0], 2.5), ([1], 1.0), (None, 1.0)):
        handler = AdaptiveMarginHandler(TERMS, xi=[100.0, 0.0], delta=0.5, steps=2, condition_terms=terms,
                                        freeze_clean_failures=False)
        handler.table.set([f"case0:{i}" for i in range(4)], torch.full((4,), 2.0))
        trainer, _ = _trainer(handler, epoch_length=1)
        trainer.run()
        assert handler.table.as_dict() == {f"case0:{i}": expected for i in range(4)}, terms
    for bad in ([], [2], [-1]):
        with pytest.raises(ValueError, match="condition_terms"):
            AdaptiveMarginHandler(TERMS, xi=[1.0, 1.0], delta=0.5, condition_terms=bad)


def test_amat_margins_grow_from_delta_and_stay_in_range():
    handler = AdaptiveMarginHandler(TERMS, xi=[0.6, 0.8], delta=0.25, steps=3, eps_max=1.0)
    trainer, _ = _trainer(handler, epochs=3)
    trainer.run()
    values = torch.tensor(list(handler.table.as_dict().values()))
    assert len(values) == 8
    assert (values >= 0.25).all() and (values <= 1.0).all()


def test_amat_rejects_a_loss_with_another_number_of_terms():
    # refused when the handler is built, before any training iteration
    with pytest.raises(ValueError, match=r"xi holds 1 thresholds but the loss has 2 terms \['dice', 'ce'\]"):
        AdaptiveMarginHandler(TERMS, xi=[0.5], delta=0.5, steps=1)


def test_missing_sample_id_is_a_clear_error():
    handler = FixedMarginHandler(TERMS, eps=1.0, steps=1)
    trainer, _ = _trainer(handler, items=[{k: v for k, v in it.items() if k != "sample_id"} for it in _items()])
    with pytest.raises(KeyError, match="sample_id"):
        trainer.run()


@pytest.mark.parametrize("bad", [{"delta": 0.0}, {"delta": 1.0, "eps_max": 0.5}, {"delta": 1.0, "shrink": "x"},
                                 {"delta": 1.0, "growth": "x"}, {"delta": 1.0, "boundary": "x"},
                                 {"delta": 1.0, "growth": "geometric", "growth_factor": 1.0},
                                 {"delta": 1.0, "condition": "metric"}])
def test_amat_bad_settings(bad):
    with pytest.raises(ValueError):
        AdaptiveMarginHandler(TERMS, xi=[1.0, 1.0], **bad)


def test_missing_xi_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        AdaptiveMarginHandler(TERMS, xi=str(tmp_path / "nope.json"), delta=0.5)


def test_checkpoint_restores_margins_and_the_next_iteration(tmp_path):
    def make():
        torch.manual_seed(0)
        handler = AdaptiveMarginHandler(TERMS, xi=[0.6, 0.8], delta=0.25, steps=2)
        network = UNet(2, 1, 3, (8, 16), (2,), num_res_units=0, norm="instance")
        return handler, network

    handler, network = make()
    trainer, _ = _trainer(handler, epochs=3, network=network)
    save_dict = {"network": network, "optimizer": trainer.optimizer, "trainer": trainer, "amat": handler}
    CheckpointSaver(str(tmp_path), save_dict, save_final=False, save_interval=1, n_saved=None).attach(trainer)
    stop_after_two = trainer.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda e: e.terminate())
    trainer.run()
    stop_after_two.remove()
    saved_margins = handler.table.as_dict()
    ckpt = sorted(tmp_path.glob("*epoch=2.pt"))
    assert ckpt, list(tmp_path.iterdir())

    # continue the original run for one more epoch with a fixed seed ...
    torch.manual_seed(123)
    trainer.run()
    continued, continued_weights = handler.table.as_dict(), [p.detach().clone() for p in network.parameters()]

    # ... and a fresh run resumed from the epoch-2 checkpoint with the same seed
    handler2, network2 = make()
    trainer2, _ = _trainer(handler2, epochs=3, network=network2)
    save_dict2 = {"network": network2, "optimizer": trainer2.optimizer, "trainer": trainer2, "amat": handler2}
    CheckpointLoader(str(ckpt[0]), save_dict2, map_location="cpu").attach(trainer2)
    trainer2.add_event_handler(Events.STARTED, lambda e: torch.manual_seed(123))
    restored = {}
    trainer2.add_event_handler(Events.STARTED, lambda e: restored.update(handler2.table.as_dict()))
    trainer2.run()
    assert restored == saved_margins
    assert trainer2.state.epoch == 3
    assert handler2.table.as_dict() == continued
    for a, b in zip(continued_weights, network2.parameters()):
        torch.testing.assert_close(a, b.detach())


def test_teat_weight_schedule():
    assert teat_weight(0.4) == 0.0
    assert teat_weight(0.5) == pytest.approx(300 * math.exp(-5))
    assert teat_weight(0.6) == pytest.approx(300 * math.exp(-1.25))
    assert teat_weight(0.7) == pytest.approx(300.0)
    assert teat_weight(0.95) == pytest.approx(300.0)


def test_teat_adds_the_regulariser_and_keeps_ensembles():
    handler = TemporalEnsemblingHandler(TERMS, eps=1.0, steps=2, ramp_start=0.0, ramp_end=0.5, softmax_over="channel")
    trainer, net = _trainer(handler, lr=0.0, epoch_length=1)
    trainer.run()
    cur, out = handler.current, trainer.state.output
    weight = 300 * math.exp(-5)  # progress 0 sits at the start of the ramp
    assert handler.last_weight == pytest.approx(weight)
    assert sorted(handler.ensemble) == [f"case0:{i}" for i in range(4)]
    net.train()
    with torch.no_grad():
        clean, adv = net(cur.x), net(cur.x_adv)
        p_clean, p_adv = torch.softmax(clean, 1), torch.softmax(adv, 1)
        # first sight: the ensemble target is the current clean prediction
        expected = 0.5 * MeanLoss(TERMS)(clean, cur.y) + 0.5 * MeanLoss(TERMS)(adv, cur.y)
        expected = expected + weight * ((p_adv - p_clean) ** 2).mean()
    torch.testing.assert_close(out["loss"].detach(), expected)
    torch.testing.assert_close(handler.ensemble["case0:0"], p_clean[0])


def test_xi_follows_the_models_mean_clean_loss():
    """``xi_follows_model``: after an epoch, ξ = ξ_cal + (mean clean loss of the epoch − the calibrated mean)."""
    xi = {"xi": [0.3, 0.1], "terms": [{"name": "dice", "mean": 0.25}, {"name": "ce", "mean": 0.05}],
          "total": {"name": "total", "xi": 0.5, "mean": 0.4}}
    handler = AdaptiveMarginHandler(TERMS, xi=xi, delta=0.5, steps=2, condition="total", xi_follows_model=True)
    trainer, net = _trainer(handler, lr=0.0)  # lr 0: the clean losses are those of the initial weights
    trainer.run()
    items = _items()
    net.train()
    with torch.no_grad():
        x, y = torch.stack([i["image"] for i in items]), torch.stack([i["label"] for i in items])
        mean_clean = float(TERMS(net(x), y).sum(dim=1).double().mean())
    assert handler.condition.thresholds.tolist() == pytest.approx([0.5 + mean_clean - 0.4])
    assert handler.report()["epochs"][0]["xi_next"] == pytest.approx([0.5 + mean_clean - 0.4])
    assert handler.report()["settings"]["thresholds"] == [0.5]  # the calibrated ξ stays on record

    resumed = AdaptiveMarginHandler(TERMS, xi=xi, delta=0.5, condition="total", xi_follows_model=True)
    resumed.load_state_dict(handler.state_dict())
    assert resumed.condition.thresholds.tolist() == handler.condition.thresholds.tolist()

    with pytest.raises(ValueError, match="xi_follows_model needs xi as an xi.json"):
        AdaptiveMarginHandler(TERMS, xi=[0.3, 0.1], delta=0.5, xi_follows_model=True)

def test_followed_xi_counts_each_samples_latest_value_once():
    """A revisit replaces the sample's value in the running mean; NaN (undefined metric) is left out."""
    xi = {"xi": [0.3, 0.1], "terms": [{"name": "dice", "mean": 0.25}, {"name": "ce", "mean": 0.05}]}
    handler = AdaptiveMarginHandler(TERMS, xi=xi, delta=0.5, xi_follows_model=True)
    handler._follow_model(["a", "b"], torch.tensor([[0.2, 0.1], [0.4, float("nan")]]))
    assert handler.condition.thresholds.tolist() == pytest.approx([0.3 + 0.3 - 0.25, 0.1 + 0.1 - 0.05])
    resumed = AdaptiveMarginHandler(TERMS, xi=xi, delta=0.5, xi_follows_model=True)
    resumed.load_state_dict(handler.state_dict())
    for h in (handler, resumed):  # "a" revisited: its new values replace the old ones
        h._follow_model(["a"], torch.tensor([[0.6, 0.3]]))
        assert h.condition.thresholds.tolist() == pytest.approx([0.3 + 0.5 - 0.25, 0.1 + 0.3 - 0.05])
    # "b" revisited with a defined ce and an infinite dice: the ce now averages a and b, the infinite value is left out
    handler._follow_model(["b"], torch.tensor([[float("inf"), 0.1]]))
    assert handler.condition.thresholds.tolist() == pytest.approx([0.3 + 0.6 - 0.25, 0.1 + 0.2 - 0.05])
