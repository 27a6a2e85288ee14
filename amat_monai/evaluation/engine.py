"""The Ignite engine of robust evaluation: one batch, clean and under every cell of the attack grid."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import Evaluator
from monai.utils import CommonKeys, convert_to_tensor
from torch import nn
from tqdm.auto import tqdm

from amat_monai.attacks import per_sample_norm, per_sample_terms
from amat_monai.evaluation.grid import Cell
from amat_monai.metrics import TaskMetric

__all__ = ["RobustEvaluator"]


class _InferencePath(nn.Module):
    """``inferer(x, network)`` as a module, so attacks differentiate through the path that is scored."""

    def __init__(self, network: nn.Module, inferer: Callable | None) -> None:
        super().__init__()
        self.network = network
        self.inferer = inferer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x) if self.inferer is None else self.inferer(x, self.network)
        return convert_to_tensor(out, track_meta=False)


def _plain(t: Any) -> Any:
    return convert_to_tensor(t, track_meta=False) if isinstance(t, torch.Tensor) else t


def _per_sample_list(batch: Mapping[str, Any], key: str, n: int) -> list[Any]:
    value = batch.get(key)
    if value is None:
        return [None] * n
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1).tolist() if value.numel() == n else [None] * n
    value = list(value)
    return [v if not isinstance(v, torch.Tensor) else v.item() for v in value] if len(value) == n else [None] * n


def _per_sample_values(key: str, value: Any, n: int) -> torch.Tensor:
    """A metric's column as a float64 CPU tensor: ``[B]``, or ``[B, ...]`` for internal (``_``) keys."""
    value = torch.as_tensor(value).detach().double().cpu()
    if key.startswith("_") and value.ndim > 1:
        if value.shape[0] != n:
            raise ValueError(f"metric column {key!r} has {value.shape[0]} rows for a batch of {n}")
        return value
    return value.reshape(-1)


