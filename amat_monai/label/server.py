"""``amat-monai serve``: start a local MONAI Label server for the project's bundles.

:func:`serve_command` checks the bundles and the studies folder, writes a small MONAI Label app folder (a
``main.py`` that imports :class:`amat_monai.label.main.AmatLabelApp`) in a work folder, and runs the server in the
Python that has MONAI Label installed (this one, ``$AMAT_LABEL_PYTHON``, or the project's ``.venv-label`` made by
``scripts/install_label_env.sh``). The server runs as ``python -m amat_monai.label.server start_server ...``, which
installs the stand-ins of :mod:`amat_monai.label.compat` and then hands over to MONAI Label's own ``start_server``.

The work folder (``$AMAT_LABEL_WORKDIR``, else a new temporary folder removed on exit) receives what MONAI Label
writes beside an app (``model/``, ``logs/``, sessions); the studies folder receives MONAI Label's ``labels/``.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "APP_MAIN",
    "PROJECT_ROOT",
    "build_server_command",
    "default_bundles",
    "find_label_python",
    "main",
    "prepare_workdir",
    "serve_command",
]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: the MONAI Label app folder's main.py: MONAI Label finds the MONAILabelApp subclass in it.
APP_MAIN = "from amat_monai.label.main import AmatLabelApp  # noqa: F401  (the app served)\n"


def default_bundles(root: Path = PROJECT_ROOT) -> list[str]:
    """Every bundle folder under ``root/bundles`` that has a ``configs/inference.json``."""
    folder = root / "bundles"
    if not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.iterdir() if (p / "configs" / "inference.json").is_file())


def find_label_python() -> str:
    """The Python that has MONAI Label: this one, ``$AMAT_LABEL_PYTHON``, or the project's ``.venv-label``.

    Raises:
        RuntimeError: when none has it, saying how to install it.
    """
    if importlib.util.find_spec("monailabel") is not None:
        return sys.executable
    candidates = [os.environ.get("AMAT_LABEL_PYTHON"), str(PROJECT_ROOT / ".venv-label" / "bin" / "python")]
    for python in candidates:
        if python and os.access(python, os.X_OK):
            return python
    raise RuntimeError(
        "MONAI Label is not installed: run `bash scripts/install_label_env.sh` (it creates .venv-label), "
        "or set AMAT_LABEL_PYTHON to a Python that has monailabel"
    )


def prepare_workdir(workdir: str | os.PathLike) -> Path:
    """Create ``workdir/app/main.py`` (the MONAI Label app folder) and return the app folder."""
    app = Path(workdir) / "app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "main.py").write_text(APP_MAIN)
    return app


def build_server_command(
    python: str, app_dir: str | os.PathLike, studies: str, bundles: Sequence[str], host: str, port: int
) -> list[str]:
    """The command line that starts the MONAI Label server for ``bundles`` (absolute folders)."""
    return [
        python, "-m", "amat_monai.label.server", "start_server",
        "--app", str(app_dir),
        "--studies", str(studies),
        "--conf", "bundles", ",".join(bundles),
        "--host", host,
        "--port", str(port),
    ]  # fmt: skip


def _check_args(args: argparse.Namespace) -> tuple[list[str], str]:
    bundles = args.bundles if args.bundles else default_bundles()
    if not bundles:
        raise FileNotFoundError(f"no bundles to serve: none found under {PROJECT_ROOT / 'bundles'}; pass --bundles")
    checked = []
    for b in bundles:
        path = Path(b).resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"--bundles: bundle folder not found: {b}")
        if "," in str(path):
            raise ValueError(f"--bundles: a bundle path may not contain a comma: {path}")
        for rel in ("configs/inference.json", "configs/metadata.json", "models/model.pt"):
            if not (path / rel).is_file():
                hint = " (train the bundle first, or copy its trained weights there)" if "model" in rel else ""
                raise FileNotFoundError(f"--bundles: {path / rel} not found{hint}")
        checked.append(str(path))
    studies = Path(args.studies).resolve()
    if not studies.is_dir():
        raise FileNotFoundError(f"--studies: folder not found: {args.studies}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port: {args.port} is not a TCP port")
    return checked, str(studies)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _raise_interrupt() -> None:
    raise KeyboardInterrupt


def serve_command(args: argparse.Namespace) -> int:
    """Run the server in the foreground until it stops (Ctrl-C); return its exit status."""
    bundles, studies = _check_args(args)
    python = find_label_python()
    if not _is_loopback(args.host):
        print(f"amat-monai serve: warning: binding to {args.host}; the server has no authentication", file=sys.stderr)
    workdir = os.environ.get("AMAT_LABEL_WORKDIR")
    temporary = not workdir
    workdir = tempfile.mkdtemp(prefix="amat-label-") if temporary else os.path.abspath(workdir)
    try:
        app = prepare_workdir(workdir)
        env = dict(os.environ)
        env.setdefault("MONAI_LABEL_SESSION_PATH", os.path.join(workdir, "sessions"))
        cmd = build_server_command(python, app, studies, bundles, args.host, args.port)
        names = ", ".join(Path(b).name for b in bundles)
        print(f"amat-monai serve: models {names}; studies {studies}; http://{args.host}:{args.port}/info/", flush=True)
        proc = subprocess.Popen(cmd, cwd=workdir, env=env)
        # SIGINT / SIGTERM to this process stop the server too, also when it runs in the background (where a
        # non-interactive shell starts it with SIGINT ignored)
        previous = {s: signal.signal(s, lambda *_: _raise_interrupt()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            try:
                return proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the server process: install the stand-ins, then run MONAI Label's ``start_server``."""
    from amat_monai.label import compat

    replaced = compat.install()
    if replaced:
        print(f"amat_monai.label: stand-ins for the unused modules {', '.join(replaced)}", file=sys.stderr)
    from monailabel.main import Main

    sys.argv = ["monailabel", *(sys.argv[1:] if argv is None else argv)]
    Main(actions=("start_server",)).run()


if __name__ == "__main__":
    main()
