"""Semi-supervised adversarial training: the labelled / unlabelled split, pseudo-labels and the SSAT handler."""

import json
from pathlib import Path

import pytest
import torch
from monai.engines import SupervisedTrainer
from torch import nn
from torch.utils.data import DataLoader

from amat_monai.data import DecathlonSliceDataset, ceph_datalist, load_datalist, make_synthetic_ceph, make_synthetic_decathlon
from amat_monai.data.labelled import select_pool, split_labelled
from amat_monai.handlers import SemiSupervisedAdversarialHandler
from amat_monai.landmarks import decode_landmarks, landmark_targets
from amat_monai.losses import MeanLoss, SegmentationLoss
from amat_monai.pseudo_labels import ArgmaxPseudoLabel, LandmarkPseudoLabel

TERMS = SegmentationLoss()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 3, padding=1))


def _pool(n: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"image": torch.randn(1, 8, 8, generator=g), "sample_id": f"u{i}"} for i in range(n)]


# -- the split ---------------------------------------------------------------------------------------------
def test_labelled_split_is_deterministic_disjoint_and_sized_as_documented():
    cases = [f"hippocampus_{i:03d}" for i in range(208)]
    split = split_labelled(cases, 0.2, seed=0)
    assert (len(split["labelled"]), len(split["unlabelled"])) == (42, 166)
    assert set(split["labelled"]).isdisjoint(split["unlabelled"]) and set(cases) == set().union(*split.values())
    assert split == split_labelled(list(reversed(cases)), 0.2, seed=0)  # the order of the input does not matter
    assert split["labelled"] != split_labelled(cases, 0.2, seed=1)["labelled"]  # the seed does
    assert [len(v) for v in split_labelled([str(i) for i in range(150)], 0.2).values()] == [30, 120]


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, "half"])
def test_labelled_fraction_outside_the_unit_interval_is_named(bad):
    with pytest.raises(ValueError, match="labelled_fraction must"):
        split_labelled(["a", "b", "c"], bad)


def test_an_empty_unlabelled_pool_is_a_clear_error():
    with pytest.raises(ValueError, match="labelled_fraction=0.9 leaves no unlabelled case"):
        select_pool(["a", "b", "c"], "unlabelled", 0.9)
    with pytest.raises(ValueError, match="empty"):
        SemiSupervisedAdversarialHandler(TERMS, [], ArgmaxPseudoLabel())


def test_the_unlabelled_hippocampus_pool_never_opens_a_label_file(tmp_path):
    task = Path(make_synthetic_decathlon(tmp_path / "Task", num_cases=12, seed=2))
    common = dict(dataset_dir=task, patch_size=(32, 24), split_file=tmp_path / "split.json", labelled_fraction=0.3,
                  labelled_seed=4)
    labelled = DecathlonSliceDataset(section="training", **common)
    # break the label of every unlabelled case: one missing, the others corrupt
    by_case = {c["case"]: c for c in load_datalist(task)}
    training = json.loads((tmp_path / "split.json").read_text())["training"]
    unlabelled_cases = sorted(set(training) - {c["case"] for c in labelled.cases})
    assert len(unlabelled_cases) == len(training) - round(0.3 * len(training)) > 1
    Path(by_case[unlabelled_cases[0]]["label"]).unlink()
    for case in unlabelled_cases[1:]:
        Path(by_case[case]["label"]).write_bytes(b"not a nifti file")
    pool = DecathlonSliceDataset(section="training", pool="unlabelled", **common)
    assert sorted(c["case"] for c in pool.cases) == unlabelled_cases
    assert all("label" not in item for item in pool.data) and all("label" in item for item in labelled.data)
    again = DecathlonSliceDataset(section="training", **common)  # the labelled pool does not need them either
    assert [c["case"] for c in again.cases] == [c["case"] for c in labelled.cases]
    with pytest.raises(ValueError, match="unlabelled pool can only keep 'all'"):
        DecathlonSliceDataset(section="training", pool="unlabelled", slices="foreground", **common)


