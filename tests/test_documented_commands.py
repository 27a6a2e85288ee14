"""Every training, calibration and evaluation command that the README and the bundles' docs show, run as
written.

Each ```bash block of a document is run as one bash script in a fresh subprocess (two documents at a time, each
on one thread), in a scratch folder that holds a copy of ``bundles/`` (so ``cd bundles/...`` and relative paths
work as documented), on the real data in
``$AMAT_DATA_DIR``. Only tiny settings are appended to each ``amat-monai train / calibrate / evaluate / detector``
and ``python -m monai.bundle run`` line (one epoch, a few cases, a small network, the CPU, 3 / 2 attack steps,
one adaptive weight), and an epoch count, case count or step count the document gives is replaced by the tiny
one. Shell set-up lines (``cd``, variables, ``for`` loops) run as written;
other commands (``make``, ``pip``, the MONAI Label server and ``curl``, benchmarks) are left out and listed in
the test's output. A documented command that fails, or that depends on a file no earlier command of the
document makes, fails this test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT, SEG_TINY, data_root

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

#: longest first (about 3.5, 3.5, 2, 1 and 0.7 min on one thread), as they run two at a time
DOCS = ["README.md", "bundles/ceph_landmarks/docs/README.md", "bundles/bccd_detection/docs/README.md",
        "docs/PERFORMANCE.md", "bundles/hippocampus_seg/docs/README.md"]
CEPH_TINY = {"image_size": [48, 40], "radius": 3.0, "features": [4, 4, 8, 8, 16, 4], "batch_size": 2,
             "validate_max_cases": 2}
BCCD_TINY = {"widths": [4, 8, 8, 16], "fpn_channels": 8, "batch_size": 2, "validate_max_cases": 2}
TINY = {"ceph": CEPH_TINY, "bccd": BCCD_TINY}
MAX_CASES = {"seg": 4, "ceph": 2, "bccd": 2}
STEPS = "3,2"  # PGD, IFGSM
#: the network's shape: not overridden for a command that loads a shipped model (bundles/<b>/models/model.pt)
SHAPE_KEYS = ("patch_size", "network_filters", "network_kernels", "network_strides", "image_size", "features", "radius",
              "widths", "fpn_channels")

_RUN = re.compile(r"^((?:[A-Z_]+=\S+ )*)(amat-monai (?:train|calibrate|evaluate|compare|detector (?:fit|evaluate))"
                  r"|python -m monai\.bundle run"
                  r"|torchrun .*-m monai\.bundle run)\b")
_SHELL = re.compile(r"^(cd |for |done\b|[A-Za-z_]+=\S*(?: [A-Za-z_]+=\S*)*$|[A-Za-z_]+=\S*;)")
#: placeholders the documents use for folders of the reader's own
_PLACEHOLDERS = {"/path/to/other_site/Task04_Hippocampus": "{other_site}"}


def _blocks(doc: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S)


def _lines(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped, ``a && b`` split."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).rstrip()
        if line.strip() and not line.strip().startswith("#"):
            out.extend(part.strip() for part in line.split(" && "))
    return out


def _tiny_args(command: str, kind: str, line: str) -> list[str]:
    tiny = TINY.get(kind, SEG_TINY)
    if re.search(r"bundles/\w+/models/model\.pt", line):
        tiny = {k: v for k, v in tiny.items() if k not in SHAPE_KEYS}
    if command.startswith("amat-monai"):
        sub = " ".join(command.split()[1:])
        if sub == "compare":
            return []
        args = ["--device", "cpu"] if "--device" not in line else []
        args += ["--max-cases", str(MAX_CASES[kind])] if "--max-cases" not in line else []
        args += ["--epochs", "1"] if sub == "train" and "--epochs" not in line else []
        evaluates = sub in ("evaluate", "detector evaluate")
        args += ["--steps", STEPS] if evaluates and "--steps" not in line else []
        args += ["--adaptive-weights", "1"] if sub == "detector evaluate" else []
        for key, value in tiny.items():
            args += ["--override", f"{key}={json.dumps(value)}"]
        return args
    # MONAI's runner (python-fire): values as Python literals
    args = ["--device", "$torch.device('cpu')", "--max_cases", str(MAX_CASES[kind])]
    args += ["--epochs", "1"] if "--epochs" not in line else []
    args += ["--robust#steps", f"[{STEPS}]"] if "robust_evaluate.json" in line else []
    for key, value in tiny.items():
        args += [f"--{key}", str(value)]
    return args


def _script(block: str, kind: str, substitutions: dict[str, str]) -> tuple[str, list[str]]:
    script, skipped = ["set -euo pipefail"], []
    for line in _lines(block):
        for placeholder, value in substitutions.items():
            line = line.replace(placeholder, value)
        stripped = line.strip()
        run = _RUN.match(stripped)
        if run:
            line = re.sub(r"--epochs \d+", "--epochs 1", line)
            line = re.sub(r"--max-cases \d+", f"--max-cases {MAX_CASES[kind]}", line)
            line = re.sub(r"--steps [\d,]+", f"--steps {STEPS}", line)
            script.append(f"{line} {' '.join(shlex.quote(a) for a in _tiny_args(run.group(2), kind, line))}")
        elif _SHELL.match(stripped) and "/path/to" not in stripped:
            script.append(line)
        else:
            skipped.append(stripped)
    return "\n".join(script) + "\n", skipped


def _run_doc(doc: str, root: Path, data_dir: Path) -> dict:
    """Every block of ``doc`` in its own scratch folder under ``root``; stops at the first failing block."""
    from amat_monai.data import make_synthetic_decathlon

    scratch = root / re.sub(r"\W+", "_", doc)
    work = scratch / "work"
    shutil.copytree(PROJECT_ROOT / "bundles", work / "bundles", ignore=shutil.ignore_patterns("runs", "mlruns", "eval"))
    other = make_synthetic_decathlon(scratch / "other_site" / "Task04_Hippocampus", num_cases=3, seed=9)
    substitutions = {k: v.format(other_site=other) for k, v in _PLACEHOLDERS.items()}
    env = dict(os.environ, AMAT_DATA_DIR=str(data_dir), OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    ran, skipped_all = 0, []
    for i, block in enumerate(_blocks(PROJECT_ROOT / doc)):
        kind = "ceph" if "ceph" in block else "bccd" if "bccd" in block else "seg"
        script, skipped = _script(block, kind, substitutions)
        skipped_all += skipped
        commands = sum(1 for line in script.splitlines() if _RUN.match(line.strip()))
        if not commands:
            continue
        done = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            return {"failure": f"{doc}, block {i + 1}:\n{script}\n--- output ---\n{(done.stdout + done.stderr)[-4000:]}"}
        ran += commands
    return {"ran": ran, "skipped": skipped_all}


@pytest.fixture(scope="module")
def documented_runs(tmp_path_factory) -> dict[str, dict]:
    """Every document's commands, two documents at a time (each command runs on one thread; CI has two cores)."""
    from concurrent.futures import ThreadPoolExecutor

    if not data_root().is_dir():
        pytest.skip(f"real data not found at {data_root()} (set AMAT_DATA_DIR)")
    root = tmp_path_factory.mktemp("docs")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {doc: pool.submit(_run_doc, doc, root, data_root()) for doc in DOCS}
        return {doc: future.result() for doc, future in futures.items()}


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_run_as_written(doc, documented_runs):
    result = documented_runs[doc]
    assert "failure" not in result, result.get("failure")
    print(f"{doc}: ran {result['ran']} documented commands; left out: {result['skipped']}")
    assert result["ran"] > 0
