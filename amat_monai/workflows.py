"""Train and calibrate any bundle of this project through ``monai.bundle.ConfigWorkflow``.

A thin, bundle-agnostic layer: it picks the bundle's config files for a method (``train.json`` plus
``vat.json`` / ``amat.json`` / ``teat.json``), applies overrides (``dataset_dir``, ``output_dir``, ``epochs``,
``eps``, ``xi_file``, ``max_cases``, ``device`` and any ``--override KEY=JSON``), then runs the MONAI
workflow protocol (initialize, check_properties, run, finalize). Checkpoints, final weights and
resuming are in :mod:`amat_monai.checkpoints`.

Python use::

    paths = train("bundles/hippocampus_seg", "std", dataset_dir, "runs/std", epochs=2)
    xi = calibrate("bundles/hippocampus_seg", dataset_dir, "runs/std", paths["model"])
    train("bundles/hippocampus_seg", "amat", dataset_dir, "runs/amat", xi_file=xi)
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.utils import ID_SEP_KEY

from amat_monai import distributed
from amat_monai.checkpoints import atomic_write_text, file_sha256
from amat_monai.data.labelled import check_labelled_fraction

__all__ = [
    "METHOD_CONFIGS",
    "config_files",
    "parse_overrides",
    "check_override_keys",
    "common_overrides",
    "device_expression",
    "build_workflow",
    "run_workflow",
    "train",
    "calibrate",
    "fit_detector",
    "evaluate_clean",
    "require_file",
    "evaluation_summary",
    "write_json",
]

logger = logging.getLogger(__name__)

#: config files merged on top of ``train.json`` for each method
METHOD_CONFIGS: dict[str, tuple[str, ...]] = {"std": (), "vat": ("vat.json",), "amat": ("amat.json",), "teat": ("teat.json",)}


# --------------------------------------------------------------------------------------------------------
# building and running workflows
# --------------------------------------------------------------------------------------------------------
def config_files(bundle: str | os.PathLike, names: Sequence[str]) -> list[str]:
    """Absolute paths of ``bundle/configs/<name>``; raises ``FileNotFoundError`` naming a missing one."""
    configs = Path(bundle) / "configs"
    if not configs.is_dir():
        raise FileNotFoundError(f"{bundle} is not a bundle folder (no configs/ inside)")
    files = []
    for name in names:
        f = configs / name
        if not f.is_file():
            raise FileNotFoundError(f"bundle config not found: {f}")
        files.append(str(f.resolve()))
    return files


def _expressions(value: Any) -> list[str]:
    """The strings in ``value`` (nested lists / dicts too) that MONAI would run (``$``) or read as a macro (``%``)."""
    if isinstance(value, str):
        return [value] if value.startswith(("$", "%")) else []
    if isinstance(value, (list, tuple)):
        return [e for v in value for e in _expressions(v)]
    if isinstance(value, dict):
        return [e for v in value.values() for e in _expressions(v)]
    return []


def parse_overrides(items: Sequence[str] | None, allow_expr: bool = False) -> dict[str, Any]:
    """``["KEY=JSON", ...]`` -> ``{KEY: value}``.

    Values must be JSON (a string is written with its quotes: ``'name="text"'``). A MONAI expression (``$...``)
    or macro (``%...``) runs code or reads files when the config is parsed, so it is refused unless
    ``allow_expr``: a wrapper may pass on values it did not write. Whether KEY exists is checked by
    :func:`build_workflow`, which knows the bundle's config.
    """
    out: dict[str, Any] = {}
    for text in items or []:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--override expects KEY=JSON, got {text!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            hint = f"; a string needs JSON quotes: {key}='\"{value}\"'" if value and value[0] not in "[{\"" else ""
            raise ValueError(f"--override {text}: the value is not JSON{hint}") from None
        if not allow_expr and _expressions(out[key]):
            raise ValueError(
                f"--override {text}: {_expressions(out[key])[0]!r} is a MONAI expression or macro, which runs code "
                "when the config is parsed; pass --allow-expr to allow it"
            )
    return out


def check_override_keys(config: Mapping[str, Any], keys: Sequence[str], where: str) -> None:
    """Raise ``KeyError`` for an override key that is not in the merged config, with the closest key as a hint.

    A nested key (``robust#eps``) must exist under its parent; a typo would otherwise be added as a new, unused
    key and silently ignored.
    """
    for key in keys:
        *parents, last = re.split(rf"#|{ID_SEP_KEY}", key)  # MONAI accepts both separators
        node: Any = config
        for part in parents:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and last in node:
            continue
        choices = ["#".join([*parents, k]) for k in node] if isinstance(node, Mapping) else []
        close = difflib.get_close_matches(key, choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown key {key!r} in {where}{hint}")


def _root_cause(e: BaseException) -> BaseException:
    """The innermost error of a chain (MONAI wraps instantiation errors in ``RuntimeError``).

    It follows ``raise ... from`` causes and implicit contexts, but stops at an error raised ``from None``: that
    one was written to replace what it suppresses (e.g. "cannot read ...nii.gz: it is corrupt" instead of a bare
    ``EOFError``), so its message is the one to show.
    """
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
        if inner is None:
            break
        e = inner
    return e


def build_workflow(
    bundle: str | os.PathLike, names: Sequence[str], workflow_type: str = "train", **overrides: Any
) -> ConfigWorkflow:
    """A ``ConfigWorkflow`` on ``bundle``'s configs ``names`` (merged in order) with ``bundle_root`` set."""
    files = config_files(bundle, names)
    check_override_keys(ConfigParser.load_config_files(files), list(overrides),
                        f"{bundle}'s configs {', '.join(names)}")
    bundle_root = str(Path(bundle).resolve())
    meta = os.path.join(bundle_root, "configs", "metadata.json")
    logging_file = os.path.join(bundle_root, "configs", "logging.conf")
    return ConfigWorkflow(
        config_file=files,
        meta_file=meta if os.path.isfile(meta) else None,
        logging_file=logging_file if os.path.isfile(logging_file) else False,
        workflow_type=workflow_type,
        **{"bundle_root": bundle_root, **overrides},
    )


def run_workflow(workflow: ConfigWorkflow) -> list[Any]:
    """initialize, check_properties (must be empty), run, finalize. Errors from deep inside MONAI's config
    instantiation are re-raised as their root cause, whose message names the bad file or argument."""
    try:
        workflow.initialize()
        missing = workflow.check_properties()
        if missing:
            raise ValueError(f"the bundle config lacks required properties: {missing}")
        result = workflow.run()
        workflow.finalize()
        return result
    except (RuntimeError, KeyError) as e:
        root = _root_cause(e)
        if root is not e and isinstance(root, Exception):
            raise root from None
        raise


def common_overrides(dataset_dir, output_dir, max_cases=None, device=None, checkpoint=None) -> dict[str, Any]:
    """Bundle config overrides for the usual run arguments, checked first: a missing dataset folder or
    checkpoint raises ``FileNotFoundError`` naming it; ``None`` leaves the config's value."""
    out: dict[str, Any] = {}
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        out["checkpoint"] = str(Path(checkpoint).resolve())
    if dataset_dir is not None:
        if not Path(dataset_dir).is_dir():
            raise FileNotFoundError(f"dataset_dir not found: {dataset_dir}")
        out["dataset_dir"] = str(Path(dataset_dir).resolve())
    if output_dir is not None:
        out["output_dir"] = str(Path(output_dir).resolve())
    if max_cases is not None:
        out["max_cases"] = int(max_cases)
    if device is not None:
        out["device"] = device_expression(device)
    return out


def device_expression(device: str) -> str:
    """The config expression for ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``), checked here first.

    Raises:
        ValueError: for an unknown device name, or CUDA when this torch sees no CUDA device.
    """
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"--device {device}: no CUDA device is available (torch {torch.__version__}, {build}); "
                         "use --device cpu")
    return f"$torch.device('{device}')"


