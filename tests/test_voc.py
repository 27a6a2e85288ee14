"""The Pascal VOC reader (:mod:`amat_monai.data.voc`): the real BCCD files, the synthetic stand-in, every bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from amat_monai.data.voc import BCCD_CLASSES, make_synthetic_voc, read_voc_annotation, read_voc_split, voc_datalist
from conftest import data_root


def _xml(objects: str, size: str = "<size><width>100</width><height>80</height><depth>3</depth></size>") -> str:
    return f"<annotation><filename>a.jpg</filename>{size}{objects}</annotation>"


def _object(name: str, x1, y1, x2, y2) -> str:
    return (f"<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax>"
            f"<ymax>{y2}</ymax></bndbox></object>")


def test_boxes_become_zero_based_half_open(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(_xml(_object("WBC", 1, 1, 100, 80) + _object("Platelets", 10, 20, 19, 24)))
    ann = read_voc_annotation(path)
    np.testing.assert_array_equal(ann.boxes, [[0, 0, 100, 80], [9, 19, 19, 24]])  # widths 100 and 10 pixels
    np.testing.assert_array_equal(ann.labels, [BCCD_CLASSES.index("WBC"), BCCD_CLASSES.index("Platelets")])
    assert (ann.width, ann.height, ann.filename) == (100, 80, "a.jpg")


@pytest.mark.parametrize("content, message", [
    ("<annotation><size>", "malformed XML"),
    (_xml(_object("RBC", 1, 1, 101, 10)), "lies outside the 100×80 image"),
    (_xml(_object("RBC", 0, 1, 10, 10)), "lies outside the 100×80 image"),
    (_xml(_object("RBC", 20, 1, 10, 10)), "corners swapped"),
    (_xml(_object("Monocyte", 1, 1, 10, 10)), "class 'Monocyte' is not one of ['RBC', 'WBC', 'Platelets']"),
    (_xml(_object("RBC", "a", 1, 10, 10)), "<xmin> is 'a', not a number"),
    (_xml(_object("RBC", 1, 1, 10, 10), size=""), "<size>: no <width>"),
    (_xml(""), "the image has no boxes"),
])
def test_bad_annotations_are_named(tmp_path, content, message):
    path = tmp_path / "bad.xml"
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        read_voc_annotation(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_a_single_point_box_is_dropped_with_a_warning_and_an_empty_image_allowed_on_request(tmp_path, caplog):
    path = tmp_path / "point.xml"
    path.write_text(_xml(_object("RBC", 50, 40, 50, 40) + _object("RBC", 1, 1, 10, 10)))
    with caplog.at_level(logging.WARNING, logger="amat_monai.data.voc"):
        ann = read_voc_annotation(path)
    assert len(ann.boxes) == 1 and f"{path} object 0 (RBC): box (50, 40) is a single point; dropped" in caplog.text
    empty = tmp_path / "empty.xml"
    empty.write_text(_xml(""))
    assert read_voc_annotation(empty, allow_empty=True).boxes.shape == (0, 4)


def test_synthetic_folder_round_trip_and_split_errors(tmp_path):
    root = make_synthetic_voc(tmp_path / "voc", num_images=8, seed=1)
    items = voc_datalist(root, "train")
    assert [i["sample_id"] for i in items] == [f"Synthetic_{n:05d}" for n in range(4)]
    for item in items:
        assert Path(item["image"]).is_file() and item["image_size"] == [120, 160]
        assert (item["boxes"][:, 2] > item["boxes"][:, 0]).all() and item["boxes"][:, 2].max() <= 160
        assert {0, 2} <= set(item["labels"].tolist())  # RBC and platelets in every image
    assert read_voc_split(root, "trainval") == read_voc_split(root, "train") + read_voc_split(root, "val")
    own = tmp_path / "cases.txt"  # a list of the user's own (amat-monai evaluate --cases FILE)
    own.write_text("Synthetic_00005\n\nSynthetic_00001\n")
    assert [i["sample_id"] for i in voc_datalist(root, str(own))] == ["Synthetic_00005", "Synthetic_00001"]
    with pytest.raises(FileNotFoundError, match=r"split list not found: .*test9\.txt \(available: \['test', 'train', "
                                                r"'trainval', 'val'\]\)"):
        voc_datalist(root, "test9")
    (root / "JPEGImages" / "Synthetic_00000.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="image 'Synthetic_00000' of split 'train' not found"):
        voc_datalist(root, "train")


def test_real_bccd_annotations():
    root = data_root() / "BCCD"
    if not (root / "Annotations").is_dir():
        pytest.skip(f"real data not found at {root} (set AMAT_DATA_DIR)")
    first = read_voc_annotation(root / "Annotations" / "BloodImage_00000.xml")
    assert len(first.boxes) == 20 and (first.width, first.height) == (640, 480)
    np.testing.assert_array_equal(first.boxes[0], [259, 176, 491, 376])  # the WBC: xmin 260 ... ymax 376
    assert first.labels.tolist().count(BCCD_CLASSES.index("WBC")) == 1
    splits = {s: voc_datalist(root, s) for s in ("train", "val", "test")}
    assert [len(v) for v in splits.values()] == [205, 87, 72]
    ids = [set(i["sample_id"] for i in v) for v in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    counts = np.bincount(np.concatenate([i["labels"] for v in splits.values() for i in v]), minlength=3)
    assert counts.sum() > 4000 and counts[0] > counts[1]
