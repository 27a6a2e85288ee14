"""Robust evaluation: a task metric on clean inputs and under a grid of white-box attacks × noise levels.

:class:`RobustEvaluator` is a MONAI :class:`~monai.engines.Evaluator` whose iteration runs the whole attack
grid on one batch. Every attack maximises the task's training loss (the per-sample ``[B, K]`` loss terms)
against the true label with the network in eval mode, and the attacked input goes through the same inference
path that is scored. With restarts, the worst restart is kept for each sample separately, judged by the
metric's primary value (ties, and samples where the primary value is undefined, by the loss).

Defaults follow the papers' protocol (method doc §6): L2 noise over the whole input, PGD-100 with random start
and step ``4ε/100`` (segmentation) or ``5ε/100`` (landmarks); IFGSM-10 from ``x``, step ``4ε/10``
(segmentation) or ``ε/5`` (landmarks); FGSM one step of length ``ε``; random noise of norm exactly ``ε``.

Sanity checks (``robustness.json["sanity"]``, and Python warnings when one fails), all in the primary metric's
units with the metric's ``tolerance`` as slack:

* ``zero_eps_equals_clean``: every attack at ε = 0 scores the clean value (slack ``tolerance / 10``);
* ``monotone_in_eps``: no attack's value improves as ε grows (clean counts as ε = 0);
* ``attack_strength_order``: at each ε, PGD at least as strong as IFGSM, IFGSM at least as strong as FGSM;
* ``noise_weaker_than_attack``: random noise of the same norm does at most ``noise_ratio`` (0.5) of the
  strongest gradient attack's damage (plus the slack);
* ``large_eps_breaks_model``: PGD at ``large_eps_factor`` (10) × the largest ε takes the value below
  ``break_fraction · clean`` (above ``clean / break_fraction`` for errors);
* ``zero_gradient``: no sample has an exactly zero input gradient of the loss at the clean input;
* ``within_budget``: every perturbation's norm is at most its ε.

Together they catch broken attacks and gradient masking. The cells they need but the grid lacks (ε = 0,
FGSM, noise, the large ε) are run as extra cells, with at most ``sanity_steps`` (20) steps each.

Python use::

    report = robust_evaluate(net, SegmentationLoss(), test_loader, SegmentationMetric(),
                             attacks=("pgd", "ifgsm"), eps=(2, 6, 10), output_dir="eval/std")
    report["results"]  # [{"attack", "norm", "eps", "steps", "step_size", "restarts", "value", ...}]
"""

from amat_monai.evaluation.engine import RobustEvaluator
from amat_monai.evaluation.grid import DEFAULT_STEPS, STEP_SIZE_FACTORS, TASKS, AttackSpec, make_attacks
from amat_monai.evaluation.report import robust_evaluate, write_outputs
from amat_monai.evaluation.sanity import sanity_checks

__all__ = [
    "TASKS",
    "DEFAULT_STEPS",
    "STEP_SIZE_FACTORS",
    "AttackSpec",
    "make_attacks",
    "RobustEvaluator",
    "robust_evaluate",
    "sanity_checks",
    "write_outputs",
]