def _value(workflow: ConfigWorkflow, key: str) -> Any:
    return workflow.parser.get_parsed_content(key) if key in workflow.parser else None


def train(
    bundle: str | os.PathLike,
    method: str = "std",
    dataset_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    nproc: int = 1,
    ssat: bool = False,
    **overrides: Any,
) -> dict[str, str]:
    """Train ``method`` (std, vat, amat, teat) with the bundle's configs.

    Args:
        bundle: the bundle folder.
        method: which adversarial handler (``train.json`` alone for std).
        dataset_dir, output_dir: override the config's.
        nproc: processes; more than one goes through :func:`amat_monai.distributed.launch` (with the bundle's
            ``multi_gpu_train.json``).
        ssat: add semi-supervised adversarial training on the unlabelled training cases (``ssat.json``; give
            ``labelled_fraction`` below 1, e.g. ``labelled_fraction=0.2``).
        overrides: any other config ids, e.g. ``epochs=2``, ``eps=2.0``, ``xi_file=...``, ``max_cases=4``,
            ``device="cpu"`` (a device name is turned into a ``torch.device``).

    Returns:
        ``{"output_dir", "model", "ckpt_dir", "split_file"}`` (``model`` is the final ``model.pt``).
    """
    if method not in METHOD_CONFIGS:
        raise ValueError(f"method must be one of {sorted(METHOD_CONFIGS)}, got {method!r}")
    device = overrides.pop("device", None)
    max_cases = overrides.pop("max_cases", None)
    ovr = {**common_overrides(dataset_dir, output_dir, max_cases, device), **overrides}
    if method == "amat" and "xi_file" in ovr and not Path(ovr["xi_file"]).is_file():
        raise FileNotFoundError(
            f"ξ file not found: {ovr['xi_file']} (AMAT needs thresholds from a normally trained model: "
            "run `amat-monai calibrate` on the STD checkpoint first)"
        )
    names = ["train.json", *METHOD_CONFIGS[method], *(["ssat.json"] if ssat else [])]
    if ssat and check_labelled_fraction(ovr.get("labelled_fraction")) == 1.0:
        raise ValueError("ssat needs unlabelled cases: give labelled_fraction below 1 (e.g. --labelled-fraction 0.2)")
    if nproc > 1:
        names.append("multi_gpu_train.json")
        files = config_files(bundle, names)
        distributed.launch(files, nproc, {"bundle_root": str(Path(bundle).resolve()), **ovr})
        workflow = build_workflow(bundle, names, "train", **ovr)
        workflow.parser.parse()
    else:
        workflow = build_workflow(bundle, names, "train", **ovr)
        run_workflow(workflow)
    return {
        "output_dir": str(_value(workflow, "output_dir")),
        "model": str(_value(workflow, "model_path")),
        "ckpt_dir": str(_value(workflow, "ckpt_dir")),
        "split_file": str(_value(workflow, "split_file")),
    }


