"""Landmark targets, decoding, coordinate mapping, the three-term loss and the MRE conversion."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from amat_monai.landmarks import (
    DecodeLandmarksd,
    LandmarkDecoder,
    LandmarkTargetsd,
    decode_landmarks,
    landmark_mask,
    landmark_targets,
    map_coordinates,
)
from amat_monai.losses import LandmarkLoss, MeanLoss
from amat_monai.conditions import LossTermsCondition
from amat_monai.metrics import LandmarkMetric

ORIGINAL = (2400, 1935)  # ISBI 2015 original grid (H, W), 0.1 mm pixels
STORED = (600, 484)  # quarter-size storage
NET = (200, 160)  # network input


def _logits(targets: torch.Tensor) -> torch.Tensor:
    """A "perfect" network output: heatmap logits whose sigmoid is the target heatmap, exact offsets."""
    k = targets.shape[-3] // 3
    out = targets.clone()
    out[..., :k, :, :] = torch.logit(targets[..., :k, :, :].clamp(1e-6, 1 - 1e-6))
    return out


def test_map_coordinates_aligns_pixel_centres():
    # the centre of the first and of the last pixel map onto each other, in both directions
    pts = np.array([[-0.5 + 0.5 * 1935 / 160, -0.5 + 0.5 * 12.0], [1934.5 - 0.5 * 1935 / 160, 2399.5 - 6.0]])
    net = map_coordinates(pts, ORIGINAL, NET)
    np.testing.assert_allclose(net, [[0.0, 0.0], [159.0, 199.0]], atol=1e-9)
    np.testing.assert_allclose(map_coordinates(net, NET, ORIGINAL), pts, atol=1e-9)
    t = map_coordinates(torch.tensor(pts), ORIGINAL, STORED)
    assert isinstance(t, torch.Tensor)
    with pytest.raises(ValueError, match="from_size"):
        map_coordinates(pts, (0, 3), NET)
    with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
        map_coordinates(np.zeros((3, 3)), ORIGINAL, NET)


def test_targets_have_the_documented_form():
    t = landmark_targets([[10.0, 20.0]], (40, 30), radius=5.0)
    assert t.shape == (3, 40, 30)
    assert t[0, 20, 10] == 1.0 and t[1, 20, 10] == 0.0 and t[2, 20, 10] == 0.0
    # pixel (x=13, y=16): d = 5 -> on the disc edge; heatmap exp(-1/2), offsets (l - p)/R
    assert t[0, 16, 13] == pytest.approx(math.exp(-0.5))
    assert t[1, 16, 13] == pytest.approx(-3 / 5) and t[2, 16, 13] == pytest.approx(4 / 5)
    assert t[:, 16, 14].abs().sum() == 0  # d > R: outside, all zero
    assert int((t[0] > 0).sum()) == 81  # lattice points within radius 5


@pytest.mark.parametrize("with_logits", [False, True])
def test_target_decode_round_trip_within_half_a_stored_pixel(with_logits):
    rng = np.random.default_rng(0)
    original = np.stack([rng.uniform(0, ORIGINAL[1] - 1, 19), rng.uniform(0, ORIGINAL[0] - 1, 19)], axis=1)
    original[0] = [3.0, 5.0]  # near a corner: the disc is clipped
    original[1] = [1930.0, 2395.0]
    item = LandmarkTargetsd(radius=10.0)(
        {"image": torch.zeros(3, *NET), "landmarks": original, "original_size": np.array(ORIGINAL)}
    )
    label = item["label"][None]
    assert label.shape == (1, 57, *NET)
    pred = _logits(label) if with_logits else label
    decoder = LandmarkDecoder(radius=10.0, heatmap_activation="sigmoid" if with_logits else None)
    back = decoder(pred, {"original_size": torch.tensor([ORIGINAL])})[0].numpy()
    stored_error = (back - original) * np.array([STORED[1] / ORIGINAL[1], STORED[0] / ORIGINAL[0]])
    assert np.abs(stored_error).max() < 0.5
    assert np.abs(back - original).max() < 0.01  # in fact exact up to float precision


def test_decoding_votes_for_the_majority():
    # 19 px of a disc vote at the true landmark; a brighter but isolated blob elsewhere must not win
    t = landmark_targets([[20.0, 20.0]], (48, 48), radius=3.0)
    t[0, 40, 40] = 1.0  # a single bright pixel voting at (40, 40)
    xy = decode_landmarks(t, radius=3.0, heatmap_activation=None)
    assert xy.shape == (1, 2)
    torch.testing.assert_close(xy[0], torch.tensor([20.0, 20.0]))
    with pytest.raises(ValueError, match="channels"):
        decode_landmarks(torch.zeros(1, 4, 8, 8), 2.0)


def test_mre_conversion_hand_computed():
    """Quarter-size storage, 200×160 network grid, 0.1 mm original pixels.

    The prediction is the truth moved by +2.5 network pixels in x and -1 in y. One network pixel is
    1935/160 = 12.09375 original pixels across and 2400/200 = 12 down, so the error is
    hypot(30.234375, 12) = 32.5287 original pixels = 3.25287 mm, for every landmark.
    """
    truth = np.array([[800.0, 1000.0], [1200.5, 1500.25], [400.0, 2000.0]])
    net = map_coordinates(truth, ORIGINAL, NET)
    pred = landmark_targets(net + np.array([2.5, -1.0]), NET, radius=10.0)[None]
    batch = {
        "landmarks": torch.tensor(truth[None]),
        "original_size": torch.tensor([ORIGINAL]),
        "spacing": torch.tensor([0.1]),
    }
    metric = LandmarkMetric(decode=LandmarkDecoder(10.0, heatmap_activation=None), spacing="spacing")
    values = metric.per_sample(pred, batch)
    assert values["mre"].item() == pytest.approx(3.25287, abs=1e-4)
    assert values["sdr_3"].item() == 0.0 and values["sdr_4"].item() == 1.0
    # the stored (quarter-size) grid sits in between and changes nothing: original -> stored -> network
    via_stored = map_coordinates(map_coordinates(truth, ORIGINAL, STORED), STORED, NET)
    np.testing.assert_allclose(via_stored, net, atol=1e-9)


def test_landmark_loss_terms_on_hand_made_maps():
    # one landmark, a 2x2 grid; sample 0 hand-made, sample 1 with exact offsets
    t = torch.zeros(2, 3, 2, 2)
    t[:, 0] = torch.tensor([[1.0, 0.5], [0.0, 0.0]])  # heatmap: disc = the top row
    t[:, 1] = torch.tensor([[0.2, -0.4], [0.0, 0.0]])
    t[:, 2] = torch.tensor([[0.0, 0.6], [0.0, 0.0]])
    p = torch.zeros(2, 3, 2, 2)  # heatmap logits 0 -> probability 0.5 everywhere
    p[0, 1] = torch.tensor([[0.0, 0.0], [5.0, 5.0]])  # the bottom row is outside the disc: ignored
    p[0, 2] = torch.tensor([[1.0, 0.0], [-3.0, 3.0]])
    p[1, 1:] = t[1, 1:]
    loss = LandmarkLoss(num_landmarks=1)
    assert loss.term_names == ("heatmap", "offset_x", "offset_y")
    terms = loss(p, t)
    # Dice = 2(0.5·1 + 0.5·0.5) / (2 + 1.5) = 3/7; term 0.5·(1 − 3/7) = 2/7
    # offset x: (|0 − 0.2| + |0 + 0.4|) / 2 = 0.3; offset y: (|1 − 0| + |0 − 0.6|) / 2 = 0.8
    torch.testing.assert_close(terms, torch.tensor([[2 / 7, 0.3, 0.8], [2 / 7, 0.0, 0.0]]), atol=1e-5, rtol=0)
    bce = LandmarkLoss(num_landmarks=1, heatmap="bce")(p, t)
    torch.testing.assert_close(bce[:, 0], torch.full((2,), math.log(2.0)))
    assert MeanLoss(loss)(p, t).item() == pytest.approx(((2 / 7 + 1.1) + 2 / 7) / 2, abs=1e-5)
    # AMAT's condition needs all three terms under their thresholds
    assert LossTermsCondition(torch.tensor([0.3, 0.5, 0.5])).passes(terms).tolist() == [False, True]
    with pytest.raises(ValueError, match="3K"):
        LandmarkLoss()(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="dice"):
        LandmarkLoss(heatmap="mse")


def test_loss_is_differentiable_and_low_at_the_target():
    t = landmark_targets([[8.0, 8.0], [20.0, 12.0]], (24, 32), radius=4.0)[None]
    p = torch.zeros_like(t, requires_grad=True)
    LandmarkLoss(2)(p, t).sum().backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    perfect = LandmarkLoss(2)(_logits(t), t)
    assert perfect[0, 1:].abs().max() < 1e-6
    assert perfect[0, 0] < LandmarkLoss(2)(torch.zeros_like(t), t)[0, 0]


def test_decode_landmarksd_writes_coordinates_and_a_mask():
    truth = np.array([[967.0, 1199.5], [100.0, 200.0]])
    maps = _logits(landmark_targets(map_coordinates(truth, ORIGINAL, NET), NET, 10.0))
    out = DecodeLandmarksd(radius=10.0, original_size=ORIGINAL, spacing=0.1, names=["a", "b"], mask_radius=2.0)(
        {"pred": maps}
    )
    np.testing.assert_allclose(out["landmarks"].numpy(), truth, atol=0.01)
    np.testing.assert_allclose(out["landmarks_mm"].numpy(), truth * 0.1, atol=0.001)
    first = out["result"]["landmarks"][0]
    assert first["name"] == "a" and first["x"] == pytest.approx(967.0, abs=0.01)
    assert first["y_mm"] == pytest.approx(119.95, abs=0.001)
    assert out["pred"].shape == (1, *NET) and set(out["pred"].unique().tolist()) == {0, 1, 2}
    mask = landmark_mask(torch.tensor([[1.0, 1.0]]), (3, 3), 1.0)
    assert mask[0].tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]


def test_decode_landmarksd_falls_back_to_the_loaded_image_size():
    from monai.data import MetaTensor

    stored = np.array([[100.0, 300.0]])  # (x, y) on the 600×484 (H×W) stored image
    maps = _logits(landmark_targets(map_coordinates(stored, STORED, NET), NET, 10.0))
    image = MetaTensor(torch.zeros(3, *NET), meta={"spatial_shape": np.array([484, 600])})  # PIL: width, height
    out = DecodeLandmarksd(radius=10.0, original_size=None)({"pred": maps, "image": image})
    np.testing.assert_allclose(out["landmarks"].numpy(), stored, atol=0.01)
    assert out["result"]["original_size"] == [600, 484]
