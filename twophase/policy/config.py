"""The tuned constants of :func:`twophase.safe_resort`, in one record."""

from __future__ import annotations

import math
from typing import NamedTuple

from twophase._checks import check_fraction, check_int, check_positive, concrete

__all__ = ["SafeResortConfig", "check_config"]


class SafeResortConfig(NamedTuple):
    """The constants of :func:`twophase.safe_resort`; each is a choice of design,
    with the reason for its value.

    Costs are in epoch-equivalents: one full-batch value-and-gradient evaluation,
    or one epoch of mini-batch steps.

    Attributes:
      polish: fraction of a known budget from which the second phase runs to the
        end (the late polish). Adam's last 10% of a run gains little once it has
        slowed, while a full-batch method removes the mini-batch noise Adam
        leaves in one or two iterations and needs a few more to converge.
      judge: a trial is judged every ``judge`` of the cost at its start (of the
        cost left, for the late polish), and Adam's pace is fitted over the last
        ``judge`` of a known budget (within ``[3, history]`` epochs). One
        twentieth keeps a losing trial's waste to 5% of the run before it, while
        a segment still spans several second-phase iterations.
      min_judge: the shortest judged segment, in epoch-equivalents (> 0). Two:
        one iteration of CG or L-BFGS with its line search costs one to three
        evaluations, and a single iteration says little about a method's pace.
        A trial is started only while ``1.5 * min_judge`` of the exploration
        allowance is left, and the final polish is the last ``max(2 * min_judge,
        judge / 10 * budget)``, and at least two iterations of the second phase
        (the largest cost of one so far: ~18 evaluations for
        Levenberg-Marquardt).
      explore: the cost that trials returned from may spend in all, as a
        fraction of a known budget (of the cost so far without one). Three
        percent: the no-harm line is 1.03 x Adam's loss at equal cost, and a
        run whose trials all lose pays at most this fraction of its cost.
      growth: factor by which the wait before the next trial grows after each
        return (>= 1). Doubling makes the waits geometric: trials go on for the
        whole run, and their number grows as the logarithm of its length.
        Besides the cost schedule, trials are due after ``growth ** 2`` times as
        many phase-0 steps as before the previous one, whatever the cost
        account says, so that a wrong epoch length cannot end the trials.
      history: epochs kept for Adam's pace (>= 3). Over fewer than about 30
        epoch means the noise of mini-batch losses dominates a slow Adam's pace.
      hopeless: with a known budget, once two trials have been returned from
        and none gained this fraction of what Adam would have gained in its
        cost, exploration stops (only the final polish still runs). One tenth:
        a trial that gains a tenth of Adam's progress per cost cannot pay for
        the trials still to come. 0 disables it.
      assumed_steps_per_epoch: the epoch length assumed for a mini-batch loop
        that is told none (a full-batch loop is recognised: one step, one
        evaluation). A guess on the large side is the safe one: it makes
        Adam's steps look cheap, so trials look costly and fewer start.
    """

    polish: float = 0.9
    judge: float = 0.05
    min_judge: float = 2.0
    explore: float = 0.03
    growth: float = 2.0
    history: int = 32
    hopeless: float = 0.1
    assumed_steps_per_epoch: int = 100


def check_config(config: SafeResortConfig) -> None:
    """ValueError naming the first field of ``config`` out of its range.

    Raises:
      ValueError: ``config`` is not a :class:`SafeResortConfig`, or a field
        out of its range (named in the message).
    """
    if not isinstance(config, SafeResortConfig):
        raise ValueError(f"`config` must be a SafeResortConfig, got {config!r}.")
    check_fraction("polish", config.polish, closed=True)
    check_fraction("judge", config.judge)
    check_fraction("explore", config.explore)
    check_positive("min_judge", config.min_judge)
    check_int("history", config.history, 3)
    check_int("assumed_steps_per_epoch", config.assumed_steps_per_epoch, 1)
    growth = concrete(config.growth)
    if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not 1 <= growth < 1e3:
        raise ValueError(f"`growth` must be a number in [1, 1000), got {config.growth!r}.")
    hopeless = concrete(config.hopeless)
    if (
        isinstance(hopeless, bool)
        or not isinstance(hopeless, (int, float))
        or not (math.isfinite(hopeless) and 0 <= hopeless < 1)
    ):
        raise ValueError(f"`hopeless` must be a number in [0, 1), got {config.hopeless!r}.")
