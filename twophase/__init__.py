"""twophase: convexity-aware two-phase training for JAX and optax.

Adam while the loss is non-convex, full-batch nonlinear conjugate gradient once
the gradient norm has peaked (Hrycej et al., KDIR 2025, arXiv 2510.25366).
"""

from twophase.cg import (
    BETA_RULES,
    BetaFn,
    NonlinearCGState,
    dai_yuan,
    fletcher_reeves,
    hager_zhang,
    hestenes_stiefel,
    nonlinear_cg,
    polak_ribiere,
    set_preconditioner,
)
from twophase.info import Info, info
from twophase.linesearch import (
    LineSearch,
    LineSearchResult,
    golden_section_linesearch,
    wolfe_linesearch,
)

__version__ = "0.1.0"

__all__ = [
    "BETA_RULES",
    "BetaFn",
    "Info",
    "LineSearch",
    "LineSearchResult",
    "NonlinearCGState",
    "dai_yuan",
    "fletcher_reeves",
    "golden_section_linesearch",
    "hager_zhang",
    "hestenes_stiefel",
    "info",
    "nonlinear_cg",
    "polak_ribiere",
    "set_preconditioner",
    "wolfe_linesearch",
]
