"""MONAI Label integration (amat_monai.label): unit tests, and end-to-end tests against a real local server.

The end-to-end tests start ``amat-monai serve`` in the separate MONAI Label environment made by
``scripts/install_label_env.sh`` (``.venv-label``, or ``$AMAT_LABEL_PYTHON``) on a free port of 127.0.0.1, and
skip with the reason when it is absent. Two servers are started:

- one with two tiny bundles made here whose outputs are known exactly (a 1x1-convolution that thresholds
  intensities, run slice by slice over a NIfTI volume; a network whose landmark heatmaps peak at spots of known
  intensity on a PNG), so the served label and landmark coordinates are checked value by value;
- one with copies of the shipped bundles (``bundles/hippocampus_seg``, ``bundles/ceph_landmarks``) with randomly
  initialised weights (trained weights are not in git), checked for shapes, label values and 19 landmarks.

Each server runs in its own process group, killed in the fixture's ``finally`` whatever the tests did.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from argparse import Namespace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from amat_monai.label.detection import box_label_map, check_box_result
from amat_monai.label.landmarks import check_landmark_result, find_decoder, landmark_label_map, to_image_grid
from amat_monai.label.server import APP_MAIN, build_server_command, prepare_workdir, serve_command
from amat_monai.label.writer import write_label

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
START_TIMEOUT_S = 180
NUM_LANDMARKS = 19


# ----------------------------------------------------------------------------------------------------------------
# unit tests (any environment)


def test_landmark_label_map_draws_discs_in_x_first_order():
    m = landmark_label_map(np.array([[2.2, 5.0], [10.0, 1.6]]), width=12, height=8, radius=1)
    assert m.shape == (12, 8) and m.dtype == np.uint8
    assert m[2, 5] == 1 and m[1, 5] == 1 and m[3, 5] == 1 and m[2, 4] == 1 and m[2, 6] == 1
    assert m[10, 2] == 2 and m[11, 2] == 2 and m[10, 3] == 2
    assert m[3, 6] == 0  # diagonal neighbour is outside a radius-1 disc
    assert int((m == 1).sum()) == 5 and int((m == 2).sum()) == 5
    edge = landmark_label_map(np.array([[-1.0, -1.0]]), width=4, height=4, radius=2)
    assert edge[0, 0] == 1 and edge[1, 1] == 0  # only the part inside the image


def test_to_image_grid_inverts_the_original_grid_mapping():
    image_xy = np.array([[3.0, 7.0], [0.0, 0.0]])
    original = (image_xy + 0.5) * np.array([4.0, 5.0]) - 0.5  # W 16 -> 64, H 20 -> 100
    back = to_image_grid(original, (100, 64), (20, 16))
    np.testing.assert_allclose(back, image_xy, atol=1e-9)
    np.testing.assert_allclose(to_image_grid(image_xy, None, (20, 16)), image_xy)


def test_check_landmark_result_rejects_bad_json():
    good = {"landmarks": [{"id": "a", "x": 1.0, "y": 2.0, "x_mm": 0.1, "y_mm": 0.2}]}
    assert check_landmark_result(good, 1) == good["landmarks"]
    with pytest.raises(ValueError, match="expected 2 landmarks"):
        check_landmark_result(good, 2)
    with pytest.raises(ValueError, match="y_mm"):
        check_landmark_result({"landmarks": [{"id": "a", "x": 1.0, "y": 2.0, "x_mm": 0.1, "y_mm": float("nan")}]})
    with pytest.raises(ValueError, match="no 'landmarks'"):
        check_landmark_result({})


def test_find_decoder():
    config = {"postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd"}, {"_target_": "amat_monai.landmarks.DecodeLandmarksd", "keys": "pred"}]}}
    assert find_decoder(config) == "postprocessing#transforms#1"
    assert find_decoder({"postprocessing": [{"_target_": "DecodeLandmarksd"}]}) == "postprocessing#0"
    assert find_decoder({"postprocessing": [{"_target_": "AsDiscreted"}]}) is None
    assert find_decoder({}) is None
    boxes = {"postprocessing": [{"_target_": "amat_monai.object_detection.DetectBoxesd"}]}
    assert find_decoder(boxes) is None and find_decoder(boxes, name="DetectBoxesd") == "postprocessing#0"


def test_box_label_map_draws_outlines_in_x_first_order_and_checks_the_json():
    boxes = [{"label": 1, "name": "WBC", "score": 0.9, "x1": 2.0, "y1": 1.0, "x2": 8.0, "y2": 5.0},
             {"label": 0, "name": "RBC", "score": 0.5, "x1": 18.0, "y1": 8.0, "x2": 30.0, "y2": 20.0}]
    out = box_label_map(boxes, width=20, height=10, thickness=1)
    assert out.shape == (20, 10)
    assert out[2, 1] == out[7, 4] == out[5, 1] == out[2, 3] == 2  # corners and edges of the first box, x first
    assert out[4, 3] == 0  # its inside stays empty
    assert out[18, 8] == out[19, 9] == 1 and out[17, 8] == 0  # the second box is clipped to the image
    assert check_box_result({"boxes": boxes}, 3) == boxes and check_box_result({"boxes": []}) == []
    for bad in ({}, {"boxes": [{**boxes[0], "x2": 1.0}]}, {"boxes": [{**boxes[0], "label": 3}]},
                {"boxes": [{**boxes[0], "score": float("nan")}]}):
        with pytest.raises(ValueError):
            check_box_result(bad, 3)


def test_write_label_png_and_nifti_round_trip(tmp_path):
    label = np.zeros((6, 4), dtype=np.int64)  # MONAI order for a 2D image: (width, height)
    label[5, 3] = 7
    png = write_label(torch.as_tensor(label)[None], str(tmp_path / "x.png"), 2)
    try:
        read = np.array(Image.open(png))
        assert png.endswith(".png") and read.shape == (4, 6) and read[3, 5] == 7 and read.sum() == 7
    finally:
        os.remove(png)
    volume = np.arange(24).reshape(2, 3, 4) % 3
    affine = np.diag([2.0, 1.0, 1.5, 1.0])
    affine[:3, 3] = [5.0, -3.0, 1.0]
    nii = write_label(volume, str(tmp_path / "v.nii.gz"), 3, affine)
    try:
        img = nib.load(nii)
        assert nii.endswith(".nii.gz")
        np.testing.assert_array_equal(np.asarray(img.dataobj), volume)
        np.testing.assert_allclose(img.affine, affine)
    finally:
        os.remove(nii)
    with pytest.raises(ValueError, match="non-integer"):
        write_label(np.full((2, 2), 0.5), "x.png", 2)
    with pytest.raises(ValueError, match="single-channel"):
        write_label(np.zeros((2, 3, 3)), "x.png", 2)
    with pytest.raises(ValueError, match="8-bit"):
        write_label(np.full((2, 2), 300), "x.png", 2)


def test_compat_stand_ins_fail_loudly_when_used():
    code = (
        "import importlib.util, sys\n"
        "from amat_monai.label import compat\n"
        "names = ('itk', 'SimpleITK', 'pydicom_seg', 'torchvision')\n"
        "missing = [n for n in names if importlib.util.find_spec(n) is None]\n"
        "replaced = compat.install()\n"
        "assert set(missing) <= set(replaced), (missing, replaced)\n"
        "assert compat.installed_stand_ins() == sorted(replaced)\n"
        "assert compat.install() == []  # idempotent\n"
        "import itk\n"
        "from torchvision.utils import make_grid\n"
        "import monai.data.image_reader as r\n"
        "assert not r.has_itk\n"
        "for f in (lambda: itk.imread('x'), lambda: make_grid([]), lambda: itk.Image.New):\n"
        "    try:\n"
        "        f()\n"
        "    except compat.MissingModuleError as e:\n"
        "        assert 'not installed' in str(e) and 'docs/MONAI_LABEL.md' in str(e)\n"
        "    else:\n"
        "        raise SystemExit('a stand-in did not raise')\n"
        "print('replaced', replaced)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "replaced" in out.stdout


def test_serve_command_checks_arguments(tmp_path):
    bundle = tmp_path / "b"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "inference.json").write_text("{}")
    (bundle / "configs" / "metadata.json").write_text("{}")
    studies = tmp_path / "studies"
    studies.mkdir()
    args = Namespace(bundles=[str(bundle)], studies=str(studies), host=HOST, port=8000)
    with pytest.raises(FileNotFoundError, match="model.pt"):
        serve_command(args)
    with pytest.raises(FileNotFoundError, match="bundle folder not found"):
        serve_command(Namespace(**{**vars(args), "bundles": [str(tmp_path / "nope")]}))
    (bundle / "models").mkdir()
    (bundle / "models" / "model.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="--studies"):
        serve_command(Namespace(**{**vars(args), "studies": str(tmp_path / "none")}))
    with pytest.raises(ValueError, match="--port"):
        serve_command(Namespace(**{**vars(args), "port": 70000}))


def test_server_command_and_app_folder(tmp_path):
    app = prepare_workdir(tmp_path)
    assert (app / "main.py").read_text() == APP_MAIN
    cmd = build_server_command("py", app, "/s", ["/b/one", "/b/two"], HOST, 8123)
    assert cmd[:4] == ["py", "-m", "amat_monai.label.server", "start_server"]
    assert cmd[cmd.index("--conf") + 1 : cmd.index("--conf") + 3] == ["bundles", "/b/one,/b/two"]
    assert cmd[cmd.index("--host") + 1] == HOST and cmd[cmd.index("--port") + 1] == "8123"
    assert "monaihosting" not in cmd


# ----------------------------------------------------------------------------------------------------------------
# end-to-end: a real MONAI Label server


def _label_python() -> str | None:
    if importlib.util.find_spec("monailabel") is not None:
        return sys.executable
    for p in (os.environ.get("AMAT_LABEL_PYTHON"), str(PROJECT_ROOT / ".venv-label" / "bin" / "python")):
        if p and os.access(p, os.X_OK):
            return p
    return None


LABEL_PYTHON = _label_python()
needs_label_env = pytest.mark.skipif(
    LABEL_PYTHON is None,
    reason="MONAI Label environment absent: run `bash scripts/install_label_env.sh` (creates .venv-label) "
    "or set AMAT_LABEL_PYTHON",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", timeout: float = 120) -> tuple[bytes, str]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read(), resp.headers.get("content-type", "")


class Server:
    """A running ``amat-monai serve`` process group."""

    def __init__(self, root: Path, bundles: list[Path], studies: Path) -> None:
        self.studies = studies
        self.port = _free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = root / "server.log"
        env = dict(os.environ, OMP_NUM_THREADS="1", AMAT_LABEL_WORKDIR=str(root / "work"), PYTHONUNBUFFERED="1")
        cmd = [LABEL_PYTHON, "-m", "amat_monai.cli", "serve", "--bundles", ",".join(map(str, bundles)),
               "--studies", str(studies), "--host", HOST, "--port", str(self.port)]  # fmt: skip
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def log_tail(self, n: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self) -> dict:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                body, _ = _request(f"{self.url}/info/", timeout=5)
                return json.loads(body)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise AssertionError(f"server not ready after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        finally:
            self.log.close()

    def infer(self, model: str, image: str, output: str) -> tuple[bytes, str]:
        try:
            return _request(f"{self.url}/infer/{model}?image={image}&output={output}", method="POST")
        except urllib.error.HTTPError as e:
            raise AssertionError(f"/infer/{model} failed: {e.code} {e.read()[:2000]!r}\n{self.log_tail()}") from None


def _start(root: Path, bundles: list[Path], studies: Path):
    server = Server(root, bundles, studies)
    try:
        info = server.wait_ready()
        yield server, info
    finally:
        server.stop()


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, affine), str(path))


# tiny bundles with exactly known outputs ----------------------------------------------------------------------

SPOT_NET = '''"""A landmark network with a known answer: heatmap k peaks where the image equals levels[k]."""

import torch


class SpotNet(torch.nn.Module):
    def __init__(self, num_landmarks: int = 19, sharpness: float = 1e5) -> None:
        super().__init__()
        self.sharpness = sharpness
        self.register_buffer("levels", torch.zeros(num_landmarks))  # the real values come from model.pt

    def forward(self, x):
        x = x[:, :1]
        heat = 10.0 - self.sharpness * (x - self.levels.view(1, -1, 1, 1)) ** 2
        offsets = torch.zeros_like(heat).repeat(1, 2, 1, 1)
        return torch.cat([heat, offsets], dim=1)
'''

SEG_SHAPE = (9, 10, 8)  # the tiny volume; SliceInferer (spatial_dim 0) runs the 2D net on its 9 (10, 8) slices
SEG_AFFINE = np.array([[2.0, 0, 0, 5.0], [0, 1.0, 0, -3.0], [0, 0, 1.5, 1.0], [0, 0, 0, 1]])
LMK_SIZE = (64, 80)  # width, height of the tiny radiograph
LMK_SCALE = 4  # its "original" grid is 4x finer, like the ISBI 2015 images stored at quarter size
SPOTS = [(6 + 12 * (k % 5), 6 + 17 * (k // 5)) for k in range(NUM_LANDMARKS)]  # (x, y), >= 12 px apart


def _tiny_seg_bundle(root: Path) -> Path:
    b = root / "tiny_seg"
    (b / "configs").mkdir(parents=True)
    (b / "models").mkdir()
    inference = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": "$torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1))",
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "image_only": True, "ensure_channel_first": True},
            {"_target_": "ScaleIntensityd", "keys": "image"},
            {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"}]},
        "inferer": {"_target_": "SliceInferer", "roi_size": list(SEG_SHAPE[1:]), "spatial_dim": 0},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]},
    }  # fmt: skip
    metadata = {"version": "0.0.1", "description": "thresholds intensity into 3 classes", "network_data_format": {
        "inputs": {"image": {"type": "image", "num_channels": 1, "spatial_shape": list(SEG_SHAPE[1:])}},
        "outputs": {"pred": {"type": "image", "num_channels": 3, "spatial_shape": list(SEG_SHAPE[1:]),
                             "channel_def": {"0": "background", "1": "middle", "2": "bright"}}}}}  # fmt: skip
    (b / "configs" / "inference.json").write_text(json.dumps(inference, indent=1))
    (b / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=1))
    # logits (0, x - 1/3, 2x - 1): class 0 below 1/3, 1 between 1/3 and 2/3, 2 above 2/3 of the intensity range
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([0.0, 1.0, 2.0]).view(3, 1, 1, 1))
        net[0].bias.copy_(torch.tensor([0.0, -1.0 / 3.0, -1.0]))
    torch.save(net.state_dict(), b / "models" / "model.pt")
    _fit_tiny_detector(net, b / "models" / "model.pt")
    return b


def _tiny_volumes(n: int, seed: int) -> np.ndarray:
    """Volumes like the tiny study's (intensities drawn from 5 levels), scaled to [0, 1] as its preprocessing does."""
    return np.random.default_rng(seed).choice([0.0, 0.25, 0.5, 0.75, 1.0], size=(n, *SEG_SHAPE)).astype(np.float32)


