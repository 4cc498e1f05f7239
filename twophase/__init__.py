"""twophase: convexity-aware two-phase training for JAX and optax.

Adam while the loss is non-convex, full-batch nonlinear conjugate gradient once
the gradient norm has peaked (Hrycej et al., KDIR 2025, arXiv 2510.25366).
"""

from twophase.auxiliary import prepare_aux
from twophase.checkpoint import latest_step, restore_checkpoint, save_checkpoint
from twophase.detectors import (
    Detector,
    all_of,
    any_of,
    grad_norm_peak,
    loss_plateau,
    norm_loss_slope,
    switch_at,
)
from twophase.first_phase import GatedAdam, GatedFirstPhase, gated_adam
from twophase.info import Info, info, info_all
from twophase.objectives import as_value_and_grad, fill_masked, full_batch, with_weight_decay
from twophase.policy import (
    Policy,
    SafeResortConfig,
    SafeResortState,
    from_detector,
    safe_resort,
)
from twophase.presets import (
    adam_cg,
    adam_lbfgs,
    adam_lm,
    adam_newton_cg,
    adam_second_moment_preconditioner,
    adam_then,
)
from twophase.second_phase.beta import (
    BETA_RULES,
    BetaFn,
    dai_yuan,
    fletcher_reeves,
    hager_zhang,
    hestenes_stiefel,
    polak_ribiere,
)
from twophase.second_phase.cg import NonlinearCGState, nonlinear_cg
from twophase.second_phase.common import set_preconditioner
from twophase.second_phase.contract import HVP_COST
from twophase.second_phase.evaluating import EvaluatingState, evaluating
from twophase.second_phase.jacobian import PointwiseObjective, pointwise_residuals
from twophase.second_phase.levenberg_marquardt import (
    JACOBIAN_COST,
    LevenbergMarquardtState,
    levenberg_marquardt,
)
from twophase.second_phase.linesearch import (
    LineSearch,
    LineSearchResult,
    golden_section_linesearch,
    wolfe_linesearch,
)
from twophase.second_phase.newton_cg import (
    GaussNewtonObjective,
    NewtonCGState,
    gauss_newton_objective,
    newton_cg,
)
from twophase.second_phase.nystrom import NystromSketch
from twophase.switch import TwoPhaseState, two_phase
from twophase.training import TrainResult, history_columns, train

__version__ = "0.1.0"

__all__ = [
    "BETA_RULES",
    "HVP_COST",
    "JACOBIAN_COST",
    "BetaFn",
    "Detector",
    "EvaluatingState",
    "GatedAdam",
    "GatedFirstPhase",
    "GaussNewtonObjective",
    "Info",
    "LevenbergMarquardtState",
    "LineSearch",
    "LineSearchResult",
    "NewtonCGState",
    "NonlinearCGState",
    "NystromSketch",
    "PointwiseObjective",
    "Policy",
    "SafeResortConfig",
    "SafeResortState",
    "TrainResult",
    "TwoPhaseState",
    "adam_cg",
    "adam_lbfgs",
    "adam_lm",
    "adam_newton_cg",
    "adam_second_moment_preconditioner",
    "adam_then",
    "all_of",
    "any_of",
    "as_value_and_grad",
    "dai_yuan",
    "evaluating",
    "fill_masked",
    "fletcher_reeves",
    "from_detector",
    "full_batch",
    "gated_adam",
    "gauss_newton_objective",
    "golden_section_linesearch",
    "grad_norm_peak",
    "hager_zhang",
    "hestenes_stiefel",
    "history_columns",
    "info",
    "info_all",
    "latest_step",
    "levenberg_marquardt",
    "loss_plateau",
    "newton_cg",
    "nonlinear_cg",
    "norm_loss_slope",
    "pointwise_residuals",
    "polak_ribiere",
    "prepare_aux",
    "restore_checkpoint",
    "safe_resort",
    "save_checkpoint",
    "set_preconditioner",
    "switch_at",
    "train",
    "two_phase",
    "with_weight_decay",
    "wolfe_linesearch",
]
