"""A synthetic Medical Segmentation Decathlon task, for the demo and the tests (no download needed).

Each case is a noisy 3D volume of random size holding two adjacent ellipsoidal structures (classes 1 and 2,
like the anterior and posterior hippocampus) slightly brighter than a smoothly varying background. The
output folder has the Decathlon layout (``dataset.json``, ``imagesTr/``, ``labelsTr/``), so the same code
reads it and the real task.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["make_synthetic_decathlon"]


#: in-plane scale of each structure's radii (class 1, class 2) in the texture task: round against stretched
DEFAULT_SHAPES = ((0.85, 0.85), (1.0, 1.35))


def _case(rng: np.random.Generator, shape: Sequence[int], channels: int, contrast: float, noise: float,
          texture: float = 0.0, shapes: Sequence[Sequence[float]] = DEFAULT_SHAPES):
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), axis=-1)
    centre = np.array(shape) / 2 + rng.uniform(-1.5, 1.5, 3)
    # the two structures touch along a random in-plane direction (axes 0 and 1; slices are cut along axis 2),
    # so most slices through them show both classes, as in the hippocampus
    angle = rng.uniform(0, 2 * np.pi)
    axis = np.array([np.cos(angle), np.sin(angle), rng.normal(scale=0.15)])
    axis /= np.linalg.norm(axis)
    radii = np.array(shape) * rng.uniform(0.14, 0.2, 3)
    radii[2] = shape[2] * rng.uniform(0.25, 0.32)
    offset = axis * radii[:2].mean() * 0.9
    label = np.zeros(shape, dtype=np.uint8)
    for cls, sign in ((1, -1.0), (2, 1.0)):
        # with a texture the classes also differ in shape: class 1 round, class 2 stretched across the axis
        stretch = np.ones(3) if texture == 0 else np.array([*shapes[cls - 1], 1.0])
        d = (((grid - (centre + sign * offset)) / (radii * stretch)) ** 2).sum(axis=-1)
        label[(d <= 1.0) & (label == 0)] = cls
    # smooth background (a random linear bias field) + structure contrast + noise; classes differ slightly
    bias = (grid - centre) @ rng.normal(scale=0.02, size=3)
    images = []
    for ch in range(channels):
        gain = 1.0 + 0.3 * ch
        if texture == 0:
            img = 1.0 + bias + gain * contrast * (label == 1) + gain * 0.6 * contrast * (label == 2)
        else:  # equally bright structures; class 1 carries a faint voxel checkerboard, class 2 none
            checker = (-1.0) ** grid.sum(axis=-1).astype(np.int64)
            img = 1.0 + bias + gain * contrast * (label > 0) + gain * texture * contrast * checker * (label == 1)
        img = img + rng.normal(scale=noise, size=shape)
        images.append((100.0 * img).astype(np.float32))  # arbitrary scanner units: the loader z-scores them
    image = images[0] if channels == 1 else np.stack(images, axis=-1)  # Decathlon stores channels last (4D)
    return image, label


def make_synthetic_decathlon(
    output_dir: str | os.PathLike,
    num_cases: int = 20,
    shape_range: Sequence[Sequence[int]] = ((18, 24), (26, 32), (18, 24)),
    channels: int = 1,
    contrast: float = 1.0,
    noise: float = 0.25,
    seed: int = 0,
    name: str = "synthetic",
    texture: float = 0.0,
    shapes: Sequence[Sequence[float]] = DEFAULT_SHAPES,
) -> str:
    """Write a synthetic Decathlon task and return its folder.

    Args:
        output_dir: the task folder to create (``dataset.json``, ``imagesTr/``, ``labelsTr/``).
        num_cases: number of labelled cases.
        shape_range: ``(low, high)`` inclusive size range of each of the three axes (nibabel order).
        channels: image channels; more than one writes 4D images, channels last, as Task05_Prostate.
        contrast: brightness of the structures over the background, in units of the background level.
        noise: standard deviation of the Gaussian noise, same units.
        seed: random seed (the data set is a deterministic function of the arguments).
        name: case name prefix.
        texture: 0 (default): class 2 is dimmer than class 1. Above 0: the two structures are equally bright
            and told apart by shape (class 1 round, class 2 stretched) and by a faint voxel checkerboard of this
            amplitude (in units of ``contrast``) on class 1 only: a shortcut that a normally trained network
            takes and that a small perturbation erases (the demo's task).
        shapes: with a texture, the in-plane scale of each structure's radii, ``((a1, b1), (a2, b2))`` for
            classes 1 and 2 (default: class 1 round at 0.85, class 2 stretched 1.35 across the touching axis).
    """
    if num_cases < 1 or channels < 1:
        raise ValueError(f"num_cases and channels must be >= 1, got {num_cases}, {channels}")
    rng = np.random.default_rng(seed)
    root = Path(output_dir)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(num_cases):
        shape = [int(rng.integers(lo, hi + 1)) for lo, hi in shape_range]
        image, label = _case(rng, shape, channels, contrast, noise, texture, shapes)
        case = f"{name}_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "imagesTr" / case))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labelsTr" / case))
        training.append({"image": f"./imagesTr/{case}", "label": f"./labelsTr/{case}"})
    meta = {
        "name": name,
        "description": "synthetic two-structure segmentation task generated by amat_monai.data.synthetic",
        "tensorImageSize": "3D" if channels == 1 else "4D",
        "modality": {str(c): f"MRI{c}" if channels > 1 else "MRI" for c in range(channels)},
        "labels": {"0": "background", "1": "anterior", "2": "posterior"},
        "numTraining": num_cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return str(root)
