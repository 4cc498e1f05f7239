"""Second phases: full-batch methods a two-phase optimizer switches to.

- :mod:`~twophase.second_phase.contract`: the fields the switch, :func:`twophase.info`
  and :func:`twophase.train` read from a second phase's state, and the one lookup
  by field name;
- :mod:`~twophase.second_phase.common`: the shared toolkit (evaluate here, hold,
  preconditioner, dtypes, scaled update, the guarantees every second phase gives);
- :mod:`~twophase.second_phase.cg`: nonlinear conjugate gradient;
- :mod:`~twophase.second_phase.beta`: its direction rules;
- :mod:`~twophase.second_phase.newton_cg`: Newton-CG on Hessian-vector or Gauss-Newton products;
- :mod:`~twophase.second_phase.linesearch`: the line searches they share;
- :mod:`~twophase.second_phase.nystrom`: the randomized Nystrom preconditioner;
- :mod:`~twophase.second_phase.evaluating`: the adapter for ``optax.lbfgs`` and friends.

Adding a second phase: one module built from :mod:`~twophase.second_phase.common`
(ending in :func:`~twophase.second_phase.common.second_phase_transformation`),
its test, and one import line in ``twophase/__init__.py``.
"""
