"""The MONAI Label app that serves the project's bundles (a MONAI Label ``main.py``).

Started by ``amat-monai serve`` (:mod:`amat_monai.label.server`), which passes the bundle folders as
``--conf bundles /abs/a,/abs/b``. Every bundle is served from its own folder: there is no model zoo and no
download, and the app refuses ``--conf zoo_source monaihosting``. Each bundle is one model named after its folder
(``hippocampus_seg``, ``ceph_landmarks``, ...). No trainers are registered: training runs through the bundles'
own ``train.json``.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask

from amat_monai.label.infer import bundle_task

__all__ = ["AmatLabelApp", "parse_bundles", "is_upload"]

logger = logging.getLogger(__name__)


def parse_bundles(value: str | None) -> dict[str, str]:
    """Model name -> absolute bundle folder, from the comma-separated ``bundles`` conf value.

    Raises:
        ValueError: if no bundle is given or two bundles have the same folder name.
        FileNotFoundError: naming a bundle folder that does not exist.
    """
    paths = [p.strip() for p in (value or "").split(",") if p.strip()]
    if not paths:
        raise ValueError("no bundles to serve: start the app with --conf bundles /path/to/bundle[,/path/to/other]")
    bundles: dict[str, str] = {}
    for p in paths:
        path = os.path.realpath(p)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"bundle folder not found: {p}")
        name = os.path.basename(path)
        if name in bundles:
            raise ValueError(f"two bundles are named {name!r}: {bundles[name]} and {path}")
        bundles[name] = path
    return bundles


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def is_upload(path: str) -> bool:
    """Whether ``path`` is a file that MONAI Label's ``/infer`` wrote itself for an uploaded image (a
    ``NamedTemporaryFile`` in the temporary folder: ``tmp`` + 8 characters + the upload's suffix)."""
    return (
        os.path.dirname(path) == tempfile.gettempdir()
        and re.fullmatch(r"tmp[a-z0-9_]{8}(\.[A-Za-z0-9]+)*", os.path.basename(path)) is not None
        and os.path.isfile(path)
    )


class AmatLabelApp(MONAILabelApp):
    """Serves local MONAI bundles (segmentation and landmarks) for 3D Slicer / OHIF."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        if conf.get("zoo_source", "").lower() == "monaihosting":
            raise ValueError("zoo_source=monaihosting is not supported: this app serves local bundles only")
        self.bundles = parse_bundles(conf.get("bundles"))
        from amat_monai import __version__

        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="amat-monai",
            description="Adversarially robust (AMAT) segmentation and landmark bundles",
            version=__version__,
        )

    def resolve_image(self, image: str, datastore) -> str:
        """The file to run inference on for the request's ``image``: a datastore image id becomes its file in the
        studies folder; an uploaded image or a session's image is kept.

        MONAI Label itself reads any path that exists (``image=/etc/...`` or ``../..``) and reads its working
        folder as a DICOM series for an unknown id. Here anything else is refused.

        Raises:
            HTTPException: 404, naming the id, for anything that is not one of the studies folder's images.
        """
        if image in set(datastore.list_images()):
            uri = datastore.get_image_uri(image)
            if uri and _inside(uri, self.studies) and os.path.exists(uri):
                return uri
        elif is_upload(image):
            return image
        elif self.sessions() is not None and self.sessions().store_path and _inside(image, self.sessions().store_path):
            return image
        logger.warning(f"refused /infer image {image!r}: not an image id of the studies folder")
        raise HTTPException(
            status_code=404,
            detail=f"image {image!r} is not an image of the studies folder {self.studies}: pass one of the ids "
            "that /datastore/ lists (paths are not accepted)",
        )

    def infer(self, request: dict, datastore=None) -> dict:
        if isinstance(request.get("image"), str):
            datastore = datastore or self.datastore()
            request = {**request, "image": self.resolve_image(request["image"], datastore)}
        return super().infer(request, datastore)

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name, path in self.bundles.items():
            logger.info(f"+++ Serving bundle {name} from {path}")
            infers[name] = bundle_task(path, self.conf)
        return infers

    def init_trainers(self) -> dict:
        return {}

    def init_scoring_methods(self) -> dict:
        return {}