def _fit_tiny_detector(net: torch.nn.Module, model: Path) -> None:
    """The tiny bundle's attack detector: fitted on the slices of clean volumes, thresholds on others."""
    from amat_monai.attack_detection import fit_detectors

    def slices(volumes: np.ndarray, first_case: int) -> list[dict]:
        x = torch.from_numpy(volumes).unsqueeze(2)  # [N, 9 slices, C, 10, 8]: slices along spatial axis 0
        return [{"image": v, "case": [f"case{first_case + i}"] * v.shape[0]} for i, v in enumerate(x)]

    fit_detectors(net, model, slices(_tiny_volumes(30, 3), 0), slices(_tiny_volumes(40, 4), 100), ["0"],
                  progress=False)


def _tiny_landmark_bundle(root: Path) -> Path:
    b = root / "tiny_landmarks"
    (b / "configs").mkdir(parents=True)
    (b / "models").mkdir()
    (b / "scripts").mkdir()
    (b / "scripts" / "__init__.py").write_text("")
    (b / "scripts" / "spot_net.py").write_text(SPOT_NET)
    w, h = LMK_SIZE
    inference = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "landmark_names": [f"L{k + 1}" for k in range(NUM_LANDMARKS)],
        "network_def": {"_target_": "scripts.spot_net.SpotNet", "num_landmarks": NUM_LANDMARKS},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "reader": "PILReader", "reverse_indexing": False},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "ScaleIntensityd", "keys": "image"},
            {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
            {"_target_": "Lambda", "func": f"$lambda d: dict(d, original_size=[{h * LMK_SCALE}, {w * LMK_SCALE}])"}]},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "amat_monai.landmarks.DecodeLandmarksd", "keys": "pred", "radius": 2.0,
             "names": "@landmark_names"}]},
    }  # fmt: skip
    metadata = {"version": "0.0.1", "description": "finds spots of known intensity", "network_data_format": {
        "inputs": {"image": {"type": "image", "num_channels": 1, "spatial_shape": [h, w]}},
        "outputs": {"pred": {"type": "image", "num_channels": 3 * NUM_LANDMARKS, "spatial_shape": [h, w]}}}}
    (b / "configs" / "inference.json").write_text(json.dumps(inference, indent=1))
    (b / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=1))
    levels = torch.arange(1, NUM_LANDMARKS + 1, dtype=torch.float32) / NUM_LANDMARKS
    torch.save({"levels": levels}, b / "models" / "model.pt")
    return b


