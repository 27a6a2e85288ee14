"""Stand-ins for the MONAI Label 0.8.5 imports that a local-bundle server never uses.

MONAI Label imports ``itk``, ``SimpleITK``, ``pydicom_seg`` and ``torchvision`` at module level, although serving a
local bundle from a folder of studies needs none of them: ``itk`` is its default label writer (this app writes
labels with MONAI's ``NibabelWriter`` / ``PILWriter`` instead, see :mod:`amat_monai.label.writer`), ``SimpleITK`` and
``pydicom_seg`` convert DICOM / DICOM-SEG for DICOMweb studies, and ``torchvision`` makes image grids for
pathology. Installing them costs gigabytes (torchvision also replaces the CPU torch with a CUDA build) and
``pydicom_seg`` 0.4.1 does not import beside pydicom 3. So :func:`install` puts a stand-in module in
``sys.modules`` for each one that is NOT installed; every attribute of a stand-in is a placeholder that raises
:class:`MissingModuleError` naming the module and the feature as soon as it is called or inspected. A module
that is installed is left alone.

:func:`install` imports MONAI's readers, transforms and networks first, so that MONAI's own optional-import
checks (made once, at import time) still see the modules as absent and never pick, e.g., ``ITKReader``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

__all__ = ["MissingModuleError", "STAND_INS", "install", "installed_stand_ins"]

#: module name -> the MONAI Label feature that would need the real module.
STAND_INS: dict[str, str] = {
    "itk": "MONAI Label's ITK label writer (this app writes labels with MONAI's NibabelWriter / PILWriter)",
    "SimpleITK": "DICOM / DICOM-SEG conversion for DICOMweb studies (not supported by this app)",
    "pydicom_seg": "DICOM-SEG conversion for DICOMweb studies (not supported by this app)",
    "torchvision": "pathology image grids (not supported by this app)",
    "torchvision.utils": "pathology image grids (not supported by this app)",
}

_MARK = "__amat_stand_in__"


class MissingModuleError(RuntimeError):
    """Raised when code actually uses a module that :func:`install` replaced by a stand-in."""


class _Placeholder:
    """An attribute of a stand-in module: raises as soon as it is called or looked into."""

    def __init__(self, qualname: str, feature: str) -> None:
        object.__setattr__(self, "_qualname", qualname)
        object.__setattr__(self, "_feature", feature)

    def _fail(self) -> MissingModuleError:
        module = self._qualname.split(".")[0]
        return MissingModuleError(
            f"{self._qualname} was used, but {module!r} is not installed in this MONAI Label environment "
            f"(amat_monai.label.compat put a stand-in in its place). It is needed for: {self._feature}. "
            f"See docs/MONAI_LABEL.md."
        )

    def __call__(self, *args, **kwargs):
        raise self._fail()

    def __getattr__(self, name: str):
        raise self._fail()

    def __repr__(self) -> str:
        return f"<stand-in for {self._qualname}>"


class _StandInModule(types.ModuleType):
    def __init__(self, name: str, feature: str) -> None:
        super().__init__(name, f"Stand-in for the missing module {name!r} (see amat_monai.label.compat).")
        self.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
        setattr(self, _MARK, True)
        self._feature = feature

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)  # keeps import machinery, inspect and pickle behaving normally
        return _Placeholder(f"{self.__name__}.{name}", self._feature)


def _missing(name: str) -> bool:
    if name in sys.modules:
        return False
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def install() -> list[str]:
    """Put a stand-in in ``sys.modules`` for each module of :data:`STAND_INS` that is not installed.

    Returns:
        the names of the modules that were replaced (empty when all are installed or already replaced).

    Raises:
        RuntimeError: if MONAI's image readers already registered a replaced module as available.
    """
    # MONAI decides once, at import, which optional readers exist: import it before any stand-in is in place.
    import monai.bundle  # noqa: F401
    import monai.data.image_reader as image_reader
    import monai.inferers  # noqa: F401
    import monai.losses  # noqa: F401
    import monai.networks  # noqa: F401
    import monai.transforms  # noqa: F401

    replaced = []
    for name, feature in STAND_INS.items():
        parent = name.rpartition(".")[0]
        if parent and parent in sys.modules and not vars(sys.modules[parent]).get(_MARK):
            continue  # the real parent package is installed: leave its submodules to it
        if _missing(name):
            sys.modules[name] = _StandInModule(name, feature)
            if parent:
                setattr(sys.modules[parent], name.rpartition(".")[2], sys.modules[name])
            replaced.append(name)
    if "itk" in replaced and image_reader.has_itk:
        raise RuntimeError("MONAI registered ITK as available although it is a stand-in; import order is wrong")
    return replaced


def installed_stand_ins() -> list[str]:
    """The names of the modules currently replaced by stand-ins."""
    return sorted(n for n, m in list(sys.modules.items()) if getattr(m, "__dict__", {}).get(_MARK) is True)