def calibrate(
    bundle: str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    z: float | None = None,
    estimator: str | None = None,
    **overrides: Any,
) -> str:
    """Run ``calibrate.json``: the STD model over the clean training split, writing ``xi.json``.

    Returns:
        the path of ``xi.json`` (``<output_dir>/xi.json`` unless ``xi_file`` is overridden).
    """
    device = overrides.pop("device", None)
    max_cases = overrides.pop("max_cases", None)
    ovr = common_overrides(dataset_dir, output_dir, max_cases, device, checkpoint)
    if z is not None:
        ovr["xi_z"] = float(z)
    if estimator is not None:
        ovr["xi_estimator"] = estimator
    ovr.update(overrides)
    workflow = build_workflow(bundle, ["train.json", "calibrate.json"], "infer", **ovr)
    run_workflow(workflow)
    return str(_value(workflow, "xi_file"))


def fit_detector(
    bundle: str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Run ``detector.json``: fit the attack detectors of a checkpoint on its clean training and validation splits.

    Returns:
        the content of the ``detector.json`` it writes (next to the checkpoint unless ``detector#output_dir``).
    """
    device = overrides.pop("device", None)
    max_cases = overrides.pop("max_cases", None)
    ovr = common_overrides(dataset_dir, output_dir, max_cases, device, checkpoint)
    ovr.update(overrides)
    workflow = build_workflow(bundle, ["train.json", "detector.json"], "infer", **ovr)
    return next(r for r in run_workflow(workflow) if isinstance(r, dict))


def evaluate_clean(
    bundle: str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Run ``evaluate.json``: clean Dice of a checkpoint on the test (or ``eval_section``) split.

    Returns:
        the content of the ``evaluation.json`` it writes.
    """
    device = overrides.pop("device", None)
    max_cases = overrides.pop("max_cases", None)
    ovr = common_overrides(dataset_dir, output_dir, max_cases, device, checkpoint)
    ovr.update(overrides)
    workflow = build_workflow(bundle, ["train.json", "evaluate.json"], "infer", **ovr)
    run_workflow(workflow)
    return json.loads(Path(_value(workflow, "evaluation_file")).read_text())


def require_file(path: str | os.PathLike | None, what: str = "file") -> str:
    """Fail early, naming the file, when a config's input file is missing."""
    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return str(path)


def evaluation_summary(evaluator: Engine, checkpoint: str | os.PathLike, section: str, slices: str) -> dict[str, Any]:
    """The metrics of a finished evaluator run, for ``evaluation.json``."""
    metrics = {}
    for name, value in evaluator.state.metrics.items():
        value = value.tolist() if isinstance(value, torch.Tensor) else value
        metrics[name] = value
    return {
        "metrics": metrics,
        "section": section,
        "slices": slices,
        "num_samples": len(evaluator.data_loader.dataset),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": file_sha256(checkpoint) if Path(checkpoint).is_file() else None,
    }


def write_json(path: str | os.PathLike, content: Any) -> str:
    """Write ``content`` as JSON atomically (used by ``evaluate.json``)."""
    atomic_write_text(path, json.dumps(content, indent=2, default=float) + "\n")
    return str(path)