def _tiny_studies(root: Path) -> Path:
    studies = root / "studies"
    studies.mkdir()
    rng = np.random.default_rng(0)
    volume = rng.choice([0.0, 25.0, 50.0, 75.0, 100.0], size=SEG_SHAPE).astype(np.float32)
    volume[0, 0, 0], volume[0, 0, 1] = 0.0, 100.0  # the intensity range is exactly [0, 100]
    _save_nifti(studies / "volume_0.nii.gz", volume, SEG_AFFINE)
    # a volume whose slices no clean volume resembles: a checkerboard of the two extreme intensities
    checkerboard = (np.indices(SEG_SHAPE).sum(axis=0) % 2 * 100.0).astype(np.float32)
    _save_nifti(studies / "checkerboard_0.nii.gz", checkerboard, SEG_AFFINE)
    w, h = LMK_SIZE
    image = np.zeros((h, w), dtype=np.uint8)
    for k, (x, y) in enumerate(SPOTS):
        image[y, x] = 10 * (k + 1)
    Image.fromarray(image).save(studies / "radiograph_0.png")
    return studies


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    if LABEL_PYTHON is None:
        pytest.skip("MONAI Label environment absent: run `bash scripts/install_label_env.sh`")
    root = tmp_path_factory.mktemp("label_tiny")
    bundles = [_tiny_seg_bundle(root), _tiny_landmark_bundle(root)]
    yield from _start(root, bundles, _tiny_studies(root))


