"""MONAI Label integration: serve the project's bundles from a local MONAI Label server.

Modules that import nothing from MONAI Label (usable anywhere): :mod:`~amat_monai.label.server` (``amat-monai
serve``), :mod:`~amat_monai.label.landmarks`, :mod:`~amat_monai.label.writer`, :mod:`~amat_monai.label.compat`.
Modules for the server process only (need ``monailabel``, see ``docs/MONAI_LABEL.md``):
:mod:`~amat_monai.label.main` (the ``MONAILabelApp``) and :mod:`~amat_monai.label.infer`.
"""

__all__: list[str] = []
