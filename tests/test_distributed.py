"""Multi-process AMAT: two gloo processes on the CPU, launched by ``torch.distributed.run`` (as ``torchrun``).

The worker half of this file (``python tests/test_distributed.py OUT_DIR`` under torchrun) trains a tiny UNet
with DDP, a ``DistributedSampler`` and an :class:`AdaptiveMarginHandler` on synthetic 16×16 slices, records
every margin update each rank made itself, and saves its final table; rank 0 also writes the checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.data import Dataset, DistributedSampler
from monai.engines import SupervisedTrainer
from monai.handlers import CheckpointLoader, CheckpointSaver, StatsHandler
from monai.networks.nets import UNet
from torch.utils.data import DataLoader

from amat_monai import distributed as D
from amat_monai.acceleration import accelerate, enable_autocast, is_accelerated, to_channels_last
from amat_monai.handlers import AdaptiveMarginHandler, TemporalEnsemblingHandler
from amat_monai.losses import MeanLoss, SegmentationLoss
from amat_monai.margins import MarginTable

TERMS = SegmentationLoss()
N_ITEMS, BATCH, EPOCHS, DELTA = 12, 3, 2, 0.5
XI = [0.855, 1.215]  # near the untrained net's clean losses: some samples expand, others shrink


def _items(n: int = N_ITEMS) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        label = torch.zeros(1, 16, 16, dtype=torch.long)
        label[:, 4:10, 2 + i % 6 : 8 + i % 6] = 1
        label[:, 11:14, 4:12] = 2
        image = label.float() + (0.2 + 0.1 * (i % 4)) * torch.randn(1, 16, 16, generator=g)
        items.append({"image": image, "label": label, "sample_id": f"case{i // 4}:{i % 4}"})
    return items


def _network() -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(2, 1, 3, (8, 16), (2,), num_res_units=0, norm="instance")


def _handler() -> AdaptiveMarginHandler:
    return AdaptiveMarginHandler(TERMS, xi=XI, delta=DELTA, steps=2, random_start=False)


# -- worker (runs under torch.distributed.run) ------------------------------------------------------------
def _worker(out_dir: str) -> None:
    import amat_monai.handlers.adaptive_margin as am

    assert D.init_process_group("cpu"), "torchrun's environment should name a process group"
    rank = D.get_rank()
    records = []  # (iteration, ids, values) of this rank's own updates
    real_sync = am.sync_margins

    def recording_sync(table, ids, values, **kwargs):
        records.append((trainer.state.iteration, list(ids), values.tolist()))
        real_sync(table, ids, values, **kwargs)

    am.sync_margins = recording_sync
    dataset = Dataset(_items())
    sampler = DistributedSampler(dataset, shuffle=True, even_divisible=True)
    network = D.wrap_ddp(_network(), "cpu")
    handler = _handler()
    handlers = D.rank_zero_handlers([handler, StatsHandler(name="dist_test", iteration_log=False)])
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=EPOCHS,
        train_data_loader=DataLoader(dataset, batch_size=BATCH, sampler=sampler),
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.05),
        loss_function=MeanLoss(TERMS),
        train_handlers=handlers,
        decollate=False,
    )
    save = {"network": network, "margins": handler, "trainer": trainer}
    saver = CheckpointSaver(out_dir, save, save_final=True, final_filename="final.pt")
    for h in D.rank_zero_handlers([saver]):
        h.attach(trainer)
        handlers.append(h)
    trainer.run()
    params = [p.detach().clone() for p in network.parameters()]  # as in the final checkpoint
    teat = TemporalEnsemblingHandler(TERMS, eps=0.5, steps=1, ramp_start=0.0, ramp_end=0.5)
    SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=DataLoader(dataset, batch_size=BATCH, sampler=sampler),
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.01),
        loss_function=MeanLoss(TERMS),
        train_handlers=[teat],
        decollate=False,
    ).run()
    result = {
        "rank": rank,
        "world": D.get_world_size(),
        "ddp": isinstance(network, torch.nn.parallel.DistributedDataParallel),
        "handlers": [type(h).__name__ for h in handlers],
        "records": records,
        "table": handler.table.as_dict(),
        "params": params,
        "ensemble": teat.ensemble,
    }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    D.destroy_process_group()


# -- tests -------------------------------------------------------------------------------------------------
def _run_two_ranks(out_dir: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(out_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        log = [line for line in (proc.stdout + proc.stderr).splitlines() if "Warning" not in line]
        pytest.fail("torchrun failed:\n" + "\n".join(log[-150:]))
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    return out_dir, _run_two_ranks(out_dir)


def test_two_gloo_ranks_end_with_identical_complete_margin_tables(two_rank_run):
    _, ranks = two_rank_run
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 and r["ddp"] for r in ranks)
    # rank 0 keeps every handler, rank 1 drops the ones that write logs or files
    assert ranks[0]["handlers"] == ["AdaptiveMarginHandler", "StatsHandler", "CheckpointSaver"]
    assert ranks[1]["handlers"] == ["AdaptiveMarginHandler"]
    ids = {item["sample_id"] for item in _items()}
    table0, table1 = ranks[0]["table"], ranks[1]["table"]
    assert set(table0) == ids and table0 == table1
    # the full table is exactly every rank's own updates replayed in iteration order, then rank order
    iterations = N_ITEMS // 2 // BATCH * EPOCHS
    assert [len(r["records"]) for r in ranks] == [iterations, iterations]
    expected = {}
    for it in range(iterations):
        for r in ranks:
            step, rank_ids, values = r["records"][it]
            assert step == it + 1
            expected.update(zip(rank_ids, values))
    assert table0 == pytest.approx(expected, abs=0, rel=0)
    # each rank updated only its own samples, and together they covered the data set every epoch
    per_epoch = iterations // EPOCHS
    for e in range(EPOCHS):
        seen = [i for r in ranks for rec in r["records"][e * per_epoch : (e + 1) * per_epoch] for i in rec[1]]
        assert sorted(seen) == sorted(ids)
    assert len(set(table0.values())) > 1  # margins moved apart: the run did something
    for p0, p1 in zip(ranks[0]["params"], ranks[1]["params"]):
        torch.testing.assert_close(p0, p1)  # DDP kept the replicas identical


def test_checkpoint_restores_every_margin_into_one_process(two_rank_run):
    out_dir, ranks = two_rank_run
    ckpt = out_dir / "final.pt"
    assert ckpt.is_file() and sorted(p.name for p in out_dir.glob("*.pt")) == ["final.pt", "rank0.pt", "rank1.pt"]
    network, handler = _network(), _handler()
    handler.condition.thresholds = torch.full_like(handler.condition.thresholds, 1e3)  # every sample expands: the continued run is predictable
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=EPOCHS + 1,
        train_data_loader=DataLoader(Dataset(_items()), batch_size=BATCH, shuffle=False),
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.0),
        loss_function=MeanLoss(TERMS),
        train_handlers=[handler],
        decollate=False,
    )
    CheckpointLoader(str(ckpt), {"network": network, "margins": handler, "trainer": trainer}).attach(trainer)
    D.match_epoch_length(trainer)  # the 2-process checkpoint counts 2 iterations per epoch, this run 4
    restored: dict = {}
    trainer.add_event_handler(Events.STARTED, lambda e: restored.update(handler.table.as_dict()))
    trainer.run()
    assert restored == ranks[0]["table"]
    for p, q in zip(network.parameters(), ranks[0]["params"]):
        torch.testing.assert_close(p.detach(), q)
    # one more epoch, all of it: every sample expanded exactly once
    assert (trainer.state.epoch, trainer.state.epoch_length, trainer.state.iteration) == (EPOCHS + 1, 4, 12)
    assert handler.table.as_dict() == {k: v + DELTA for k, v in restored.items()}


@pytest.mark.slow
def test_bundle_multi_gpu_config_trains_amat_on_two_processes(tmp_path):
    from amat_monai.checkpoints import atomic_write_text
    from amat_monai.data.synthetic import make_synthetic_decathlon
    from amat_monai.workflows import train

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "hippocampus_seg"
    data = make_synthetic_decathlon(tmp_path / "Task", num_cases=5, seed=3)
    xi_file = tmp_path / "xi.json"
    atomic_write_text(xi_file, json.dumps({"xi": [0.5, 0.8], "metric": {"name": "dice_present", "xi": 0.5}}))
    tiny = {"epochs": 1, "batch_size": 8, "attack_steps": 2, "progress": False, "network_filters": [4, 8, 8, 16]}
    paths = train(bundle, "amat", data, tmp_path / "out", nproc=2, device="cpu", xi_file=str(xi_file), **tiny)
    state = torch.load(next(Path(paths["ckpt_dir"]).glob("checkpoint_epoch=*.pt")), weights_only=False)
    margins = state["adversarial"]["margins"]
    dataset = json.loads(Path(paths["split_file"]).read_text())
    assert len(dataset["training"]) >= 2 and len(margins["ids"]) == len(set(margins["ids"])) > 0
    cases = {i.split(":")[0] for i in margins["ids"]}
    assert len(cases) == len(dataset["training"])  # every training case's slices, from both ranks
    assert Path(paths["model"]).is_file()


def test_ssat_trains_on_two_processes_with_a_shard_of_the_unlabelled_pool_each(tmp_path):
    from amat_monai.data.synthetic import make_synthetic_decathlon
    from amat_monai.workflows import train

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "hippocampus_seg"
    data = make_synthetic_decathlon(tmp_path / "Task", num_cases=8, seed=3)
    tiny = {"epochs": 1, "batch_size": 8, "attack_steps": 1, "progress": False, "network_filters": [4, 8, 8, 16],
            "labelled_fraction": 0.5, "eps": 1.0}
    paths = train(bundle, "vat", data, tmp_path / "out", nproc=2, device="cpu", ssat=True, **tiny)
    state = torch.load(next(Path(paths["ckpt_dir"]).glob("checkpoint_epoch=*.pt")), weights_only=False)
    # one unlabelled batch per labelled iteration of rank 0 (each rank walks its half of both pools)
    assert state["ssat"]["draws"] == state["trainer"]["iteration"] > 0 and Path(paths["model"]).is_file()


@pytest.mark.slow
def test_detection_bundle_multi_gpu_config_trains_amat_on_two_processes(tmp_path):
    from amat_monai.checkpoints import atomic_write_text
    from amat_monai.data.voc import make_synthetic_voc
    from amat_monai.workflows import train

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "bccd_detection"
    data = make_synthetic_voc(tmp_path / "voc", num_images=8, seed=2)
    xi_file = tmp_path / "xi.json"  # per-image mAP above -1 always: every margin grows by Δ on its one visit
    atomic_write_text(xi_file, json.dumps({"xi": [1.0, 1.0, 1.0], "metric": {"name": "map", "xi": -1.0}}))
    tiny = {"epochs": 1, "batch_size": 1, "attack_steps": 2, "widths": [4, 8, 8, 16], "fpn_channels": 8, "delta": 1.0,
            "val_interval": 5}
    paths = train(bundle, "amat", data, tmp_path / "out", nproc=2, device="cpu", xi_file=str(xi_file), **tiny)
    state = torch.load(next(Path(paths["ckpt_dir"]).glob("checkpoint_epoch=*.pt")), weights_only=False)
    margins = state["adversarial"]["margins"]
    # both ranks' images (2 each, batch 1) in rank 0's table, each grown once from Δ
    assert sorted(margins["ids"]) == [f"Synthetic_{i:05d}" for i in range(4)]
    torch.testing.assert_close(margins["margins"], torch.full((4,), 2.0, dtype=margins["margins"].dtype))
    assert Path(paths["model"]).is_file()


def test_sync_helpers_are_no_ops_in_one_process():
    assert not D.is_distributed() and D.get_rank() == 0 and D.get_world_size() == 1
    assert D.init_process_group("cpu") is (torch.distributed.is_initialized() or "WORLD_SIZE" in os.environ)
    table = MarginTable(init=0.5)
    table.set(["a", "b"], torch.tensor([1.0, 2.0]))
    D.sync_margins(table, ["a", "b"], torch.tensor([1.0, 2.0]))
    assert table.as_dict() == {"a": 1.0, "b": 2.0}
    ensemble = {"a": torch.ones(2)}
    D.sync_ensemble(ensemble, ["a"])
    assert list(ensemble) == ["a"]
    assert D.all_gather_objects({"x": 1}) == [{"x": 1}]
    net = _network()
    assert D.wrap_ddp(net, "cpu") is net  # no wrapper, same checkpoint keys
    handlers = [StatsHandler(iteration_log=False), None]
    assert D.rank_zero_handlers(handlers) == handlers[:1] and D.rank_zero_handlers(None) is None
    assert D.backend_for("cpu") == "gloo" and D.local_device("cpu") == torch.device("cpu")


def test_two_ranks_share_teat_ensembles(two_rank_run):
    _, ranks = two_rank_run
    e0, e1 = ranks[0]["ensemble"], ranks[1]["ensemble"]
    assert sorted(e0) == sorted(e1) == sorted(item["sample_id"] for item in _items())
    for key in e0:
        assert e0[key].shape == (3, 16, 16)
        torch.testing.assert_close(e0[key], e1[key], rtol=0, atol=0)


def test_synchronized_time_limit_stops_training():
    from ignite.engine import Engine

    with pytest.raises(ValueError, match="limit_sec"):
        D.SynchronizedTimeLimit(0)
    engine = Engine(lambda e, b: sum(range(20000)))
    limit = D.SynchronizedTimeLimit(1e-3)
    engine.add_event_handler(Events.ITERATION_COMPLETED, limit)
    while time.time() - limit.start < 2e-3:
        pass
    engine.run(range(100), max_epochs=1)
    assert engine.state.iteration == 1  # stopped after the first iteration, past the limit


def test_launch_command_and_errors(tmp_path):
    cmd = D.build_launch_command("args.json", 3, python="python")
    assert cmd == [
        "python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
        "-m", "monai.bundle", "run", "--args_file", "args.json",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="nproc"):
        D.build_launch_command("args.json", 0)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        D.launch([str(tmp_path / "missing.json")], 2)
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"run": ["$print('ok')"]}))
    with pytest.raises(ValueError, match="config_file"):
        D.launch([str(cfg)], 2, {"config_file": "x"})


def test_fast_paths_are_no_ops_on_cpu():
    net = _network()
    x = torch.randn(2, 1, 16, 16)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ref = net(x)
    out_net = accelerate(net, "cpu", autocast=True, channels_last=True, compile=True)
    assert out_net is net and type(net) is UNet and not is_accelerated(net)
    assert all(v.is_contiguous() for v in net.state_dict().values())
    torch.testing.assert_close(net(x), ref)
    assert net.state_dict().keys() == before.keys()


def test_autocast_and_channels_last_wrapping_keeps_module_and_float32_outputs():
    # exercised with CPU autocast, since the CUDA path cannot run here: same mechanics, other device type
    net = _network()
    keys = list(net.state_dict())
    x = torch.randn(2, 1, 16, 16, requires_grad=True)
    ref = net(x)
    enable_autocast(net, "bf16", device_types=("cpu",))
    to_channels_last(net)
    assert is_accelerated(net) and type(net) is UNet and list(net.state_dict()) == keys
    out = net(x)
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.1 * ref.abs().max()
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == x.shape and torch.isfinite(grad).all()
    clone = copy.deepcopy(net)
    assert clone.forward.__self__ is clone  # the copy runs its own weights
    with pytest.raises(ValueError, match="dtype"):
        enable_autocast(_network(), "int8")


if __name__ == "__main__":
    _worker(sys.argv[1])


def test_landmark_metric_combines_every_ranks_samples(tmp_path):
    script = tmp_path / "metric.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from amat_monai import distributed as D\n"
        "from amat_monai.landmarks import LandmarkErrorMetric\n"
        "from amat_monai.metrics import TaskMetric\n"
        "D.init_process_group('cpu')\n"
        "class PerSample(TaskMetric):\n"
        "    name = 'mre'\n"
        "    def per_sample(self, pred, batch):\n"
        "        return {'mre': batch['v']}\n"
        "m = LandmarkErrorMetric(PerSample())\n"
        "m.reset()\n"
        "m.update((None, {'v': torch.tensor([1.0, 2.0]) if dist.get_rank() == 0 else torch.tensor([6.0])}))\n"
        "open(__file__ + f'.rank{dist.get_rank()}', 'w').write(str(m.compute()))\n"
        "D.destroy_process_group()\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    means = [float(Path(f"{script}.rank{r}").read_text()) for r in (0, 1)]
    assert means == [3.0, 3.0]  # (1 + 2 + 6) / 3 on both ranks, not 1.5 and 6


def test_a_failed_launch_says_what_the_processes_printed_last(capsys):
    script = "import sys\nfor i in range(100): print(f'line {i}')\nsys.exit('rank 1 failed: the reason')"
    status, tail = D._run_teeing_output([sys.executable, "-c", script], os.environ, keep=5)
    assert status == 1 and tail == ["line 96\n", "line 97\n", "line 98\n", "line 99\n", "rank 1 failed: the reason\n"]
    assert "line 0\n" in capsys.readouterr().err  # streamed on as it came, not only kept
