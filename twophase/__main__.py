"""``python -m twophase``: the paper's experiment (see ``twophase.experiments.cli``)."""

from twophase.experiments.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