def test_the_unlabelled_ceph_pool_reads_no_landmarks(tmp_path):
    root = make_synthetic_ceph(tmp_path / "ceph", num_train=10, num_test=2, seed=0)
    labelled = ceph_datalist(root, "train", labelled_fraction=0.3, labelled_seed=0)
    pool_ids = [i["sample_id"] for i in ceph_datalist(root, "train", pool="unlabelled", labelled_fraction=0.3)]
    assert len(labelled) == 3 and len(pool_ids) == 7 and set(pool_ids).isdisjoint(i["sample_id"] for i in labelled)
    csv = root / "landmarks_senior.csv"
    csv.write_text("\n".join(line for line in csv.read_text().splitlines() if line.split(",")[0] not in pool_ids))
    (root / "landmarks_junior.csv").unlink(missing_ok=True)
    pool = ceph_datalist(root, "train", pool="unlabelled", labelled_fraction=0.3)
    assert [i["sample_id"] for i in pool] == pool_ids and all("landmarks" not in i for i in pool)
    assert [i["sample_id"] for i in ceph_datalist(root, "train", labelled_fraction=0.3)] == [i["sample_id"] for i in labelled]


# -- pseudo-labels -----------------------------------------------------------------------------------------
def test_landmark_pseudo_labels_decode_and_encode_again_within_a_pixel():
    radius = 4.0
    points = torch.tensor([[10.3, 7.8], [25.6, 20.1], [5.2, 28.9]])
    target = landmark_targets(points, (32, 32), radius)
    heat = target[:3].clamp(1e-4, 1 - 1e-4)
    logits = torch.cat([torch.log(heat / (1 - heat)), target[3:]])[None]  # what a perfect network outputs
    pseudo, confidence = LandmarkPseudoLabel(radius)(logits)
    again, _ = LandmarkPseudoLabel(radius)(torch.cat([torch.logit(pseudo[0, :3].clamp(1e-4, 1 - 1e-4)),
                                                       pseudo[0, 3:]])[None])
    decoded = decode_landmarks(pseudo[0], radius, heatmap_activation=None)
    assert (decoded - points).norm(dim=1).max() < 1.0
    assert pseudo.shape == (1, 9, 32, 32) and confidence.item() == pytest.approx(1 - 1e-4, abs=0.05)
    torch.testing.assert_close(again, pseudo, atol=0.05, rtol=0)


def test_argmax_pseudo_labels_and_their_confidence():
    pred = torch.zeros(1, 3, 1, 2)
    pred[0, 2, 0, 0] = 10.0  # pixel 0: class 2, almost sure; pixel 1: a three-way tie
    label, confidence = ArgmaxPseudoLabel()(pred)
    assert label.tolist() == [[[[2, 0]]]]
    p = torch.softmax(torch.tensor([0.0, 0.0, 10.0]), 0).max()
    assert confidence.item() == pytest.approx((float(p) + 1 / 3) / 2)
    _, on_foreground = ArgmaxPseudoLabel(confidence_over="foreground")(torch.cat([pred, torch.zeros(1, 3, 1, 2)]))
    assert on_foreground.tolist() == pytest.approx([float(p), 0.0])  # pixel 0 alone; a slice of ties is background
    with pytest.raises(ValueError, match="confidence_over"):
        ArgmaxPseudoLabel(confidence_over="fg")


# -- the handler -------------------------------------------------------------------------------------------
def test_the_added_loss_equals_a_hand_computation():
    net = _net()
    handler = SemiSupervisedAdversarialHandler(TERMS, _pool(), ArgmaxPseudoLabel(), weight=3.0, eps=0.5,
                                               batch_size=4)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(0))[:4].tolist()  # the first draw
    added = handler.unlabelled_loss(net)

    x = torch.stack([_pool()[i]["image"] for i in order])
    with torch.no_grad():
        target = net(x).argmax(dim=1, keepdim=True)
    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(TERMS(net(x_req), target).sum(), x_req)
    x_adv = x + 0.5 * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # L2 FGSM of radius 0.5
    expected = 3.0 * TERMS(net(x_adv), target).sum(dim=1).mean()
    torch.testing.assert_close(added, expected)
    added.backward()  # differentiable in the weights
    assert all(p.grad is not None for p in net.parameters())


