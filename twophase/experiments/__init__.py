"""Experiments reproducing Hrycej et al., "A Convexity-dependent Two-Phase Training Algorithm
for Deep Neural Networks" (KDIR 2025): datasets, models, losses, runner and plots.

This subpackage depends on the core ``twophase`` package, never the reverse; import its modules
explicitly (``from twophase.experiments import datasets, models``).
"""