@needs_label_env
def test_info_lists_the_bundles(tiny_server):
    server, info = tiny_server
    assert set(info["models"]) == {"tiny_seg", "tiny_landmarks"}
    seg, lmk = info["models"]["tiny_seg"], info["models"]["tiny_landmarks"]
    assert seg["type"] == "segmentation" and seg["labels"] == {"middle": 1, "bright": 2}
    assert seg["dimension"] == 3  # a 2D network served slice by slice over volumes
    assert lmk["dimension"] == 2 and lmk["labels"] == {f"L{k + 1}": k + 1 for k in range(NUM_LANDMARKS)}
    assert info["trainers"] == {}
    assert info["datastore"]["total"] == 3


@needs_label_env
def test_infer_segmentation_returns_the_expected_label_volume(tiny_server, tmp_path):
    server, _ = tiny_server
    body, content_type = server.infer("tiny_seg", "volume_0", "image")
    out = tmp_path / "label.nii.gz"
    out.write_bytes(body)
    label = nib.load(str(out))
    volume = np.asarray(nib.load(str(server.studies / "volume_0.nii.gz")).dataobj)
    expected = np.digitize(volume / 100.0, [1 / 3, 2 / 3])  # the thresholds the weights implement
    assert label.shape == SEG_SHAPE
    np.testing.assert_array_equal(np.asarray(label.dataobj), expected)
    assert set(np.unique(expected)) == {0, 1, 2}
    np.testing.assert_allclose(label.affine, SEG_AFFINE, atol=1e-5)


