"""amat-monai: adaptive-margin adversarial training (AMAT) and robust evaluation for MONAI.

Submodules: :mod:`~amat_monai.attacks`, :mod:`~amat_monai.losses`, :mod:`~amat_monai.margins`,
:mod:`~amat_monai.calibration`, :mod:`~amat_monai.handlers`.
"""

__version__ = "0.1.0"