def test_the_handler_adds_its_term_to_the_trainers_loss():
    net = _net()
    handler = SemiSupervisedAdversarialHandler(TERMS, _pool(), ArgmaxPseudoLabel(), weight=2.0, eps=(0.1, 0.4),
                                               batch_size=3)
    labelled = [{"image": torch.randn(1, 8, 8), "label": torch.randint(0, 3, (1, 8, 8))} for _ in range(2)]
    trainer = SupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=DataLoader(labelled, batch_size=2),
                                network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
                                loss_function=MeanLoss(TERMS), train_handlers=[handler], decollate=False)
    trainer.run()
    out = trainer.state.output
    with torch.no_grad():
        supervised = MeanLoss(TERMS)(net(out["image"]), out["label"])
    torch.testing.assert_close(out["loss"].detach(), supervised + out["ssat_loss"])
    assert float(out["ssat_loss"]) > 0 and trainer.state.metrics["ssat_loss"] == pytest.approx(float(out["ssat_loss"]))


def test_confidence_gating_leaves_uncertain_samples_out():
    handler = SemiSupervisedAdversarialHandler(TERMS, _pool(), ArgmaxPseudoLabel(), eps=0.5, batch_size=6,
                                               confidence_threshold=1.0)  # no softmax is certain
    assert float(handler.unlabelled_loss(_net())) == 0.0
    assert handler._epoch["kept"] == 0 and handler._epoch["seen"] == 6


