"""Unsupervised detection of attacked inputs: detectors fitted on clean data only, never on attacks.

* :class:`FeatureDensityDetector`: a Gaussian (Ledoit–Wolf shrinkage) per hooked layer of the task network, over
  per-sample channel statistics; score = squared Mahalanobis distance z-scored on clean training data, averaged
  over layers.
* :class:`SqueezeDisagreement`: the training-free baseline (feature squeezing with a median filter).
* :func:`fit_detectors` / :func:`load_detectors`: ``detector.npz`` (arrays, loaded without pickle) and
  ``detector.json`` (the checkpoint's SHA-256, layers, thresholds from clean validation scores).
* :func:`screen`: the verdict on one image or volume (per slice and per volume), as MONAI Label serves it.
* :func:`evaluate_detectors`: ROC-AUC and detection rates under the robust evaluator's attacks, random noise,
  and the adaptive attack (:class:`DetectorAwareModel` + :class:`AdaptiveLoss`) that also lowers a detector's score.
"""

from amat_monai.attack_detection.detector import (
    FeatureDensityDetector,
    SqueezeDisagreement,
    detector_paths,
    per_volume_max,
    screen,
    threshold_at,
)
from amat_monai.attack_detection.gaussian import ShrunkGaussian, ledoit_wolf
from amat_monai.attack_detection.workflow import (
    AdaptiveLoss,
    DetectorAwareModel,
    detection_table,
    evaluate_detectors,
    fit_detectors,
    load_detectors,
    roc_auc,
    squeeze_baseline,
)

__all__ = [
    "FeatureDensityDetector",
    "SqueezeDisagreement",
    "ShrunkGaussian",
    "ledoit_wolf",
    "threshold_at",
    "per_volume_max",
    "detector_paths",
    "screen",
    "roc_auc",
    "DetectorAwareModel",
    "AdaptiveLoss",
    "fit_detectors",
    "load_detectors",
    "squeeze_baseline",
    "evaluate_detectors",
    "detection_table",
]
