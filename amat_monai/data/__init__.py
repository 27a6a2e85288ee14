"""Data sets: Decathlon segmentation tasks as 2D slices, cephalometric landmarks, Pascal VOC boxes (BCCD), and
synthetic stand-ins of each."""

from amat_monai.data.decathlon import (
    DecathlonSliceDataset,
    case_name,
    decathlon_info,
    load_case,
    load_datalist,
    load_split,
    read_case_list,
    split_cases,
    to_nnunet_axes,
    volume_to_slices,
)
from amat_monai.data.synthetic import make_synthetic_decathlon
from amat_monai.data.ceph import ceph_datalist, make_synthetic_ceph  # noqa: F401  (cephalometric landmarks)
from amat_monai.data.root import data_root
from amat_monai.data.voc import BCCD_CLASSES, default_bccd_dir, make_synthetic_voc, read_voc_annotation, voc_datalist

__all__ = [
    "DecathlonSliceDataset",
    "case_name",
    "decathlon_info",
    "load_case",
    "load_datalist",
    "load_split",
    "read_case_list",
    "split_cases",
    "to_nnunet_axes",
    "volume_to_slices",
    "make_synthetic_decathlon",
    "data_root",
    "BCCD_CLASSES",
    "default_bccd_dir",
    "read_voc_annotation",
    "voc_datalist",
    "make_synthetic_voc",
]