@needs_label_env
def test_infer_carries_the_attack_detectors_verdict_per_slice_and_per_volume(tiny_server):
    server, _ = tiny_server
    detector = json.loads((server.studies.parent / "tiny_seg" / "models" / "detector.json").read_text())
    verdicts = {}
    for image in ("volume_0", "checkerboard_0"):
        body, _ = server.infer("tiny_seg", image, "json")
        verdicts[image] = json.loads(body)["adversarial"]
    clean, odd = verdicts["volume_0"], verdicts["checkerboard_0"]
    assert clean["threshold"] == pytest.approx(detector["thresholds"]["volume"])
    assert clean["slices"]["threshold"] == pytest.approx(detector["thresholds"]["sample"])
    assert clean["slices"]["axis"] == 0 and len(clean["slices"]["score"]) == SEG_SHAPE[0]
    assert clean["score"] == pytest.approx(max(clean["slices"]["score"]))
    assert clean["flag"] is False and odd["flag"] is True and all(odd["slices"]["flag"])
    assert odd["score"] > 10 * odd["threshold"]
    # the squeeze baseline's verdict beside it, with its own thresholds
    squeeze = clean["squeeze"]
    assert squeeze["threshold"] == pytest.approx(detector["squeeze"]["thresholds"]["volume"])
    assert len(squeeze["slices"]["score"]) == SEG_SHAPE[0] and squeeze["score"] == pytest.approx(max(squeeze["slices"]["score"]))


