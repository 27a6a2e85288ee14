import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

from amat_monai.attacks import AttackResult, fgsm, ifgsm, pgd, per_sample_norm, random_noise
from amat_monai.losses import SegmentationLoss


def _net(dims: int = 2, norm: str = "batch") -> nn.Module:
    return UNet(dims, 1, 3, (8, 16), (2,), num_res_units=0, norm=norm)


def _data(batch: int = 4, shape=(16, 16)):
    x = torch.randn(batch, 1, *shape)
    y = torch.zeros(batch, 1, *shape, dtype=torch.long)
    y[..., 4:10, 4:10] = 1
    y[..., 10:14, 6:12] = 2
    return x, y


LOSS = SegmentationLoss()
EPS = torch.tensor([0.5, 1.0, 2.0, 3.0])


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("attack", [pgd, ifgsm, fgsm, random_noise])
def test_perturbation_stays_in_each_samples_ball(attack, norm):
    net, (x, y) = _net(), _data()
    x_adv = attack(net, LOSS, x, y, EPS, norm=norm)
    assert (per_sample_norm(x_adv - x, norm) <= EPS + 1e-5).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_reaches_the_radius(norm):
    net, (x, y) = _net(), _data()
    x_adv = pgd(net, LOSS, x, y, EPS, steps=10, norm=norm)
    torch.testing.assert_close(per_sample_norm(x_adv - x, norm), EPS, atol=1e-5, rtol=0)


def test_single_step_attacks_and_noise_have_norm_exactly_eps():
    net, (x, y) = _net(), _data()
    for attack in (fgsm, random_noise):
        torch.testing.assert_close(per_sample_norm(attack(net, LOSS, x, y, EPS) - x), EPS, atol=1e-5, rtol=0)


def test_pgd_loss_exceeds_clean_and_random_noise_of_the_same_norm():
    net, (x, y) = _net(norm="instance"), _data()
    net.eval()
    with torch.no_grad():
        clean = LOSS(net(x), y).sum(1)
        noisy = LOSS(net(random_noise(net, LOSS, x, y, EPS)), y).sum(1)
        adv = LOSS(net(pgd(net, LOSS, x, y, EPS, steps=10)), y).sum(1)
    assert (adv > clean).all()
    assert (adv > noisy).all()
    assert (adv - clean).mean() > 5 * (noisy - clean).abs().mean()


def test_works_on_3d_inputs():
    net, (x, y) = _net(dims=3), _data(batch=2, shape=(8, 8, 8))
    x_adv = pgd(net, LOSS, x, y, 1.5, steps=3)
    assert x_adv.shape == x.shape
    torch.testing.assert_close(per_sample_norm(x_adv - x), torch.full((2,), 1.5), atol=1e-5, rtol=0)


def test_ifgsm_is_deterministic_and_pgd_follows_the_generator():
    net, (x, y) = _net(), _data()
    torch.testing.assert_close(ifgsm(net, LOSS, x, y, EPS), ifgsm(net, LOSS, x, y, EPS), rtol=0, atol=0)
    a = pgd(net, LOSS, x, y, EPS, steps=2, generator=torch.Generator().manual_seed(1))
    b = pgd(net, LOSS, x, y, EPS, steps=2, generator=torch.Generator().manual_seed(1))
    c = pgd(net, LOSS, x, y, EPS, steps=2, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_zero_eps_leaves_the_sample_untouched():
    net, (x, y) = _net(), _data()
    x_adv = pgd(net, LOSS, x, y, torch.tensor([0.0, 1.0, 0.0, 1.0]), steps=3)
    assert torch.equal(x_adv[0], x[0]) and torch.equal(x_adv[2], x[2])
    assert not torch.equal(x_adv[1], x[1])


def test_no_parameter_gradient_is_left_behind():
    net, (x, y) = _net(), _data()
    pgd(net, LOSS, x, y, 1.0, steps=3)
    assert all(p.grad is None for p in net.parameters())
    # existing gradients (e.g. accumulated by a trainer) are left exactly as they were
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    pgd(net, LOSS, x, y, 1.0, steps=3)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in net.parameters())