class RobustEvaluator(Evaluator):
    """A MONAI evaluator whose iteration scores one batch clean and under every cell of an attack grid.

    Args:
        device: evaluation device.
        val_data_loader: the test loader (dict batches with image and label; ``sample_id`` when available).
        network: the trained network (put in eval mode).
        loss_fn: per-sample ``[B]`` / ``[B, K]`` task loss that the attacks maximise.
        metric: the :class:`~amat_monai.metrics.TaskMetric`.
        cells: the grid (built by :func:`robust_evaluate`).
        inferer: optional ``inferer(x, network)``; attacks and scoring both use it.
        seed: seed of the random attacks (batch ``i`` uses ``seed + i``).
        image_key, label_key, id_key: batch keys.
        progress: show a tqdm bar over batches × cells.
        input_scores: optional ``{name: fn}``; ``fn(x)`` returns a ``[B]`` score of each clean or attacked input,
            recorded beside the metric's values as ``score_<name>`` (e.g. the detectors of
            :mod:`amat_monai.attack_detection`).
        kwargs: other :class:`~monai.engines.Evaluator` arguments (``prepare_batch``, ``val_handlers``...).

    After :meth:`run`, ``self.records`` holds per-batch outputs, aggregated by :func:`robust_evaluate`.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: Iterable,
        network: nn.Module,
        loss_fn: Callable,
        metric: TaskMetric,
        cells: Sequence[Cell],
        inferer: Callable | None = None,
        seed: int = 0,
        image_key: str = CommonKeys.IMAGE,
        label_key: str = CommonKeys.LABEL,
        id_key: str = "sample_id",
        progress: bool = True,
        input_scores: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(device=device, val_data_loader=val_data_loader, decollate=False, **kwargs)
        self.input_scores = dict(input_scores or {})
        self.network = network
        self.model = _InferencePath(network, inferer)
        self.loss_fn = loss_fn
        self.metric = metric
        self.cells = list(cells)
        self.seed = int(seed)
        self.image_key, self.label_key, self.id_key = image_key, label_key, id_key
        self.records: list[dict] = []
        self.seconds: dict[tuple, float] = {}
        self.progress = progress
        self._bar: tqdm | None = None
        self.add_event_handler(Events.STARTED, self._on_started)
        self.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration_completed)
        self.add_event_handler(Events.COMPLETED, self._close_bar)
        self.add_event_handler(Events.EXCEPTION_RAISED, self._on_exception)

    def _on_started(self, engine: Engine) -> None:
        self.records, self.seconds = [], {}
        total = engine.state.epoch_length * (1 + len(self.cells)) if engine.state.epoch_length else None
        self._bar = tqdm(total=total, desc="robust evaluation", unit="cell", disable=not self.progress, leave=False)

    def _on_iteration_completed(self, engine: Engine) -> None:
        self.records.append(engine.state.output)

    def _close_bar(self, engine: Engine | None = None) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _on_exception(self, engine: Engine, e: BaseException) -> None:
        self._close_bar()
        raise e

    def _score(self, x: torch.Tensor, y: torch.Tensor, batch: Mapping[str, Any]) -> tuple[dict, torch.Tensor]:
        with torch.no_grad():
            pred = self.model(x)
            losses = per_sample_terms(self.loss_fn(pred, y), x.shape[0]).sum(dim=1)
            values = self.metric.per_sample(pred, batch)
            if self.metric.name not in values:
                raise KeyError(f"{type(self.metric).__name__}.per_sample returned no {self.metric.name!r} column")
            for name, score in self.input_scores.items():
                values[f"score_{name}"] = score(x)
        return {k: _per_sample_values(k, v, x.shape[0]) for k, v in values.items()}, losses.detach().double().cpu()

    def _input_gradient_norm(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            losses = per_sample_terms(self.loss_fn(self.model(x), y), x.shape[0])
            (grad,) = torch.autograd.grad(losses.sum(), x, allow_unused=True)
        if grad is None:  # the loss does not depend on the input at all
            return torch.zeros(x.shape[0], dtype=torch.float64)
        return per_sample_norm(grad.detach(), "l2").double().cpu()

    def _worse(
        self, v_new: torch.Tensor, l_new: torch.Tensor, v_old: torch.Tensor, l_old: torch.Tensor
    ) -> torch.Tensor:
        """Per sample: is the new restart worse? By the primary value when both are defined, else by the loss."""
        both = torch.isfinite(v_new) & torch.isfinite(v_old)
        by_metric = self.metric.is_worse(v_new, v_old) | ((v_new == v_old) & (l_new > l_old))
        return torch.where(both, by_metric, l_new > l_old)

    def _iteration(self, engine: Engine, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        if not isinstance(batchdata, Mapping):
            raise TypeError(f"robust evaluation needs dictionary batches, got {type(batchdata).__name__}")
        prepared = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if not isinstance(prepared, (tuple, list)) or len(prepared) < 2 or prepared[1] is None:
            raise KeyError(f"batch has no label under {self.label_key!r}; keys: {sorted(batchdata)}")
        x, y = _plain(prepared[0]).float(), _plain(prepared[1])
        n = x.shape[0]
        batch = dict(batchdata)
        batch[self.image_key], batch[self.label_key] = x, y
        ids = [str(i) for i in _per_sample_list(batchdata, self.id_key, n)]
        if all(i == "None" for i in ids):
            ids = [f"{engine.state.iteration - 1}:{i}" for i in range(n)]
        meta = {k: _per_sample_list(batchdata, k, n) for k in self.metric.meta_keys}

        self.model.eval()  # the scored path (and the network in it) in eval mode
        clean_values, clean_loss = self._score(x, y, batch)
        out = {
            "ids": ids,
            "meta": meta,
            "clean": {"values": clean_values, "loss": clean_loss, "grad_norm": self._input_gradient_norm(x, y)},
            "cells": {},
        }
        if self._bar is not None:
            self._bar.update(1)
        generator_device = x.device if x.device.type != "mps" else "cpu"
        for cell in self.cells:
            start = time.perf_counter()
            best: dict | None = None
            for restart in range(cell.spec.effective_restarts):
                gen = torch.Generator(device=generator_device)
                gen.manual_seed(self.seed + 1_000_003 * (engine.state.iteration - 1) + 7919 * restart)
                x_adv = cell.spec.run(self.model, self.loss_fn, x, y, cell.eps, gen)
                if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
                    raise RuntimeError(f"attack {cell.spec.name} returned {getattr(x_adv, 'shape', type(x_adv))}, "
                                       f"expected a tensor of shape {tuple(x.shape)}")
                values, loss = self._score(x_adv, y, batch)
                delta_norm = per_sample_norm((x_adv - x).detach(), cell.spec.norm).double().cpu()
                current = {"values": values, "loss": loss, "delta_norm": delta_norm,
                           "restart": torch.full((n,), restart, dtype=torch.long)}
                if best is None:
                    best = current
                    continue
                worse = self._worse(values[self.metric.name], loss, best["values"][self.metric.name], best["loss"])
                best = {
                    "values": {k: torch.where(worse.view(-1, *[1] * (v.ndim - 1)), v, best["values"][k])
                               for k, v in values.items()},
                    **{k: torch.where(worse, current[k], best[k]) for k in ("loss", "delta_norm", "restart")},
                }
            out["cells"][cell.key] = best
            self.seconds[cell.key] = self.seconds.get(cell.key, 0.0) + time.perf_counter() - start
            if self._bar is not None:
                self._bar.update(1)
        return out