def test_resume_draws_the_batches_an_uninterrupted_run_draws():
    def ids(handler, n):
        return [handler.next_batch()["sample_id"] for _ in range(n)]

    straight = SemiSupervisedAdversarialHandler(TERMS, _pool(5), ArgmaxPseudoLabel(), batch_size=2, seed=3)
    expected = ids(straight, 7)  # 3 batches per pass: crosses two pass boundaries
    first = SemiSupervisedAdversarialHandler(TERMS, _pool(5), ArgmaxPseudoLabel(), batch_size=2, seed=3)
    head = ids(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint
    resumed = SemiSupervisedAdversarialHandler(TERMS, _pool(5), ArgmaxPseudoLabel(), batch_size=2, seed=3)
    resumed.load_state_dict(state)
    assert head + ids(resumed, 3) == expected
    torch.testing.assert_close(resumed.radii(4), straight.radii(4))  # same draw count, same radii
    assert sorted(sum(expected[:3], [])) == [f"u{i}" for i in range(5)]  # one pass sees every image once


def test_an_unlabelled_batch_without_the_image_key_names_the_setting():
    pool = [{"img": torch.zeros(1, 8, 8), "sample_id": "u0"}]
    handler = SemiSupervisedAdversarialHandler(TERMS, pool, ArgmaxPseudoLabel(), batch_size=1)
    with pytest.raises(KeyError, match="no image under 'image'.*ssat_image_key"):
        handler.unlabelled_loss(_net())


@pytest.mark.parametrize("bad", [{"weight": -1.0}, {"eps": (0.5, 0.1)}, {"attack": "cw"}, {"steps": 0},
                                 {"confidence_threshold": 2.0}, {"eps": "margni"},
                                 {"eps": "margin", "margin_delta": 0.0}])
def test_bad_settings_are_named(bad):
    with pytest.raises(ValueError, match="ssat"):
        SemiSupervisedAdversarialHandler(TERMS, _pool(), ArgmaxPseudoLabel(), **bad)


# -- the bundles -------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def _ssat_run(bundle: str, method_configs: list[str], data: Path, out: Path, **overrides):
    from monai.engines.utils import IterationEvents

    from amat_monai.workflows import build_workflow, run_workflow

    wf = build_workflow(ROOT / "bundles" / bundle, ["train.json", *method_configs, "ssat.json"], "train",
                        dataset_dir=str(data), output_dir=str(out), labelled_fraction=0.5, **overrides)
    run_workflow(wf)
    handler = wf.parser.get_parsed_content("ssat_handler")
    assert wf.parser.get_parsed_content("train#trainer").has_event_handler(handler, IterationEvents.LOSS_COMPLETED)
    return wf, handler


def test_the_ssat_overlay_runs_as_a_config_workflow_for_the_segmentation_bundle(tmp_path):
    from conftest import SEG_TINY

    task = Path(make_synthetic_decathlon(tmp_path / "Task", num_cases=10, seed=3))
    tiny = {**SEG_TINY, "device": "$torch.device('cpu')", "epochs": 1, "eps": 1.0, "attack_steps": 1}
    wf, handler = _ssat_run("hippocampus_seg", ["vat.json"], task, tmp_path / "run", **tiny)
    labelled = {c["case"] for c in wf.parser.get_parsed_content("train#dataset").cases}
    unlabelled = {c["case"] for c in handler.dataset.cases}
    training = set(json.loads((tmp_path / "run" / "split.json").read_text())["training"])
    assert labelled | unlabelled == training and not labelled & unlabelled and len(labelled) == len(training) // 2
    ckpt = torch.load(tmp_path / "run" / "models" / "checkpoint_epoch=1.pt", weights_only=False)
    assert ckpt["ssat"] == handler.state_dict() and handler.draws == len(wf.parser.get_parsed_content("train#dataloader"))
    # the bundle's default weight: validation's choice in both real-data studies (the authors' 3 hurt there)
    assert handler.eps_range == (0.0, 1.0) and handler.weight == 0.3
    # the pseudo-labeller's settings are part of the run: a resume with other ones is refused
    assert json.loads((tmp_path / "run" / "run.json").read_text())["identity"]["ssat"]["pseudo_label"] == {"confidence_over": "all"}
    with pytest.raises(Exception, match="ssat.pseudo_label.confidence_over: 'all' there, 'foreground' now"):
        _ssat_run("hippocampus_seg", ["vat.json"], task, tmp_path / "run", **{**tiny, "epochs": 2}, resume=True,
                  pseudo_label_confidence_over="foreground")

    # resume for a second epoch: the handler continues its draws from the checkpoint
    wf2, resumed = _ssat_run("hippocampus_seg", ["vat.json"], task, tmp_path / "run", **{**tiny, "epochs": 2},
                             resume=True)
    assert resumed.draws == 2 * handler.draws


def test_the_ssat_overlay_runs_with_amat_for_the_landmark_bundle(tmp_path):
    from amat_monai.workflows import calibrate, train

    root = make_synthetic_ceph(tmp_path / "ceph", num_train=6, num_test=2, seed=1)
    tiny = {"image_size": [48, 40], "radius": 3.0, "features": [4, 4, 8, 8, 16, 4], "batch_size": 2,
            "validate_max_cases": 2, "validate_split": "test1", "test_split": "test1", "epochs": 1,
            "attack_steps": 1, "labelled_fraction": 0.5}
    std = train(ROOT / "bundles" / "ceph_landmarks", "std", root, tmp_path / "std", **tiny)
    xi = calibrate(ROOT / "bundles" / "ceph_landmarks", root, tmp_path / "std", std["model"], **tiny)
    tiny.pop("labelled_fraction")
    wf, handler = _ssat_run("ceph_landmarks", ["amat.json"], root, tmp_path / "amat", xi_file=xi,
                            ssat_teacher_checkpoint=std["model"], **tiny)
    assert sorted(i["sample_id"] for i in handler.dataset.data) == sorted(
        i["sample_id"] for i in ceph_datalist(root, "train", pool="unlabelled", labelled_fraction=0.5))
    assert handler.teacher is not None and not handler.teacher.training
    identity = json.loads((tmp_path / "amat" / "run.json").read_text())["identity"]
    assert handler.draws == 2 and identity["ssat"]["weight"] == 0.3 and identity["ssat"]["pseudo_label"] == {"radius": 3.0}
    with pytest.raises(ValueError, match="ssat needs unlabelled cases"):
        train(ROOT / "bundles" / "ceph_landmarks", "vat", root, tmp_path / "vat", ssat=True, **tiny)


def test_unlabelled_margins_grow_below_their_own_xi_and_survive_a_checkpoint():
    net, pool = _net(), _pool()
    handler = SemiSupervisedAdversarialHandler(TERMS, pool, ArgmaxPseudoLabel(), eps="margin", margin_delta=0.25,
                                               margin_eps_max=0.6, margin_z=1.0, batch_size=6)
    # ξ_u: mean + 1·std of the clean pseudo-label losses over the pool
    x = torch.stack([p["image"] for p in pool])
    with torch.no_grad():
        losses = TERMS(net(x), net(x).argmax(dim=1, keepdim=True)).sum(dim=1).double()
    assert handler.calibrate(net) == pytest.approx(float(losses.mean() + losses.std()))

    handler.xi = 1e9  # every sample passes: +Δ, capped at 0.6
    for expected in (0.5, 0.6):
        handler.unlabelled_loss(net)
        assert handler.table.as_dict() == {f"u{i}": pytest.approx(expected) for i in range(6)}
    handler.xi = -1.0  # every sample fails: no shrink
    handler.unlabelled_loss(net)
    assert all(v == pytest.approx(0.6) for v in handler.table.as_dict().values())

    resumed = SemiSupervisedAdversarialHandler(TERMS, pool, ArgmaxPseudoLabel(), eps="margin", batch_size=6)
    resumed.load_state_dict(json.loads(json.dumps(handler.state_dict(), default=lambda t: t.tolist())))
    assert resumed.xi == -1.0 and resumed.table.as_dict() == handler.table.as_dict()


def test_the_ssat_overlay_runs_for_the_detection_bundle_and_its_pool_reads_no_annotation(tmp_path):
    from amat_monai.data.voc import make_synthetic_voc, voc_datalist

    root = make_synthetic_voc(tmp_path / "bccd", num_images=12, seed=2)
    pool_ids = [i["sample_id"] for i in voc_datalist(root, "train", pool="unlabelled", labelled_fraction=0.5)]
    labelled_ids = [i["sample_id"] for i in voc_datalist(root, "train", labelled_fraction=0.5)]
    assert pool_ids and labelled_ids and set(pool_ids).isdisjoint(labelled_ids)
    for sample_id in pool_ids:
        (root / "Annotations" / f"{sample_id}.xml").unlink()
    tiny = {"widths": [4, 8, 8, 16], "fpn_channels": 8, "batch_size": 2, "epochs": 1, "attack_steps": 1,
            "eps": 2.0, "validate_max_cases": 2, "ssat_eps": 2.0}
    wf, handler = _ssat_run("bccd_detection", ["vat.json"], root, tmp_path / "run", **tiny)
    assert sorted(i["sample_id"] for i in handler.dataset.data) == sorted(pool_ids)
    assert handler.draws == len(wf.parser.get_parsed_content("train#dataloader"))

    # the pseudo-labels are the detections above the threshold, padded like the ground truth
    network = wf.parser.get_parsed_content("network_def").eval()
    x = torch.stack([handler.dataset[0]["image"], handler.dataset[1]["image"]])
    with torch.no_grad():
        pred = network(x)
    labeller = wf.parser.get_parsed_content("pseudo_labeller")
    labeller.score_threshold = 0.0
    target, confidence = labeller(pred)
    found = network.detect(pred)
    assert target.shape == (2, 64, 5)
    for k in range(2):
        rows = target[k][target[k, :, 4] >= 0]
        expected = found[k]["labels_scores"].sort(descending=True)
        assert rows.shape[0] == min(64, expected.values.numel())
        torch.testing.assert_close(rows[:, :4], found[k]["boxes"][expected.indices[:64]].float())
        assert confidence[k] == pytest.approx(float(expected.values[:64].mean()) if rows.shape[0] else 0.0)
