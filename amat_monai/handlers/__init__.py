"""Ignite handlers that turn a MONAI ``SupervisedTrainer`` into VAT, AMAT or TEAT, add semi-supervised adversarial
training on unlabelled images (SSAT), calibrate ξ, and record the adversarial statistics of an epoch."""

from amat_monai.handlers.adaptive_margin import AdaptiveMarginHandler
from amat_monai.handlers.adversarial_stats import AdversarialStatsHandler
from amat_monai.handlers.adversarial_training import AdversarialTrainingHandler, FixedMarginHandler
from amat_monai.handlers.semi_supervised import SemiSupervisedAdversarialHandler
from amat_monai.handlers.temporal_ensembling import TemporalEnsemblingHandler
from amat_monai.handlers.xi_calibration import XiCalibrationHandler

__all__ = [
    "AdversarialTrainingHandler",
    "FixedMarginHandler",
    "AdaptiveMarginHandler",
    "TemporalEnsemblingHandler",
    "SemiSupervisedAdversarialHandler",
    "AdversarialStatsHandler",
    "XiCalibrationHandler",
]
