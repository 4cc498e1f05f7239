"""Second phases: full-batch methods a two-phase optimizer switches to.

- :mod:`~twophase.second_phase.contract`: the fields the switch, :func:`twophase.info`
  and :func:`twophase.train` read from a second phase's state, and the
  :func:`~twophase.second_phase.contract.evaluating` adapter for optax solvers;
- :mod:`~twophase.second_phase.cg`: nonlinear conjugate gradient and its beta rules;
- :mod:`~twophase.second_phase.newton_cg`: Newton-CG on Hessian-vector or Gauss-Newton products;
- :mod:`~twophase.second_phase.linesearch`: the line searches they share;
- :mod:`~twophase.second_phase.nystrom`: the randomized Nystrom preconditioner.
"""