@needs_label_env
def test_infer_refuses_any_image_that_is_not_an_id_of_the_studies_folder(tiny_server, tmp_path):
    server, _ = tiny_server
    outside = tmp_path / "outside.nii.gz"  # a valid volume that stock MONAI Label would segment (HTTP 200)
    shutil.copy(server.studies / "volume_0.nii.gz", outside)
    relative = os.path.relpath(outside, os.getcwd())  # the server runs in this process's folder
    assert relative.startswith("..")
    for image in (str(outside), relative, str(server.studies / "volume_0.nii.gz"), "no_such_id", ""):
        query = urllib.parse.urlencode({"image": image, "output": "json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            _request(f"{server.url}/infer/tiny_seg?{query}", method="POST")
        assert e.value.code == (404 if image else 500), image  # MONAI Label's own answer to a missing image
        detail = json.loads(e.value.read())["detail"]
        if image:
            assert f"image {image!r} is not an image of the studies folder" in detail
    assert "refused /infer image" in server.log_tail(20000)
    server.infer("tiny_seg", "volume_0", "json")  # ids still work


@needs_label_env
def test_infer_landmarks_json_gives_19_named_landmarks_at_the_spots(tiny_server):
    server, _ = tiny_server
    body, content_type = server.infer("tiny_landmarks", "radiograph_0", "json")
    assert content_type.startswith("application/json")
    result = json.loads(body)
    landmarks = result["landmarks"]
    assert [lm["name"] for lm in landmarks] == [f"L{k + 1}" for k in range(NUM_LANDMARKS)]
    assert [lm["id"] for lm in landmarks] == list(range(1, NUM_LANDMARKS + 1))
    for lm, (x, y) in zip(landmarks, SPOTS, strict=True):
        # pixel centres aligned: original = (image + 0.5) * scale - 0.5; 0.1 mm per original pixel
        assert lm["x"] == pytest.approx((x + 0.5) * LMK_SCALE - 0.5, abs=1e-3)
        assert lm["y"] == pytest.approx((y + 0.5) * LMK_SCALE - 0.5, abs=1e-3)
        assert lm["x_mm"] == pytest.approx(lm["x"] * 0.1, abs=1e-6)
        assert lm["y_mm"] == pytest.approx(lm["y"] * 0.1, abs=1e-6)
    assert result["label_map"]["values"]["L19"] == 19


@needs_label_env
def test_infer_landmarks_image_is_a_label_map_with_a_disc_per_landmark(tiny_server):
    server, _ = tiny_server
    body, content_type = server.infer("tiny_landmarks", "radiograph_0", "image")
    assert content_type == "image/png"
    label = np.array(Image.open(io.BytesIO(body)))
    w, h = LMK_SIZE
    assert label.shape == (h, w) and label.dtype == np.uint8
    for k, (x, y) in enumerate(SPOTS):
        assert label[y, x] == k + 1
        assert int((label == k + 1).sum()) == 29  # a radius-3 disc of pixels
    assert set(np.unique(label)) == set(range(NUM_LANDMARKS + 1))


# the shipped bundles, with random weights ----------------------------------------------------------------------

SHIPPED = ("hippocampus_seg", "ceph_landmarks", "bccd_detection")


def _shipped_with_random_weights(root: Path, name: str) -> Path:
    src = PROJECT_ROOT / "bundles" / name
    if not (src / "configs" / "inference.json").is_file():
        pytest.skip(f"{src}/configs/inference.json does not exist yet")
    dst = root / name
    # the detectors are fitted on the trained weights, which these copies replace
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.pt", "*.ts", "*detector.*", "eval", "runs"))
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(dst / "configs" / "inference.json"))
    parser["bundle_root"] = str(dst)
    if "score_thresh" in parser:  # random weights score every box low: keep them all, so there is something to serve
        inference = json.loads((dst / "configs" / "inference.json").read_text())
        inference["score_thresh"] = 0.0
        (dst / "configs" / "inference.json").write_text(json.dumps(inference, indent=1))
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    (dst / "models").mkdir(exist_ok=True)
    torch.save(net.state_dict(), dst / "models" / "model.pt")
    return dst


def _run_bundle(bundle: Path, image: Path, output_dir: Path) -> None:
    """The bundle's own inference (``python -m monai.bundle run``) on one image, for comparison with the server."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
           "--bundle_root", str(bundle), "--datalist", repr([str(image)]), "--output_dir", str(output_dir)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]


HIPPO_SHAPE = (35, 51, 35)
CEPH_SIZE = (484, 600)  # width, height of the stored ISBI 2015 images
BCCD_SIZE = (640, 480)  # width, height of the BCCD images


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory):
    if LABEL_PYTHON is None:
        pytest.skip("MONAI Label environment absent: run `bash scripts/install_label_env.sh`")
    root = tmp_path_factory.mktemp("label_shipped")
    bundles = [_shipped_with_random_weights(root, n) for n in SHIPPED]
    studies = root / "studies"
    studies.mkdir()
    rng = np.random.default_rng(1)
    _save_nifti(studies / "hippocampus_900.nii.gz", rng.normal(100, 20, HIPPO_SHAPE).astype(np.float32), np.eye(4))
    w, h = CEPH_SIZE
    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(studies / "ceph_900.png")
    w, h = BCCD_SIZE
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(studies / "blood_900.png")
    yield from _start(root, bundles, studies)


@needs_label_env
def test_shipped_segmentation_bundle_serves_a_label_volume(shipped_server, tmp_path):
    server, info = shipped_server
    assert set(SHIPPED) <= set(info["models"])
    assert info["models"]["hippocampus_seg"]["labels"] == {"anterior": 1, "posterior": 2}
    body, _ = server.infer("hippocampus_seg", "hippocampus_900", "image")
    out = tmp_path / "label.nii.gz"
    out.write_bytes(body)
    label = nib.load(str(out))
    assert label.shape == HIPPO_SHAPE
    assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2}
    # the same answer as the bundle's own inference workflow on the same volume and weights
    bundle = server.studies.parent / "hippocampus_seg"
    _run_bundle(bundle, server.studies / "hippocampus_900.nii.gz", tmp_path / "bundle_run")
    own = nib.load(str(tmp_path / "bundle_run" / "hippocampus_900_seg.nii.gz"))
    np.testing.assert_array_equal(np.asarray(label.dataobj), np.asarray(own.dataobj))
    np.testing.assert_allclose(label.affine, own.affine, atol=1e-5)


@needs_label_env
def test_shipped_landmark_bundle_serves_19_landmarks(shipped_server, tmp_path):
    server, info = shipped_server
    assert len(info["models"]["ceph_landmarks"]["labels"]) == NUM_LANDMARKS
    body, _ = server.infer("ceph_landmarks", "ceph_900", "json")
    landmarks = json.loads(body)["landmarks"]
    assert len(landmarks) == NUM_LANDMARKS and len({lm["name"] for lm in landmarks}) == NUM_LANDMARKS
    for lm in landmarks:
        assert np.isfinite([lm["x"], lm["y"], lm["x_mm"], lm["y_mm"]]).all()
        assert lm["x_mm"] == pytest.approx(lm["x"] * 0.1, rel=1e-6, abs=1e-9)
    # the same coordinates as the bundle's own inference workflow on the same image and weights
    bundle = server.studies.parent / "ceph_landmarks"
    _run_bundle(bundle, server.studies / "ceph_900.png", tmp_path / "bundle_run")
    own = json.loads((tmp_path / "bundle_run" / "ceph_900_landmarks.json").read_text())["landmarks"]
    for lm, ref in zip(landmarks, own, strict=True):
        assert (lm["name"], lm["x"], lm["y"]) == (ref["name"], pytest.approx(ref["x"]), pytest.approx(ref["y"]))

    body, _ = server.infer("ceph_landmarks", "ceph_900", "image")
    label = np.array(Image.open(io.BytesIO(body)))
    w, h = CEPH_SIZE
    assert label.shape == (h, w) and 1 <= label.max() <= NUM_LANDMARKS
    # each landmark's disc sits where its JSON coordinates fall on the stored image (2400 x 1935 -> 600 x 484)
    xy = np.array([[lm["x"], lm["y"]] for lm in landmarks])
    image_xy = np.round((xy + 0.5) * np.array([w / 1935, h / 2400]) - 0.5).astype(int)
    checked = 0
    for k, (x, y) in enumerate(image_xy):
        later = image_xy[k + 1 :]
        covered = len(later) and np.min(np.hypot(*(later - [x, y]).T)) <= 2 * 3
        if 0 <= x < w and 0 <= y < h and not covered:
            assert label[y, x] == k + 1, (k, x, y)
            checked += 1
    assert checked >= 1
    # the bundle's SaveLandmarksd is dropped when serving: nothing is written into the bundle folder
    assert not (server.studies.parent / "ceph_landmarks" / "eval").exists()


@needs_label_env
def test_shipped_detection_bundle_serves_boxes_and_their_outlines(shipped_server, tmp_path):
    server, info = shipped_server
    model = info["models"]["bccd_detection"]
    assert model["type"] == "segmentation" and model["dimension"] == 2
    assert model["labels"] == {"RBC": 1, "WBC": 2, "Platelets": 3}
    body, content_type = server.infer("bccd_detection", "blood_900", "json")
    assert content_type.startswith("application/json")
    boxes = json.loads(body)["boxes"]
    assert len(boxes) == 100  # the detector's detections_per_img, all kept at score threshold 0
    scores = [b["score"] for b in boxes]
    assert scores == sorted(scores, reverse=True)
    for b in boxes:  # in the served image's pixels
        assert 0 <= b["x1"] <= b["x2"] <= BCCD_SIZE[0] and 0 <= b["y1"] <= b["y2"] <= BCCD_SIZE[1]
        assert b["name"] == ("RBC", "WBC", "Platelets")[b["label"]]
    # the same boxes as the bundle's own inference workflow on the same image and weights
    bundle = server.studies.parent / "bccd_detection"
    _run_bundle(bundle, server.studies / "blood_900.png", tmp_path / "bundle_run")
    own = json.loads((tmp_path / "bundle_run" / "blood_900_boxes.json").read_text())["boxes"]
    assert [(b["label"], b["x1"], b["y1"], b["x2"], b["y2"]) for b in boxes] == \
        [(b["label"], b["x1"], b["y1"], b["x2"], b["y2"]) for b in own]
    assert scores == pytest.approx([b["score"] for b in own], abs=1e-4)
    body, content_type = server.infer("bccd_detection", "blood_900", "image")
    assert content_type == "image/png"
    label = np.array(Image.open(io.BytesIO(body)))
    assert label.shape == (BCCD_SIZE[1], BCCD_SIZE[0])  # rows are y
    top = max(boxes, key=lambda b: b["score"])  # drawn last, so its outline is intact
    x1, y1 = int(np.floor(top["x1"])), int(np.floor(top["y1"]))
    assert label[y1, x1] == top["label"] + 1