@pytest.mark.parametrize("train_mode", [True, False, None])
def test_batchnorm_running_stats_unchanged_and_mode_restored(train_mode):
    net, (x, y) = _net(norm="batch"), _data()
    for start_training in (True, False):
        net.train(start_training)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        pgd(net, LOSS, x, y, 1.0, steps=3, train_mode=train_mode)
        after = net.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert net.training is start_training


def test_train_mode_changes_the_attack_under_batchnorm():
    net, (x, y) = _net(norm="batch"), _data()
    a = ifgsm(net, LOSS, x, y, 1.0, train_mode=True)
    b = ifgsm(net, LOSS, x, y, 1.0, train_mode=False)
    assert not torch.equal(a, b)  # the mode is really applied during the attack


def test_clamp_keeps_the_intensity_range():
    net = _net()
    x, y = torch.rand(4, 1, 16, 16), _data()[1]
    x_adv = pgd(net, LOSS, x, y, 5.0, steps=5, clamp=(0.0, 1.0))
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (per_sample_norm(x_adv - x) <= 5.0 + 1e-5).all()


def test_loss_history_and_observer_see_every_iterate():
    net, (x, y) = _net(), _data()
    seen = []
    result = pgd(net, LOSS, x, y, EPS, steps=4, return_losses=True, observer=lambda t, d, l, p: seen.append((t, d, l)))
    assert isinstance(result, AttackResult)
    assert result.losses.shape == (4, 4, 2)
    assert [t for t, _, _ in seen] == [0, 1, 2, 3]
    torch.testing.assert_close(torch.stack([l for _, _, l in seen]), result.losses)
    assert (per_sample_norm(seen[0][1]) <= EPS + 1e-5).all()  # the random start lies inside the ball


def test_a_zero_gradient_gives_no_nan():
    class Constant(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 3, *x.shape[2:]) + 0 * x.sum()

    x, y = _data()
    x_adv = pgd(Constant(), LOSS, x, y, 1.0, steps=3, random_start=False)
    assert torch.equal(x_adv, x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"eps": -1.0}, "eps"),
        ({"eps": torch.tensor([1.0, 1.0])}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"eps": 1.0, "norm": "l1"}, "norm"),
        ({"eps": 1.0, "steps": 0}, "steps"),
        ({"eps": 1.0, "step_size": -0.1}, "step_size"),
        ({"eps": 1.0, "clamp": (1.0, 0.0)}, "clamp"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    net, (x, y) = _net(), _data()
    with pytest.raises(ValueError, match=match):
        pgd(net, LOSS, x, y, **kwargs)


def test_bad_inputs_raise_value_error_naming_them():
    net, (x, y) = _net(), _data()
    with pytest.raises(ValueError, match="non-finite"):
        pgd(net, LOSS, x.clone().index_fill_(0, torch.tensor([1]), float("nan")), y, 1.0)
    with pytest.raises(ValueError, match="y must"):
        pgd(net, LOSS, x, y[:2], 1.0)
    with pytest.raises(ValueError, match="x must"):
        pgd(net, LOSS, x[0], y, 1.0)
    with pytest.raises(ValueError, match="loss_fn must return per-sample"):
        pgd(net, lambda p, t: LOSS(p, t).mean(), x, y, 1.0)


def test_segmentation_ce_term_is_cross_entropy_bit_for_bit():
    import torch.nn.functional as F

    from amat_monai.losses import SegmentationLoss

    g = torch.Generator().manual_seed(3)
    pred = torch.randn(4, 3, 12, 10, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (4, 1, 12, 10), generator=g)
    ours = SegmentationLoss()(pred, target)[:, 1]
    (grad_ours,) = torch.autograd.grad(ours.sum(), pred)
    reference = F.cross_entropy(pred, target[:, 0], reduction="none").flatten(1).mean(dim=1)
    (grad_ref,) = torch.autograd.grad(reference.sum(), pred)
    assert torch.equal(ours, reference) and torch.equal(grad_ours, grad_ref)
