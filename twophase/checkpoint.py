"""Checkpoints of parameters and optimizer state with orbax-checkpoint.

Three functions over a directory of numbered steps: :func:`save_checkpoint`,
:func:`restore_checkpoint` and :func:`latest_step`. Any pytree of arrays and
scalars round-trips, including our ``NamedTuple`` states
(:class:`twophase.TwoPhaseState`, :class:`twophase.NonlinearCGState`) with
their ``None`` fields and int32 / float32 / float64 / bool scalars.

Layout: step ``k`` is the orbax step directory ``<directory>/<k>`` holding two
items: ``state``, the pytree's leaves as a flat list (orbax never sees our
containers), and ``layout``, a small JSON record of every leaf's key path,
shape, dtype and weak type. Restoring reads ``layout`` first, checks it against the
target's leaves, restores the leaves into the target's dtypes and shardings,
and rebuilds the pytree with the *target's* treedef: container types
(``NamedTuple`` classes, ``None`` fields, optax states) come from the target.

orbax-checkpoint is an optional dependency (``pip install twophase[checkpoint]``),
imported when a function is called.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import numpy as np

from twophase._checks import as_non_negative_int

__all__ = ["latest_step", "restore_checkpoint", "save_checkpoint"]

PyTree = Any
_FORMAT = "twophase.checkpoint/1"
_MAX_LISTED = 5


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "twophase.checkpoint needs orbax-checkpoint: "
            "`pip install twophase[checkpoint]` (or `pip install orbax-checkpoint`)."
        ) from e
    return ocp


def _as_path(directory: str | os.PathLike):
    _orbax()  # the clear ImportError first
    from etils import epath  # a dependency of orbax-checkpoint

    text = os.fspath(directory)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _manager(path, *, keep: int | None = None, writing: bool = False):
    """A synchronous CheckpointManager; only a writing one creates ``path`` and
    removes the leftovers of interrupted saves."""
    ocp = _orbax()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=writing,
        cleanup_tmp_directories=writing,
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(path, options=options)


def _leaf_record(leaf: Any) -> tuple[list[int], str]:
    """(shape, dtype name) of a leaf; Python scalars are recorded as 0-d."""
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct, np.ndarray, np.generic)):
        return list(leaf.shape), str(np.dtype(leaf.dtype))
    if isinstance(leaf, (bool, int, float, complex)):
        return [], type(leaf).__name__
    raise TypeError(
        f"checkpoint leaves must be arrays or Python/NumPy scalars, got {type(leaf).__name__}."
    )


def _layout(tree: PyTree) -> tuple[list[str], list[Any], list[list[int]], list[str], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    leaves = [x for _, x in flat]
    shapes, dtypes = [], []
    for path, leaf in zip(paths, leaves, strict=True):
        try:
            shape, dtype = _leaf_record(leaf)
        except TypeError as e:
            raise TypeError(f"leaf `{path or '<root>'}`: {e}") from None
        shapes.append(shape)
        dtypes.append(dtype)
    return paths, leaves, shapes, dtypes, treedef


def _listing(names: list[str]) -> str:
    shown = ", ".join(f"`{n or '<root>'}`" for n in names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _mismatch(saved: dict, paths: list[str], shapes: list[list[int]]) -> str | None:
    """Why the checkpoint's leaves do not fit the target's, or ``None``."""
    saved_paths, saved_shapes = saved["paths"], [list(s) for s in saved["shapes"]]
    problems = []
    if saved_paths != paths:
        missing = [p for p in saved_paths if p not in set(paths)]
        extra = [p for p in paths if p not in set(saved_paths)]
        problems.append(f"the checkpoint has {len(saved_paths)} leaves, the target {len(paths)}")
        if missing:
            problems.append(f"only in the checkpoint: {_listing(missing)}")
        if extra:
            problems.append(f"only in the target: {_listing(extra)}")
        if not missing and not extra:
            problems.append("the same leaves in a different order")
    else:
        wrong = [
            f"`{p or '<root>'}` {tuple(a)} in the checkpoint vs {tuple(b)} in the target"
            for p, a, b in zip(paths, saved_shapes, shapes, strict=True)
            if a != b
        ]
        if wrong:
            problems.append("shapes differ: " + "; ".join(wrong[:_MAX_LISTED]))
    return "; ".join(problems) or None


def _added_fields(saved: dict, paths: list[str], leaves: list[Any]) -> list[str]:
    """The target's leaves that a checkpoint written before they existed lacks
    (a state field added by a later version), when every saved leaf is in the
    target and the target gives each missing one a value; else ``[]``."""
    saved_paths = set(saved["paths"])
    added = [p for p in paths if p not in saved_paths]
    if not added or not saved_paths <= set(paths):
        return []
    concrete = (jax.Array, np.ndarray, np.generic, bool, int, float, complex)
    by_path = dict(zip(paths, leaves, strict=True))
    if not all(isinstance(by_path[p], concrete) for p in added):
        return []
    return added


def _restore_spec(leaf: Any) -> Any:
    """What orbax should restore a leaf as: a jax.Array with the target's
    dtype and sharding, a NumPy array, or a Python scalar."""
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    if isinstance(leaf, np.generic):
        return np.asarray(leaf)
    return leaf


def _restored_leaf(value: Any, target: Any, weak_type: bool) -> Any:
    """Brings a restored leaf to the target leaf's type, and a jax.Array to the
    saved array's weak type."""
    if isinstance(target, (jax.Array, jax.ShapeDtypeStruct)):
        if weak_type and target.shape == ():
            # orbax restores weak-typed scalars (e.g. in optax.lbfgs's state) as
            # strong ones, whose new aval would retrace a jitted step. A Python
            # scalar becomes a weak array of the default dtype: rebuild it so.
            scalar = jax.numpy.asarray(np.asarray(value.addressable_data(0)).item())
            if scalar.dtype == target.dtype:
                value = jax.device_put(scalar, value.sharding)
        return value
    if isinstance(target, np.generic):
        return np.asarray(value, target.dtype)[()]
    if isinstance(target, np.ndarray):
        return np.asarray(value, target.dtype)
    if isinstance(target, (bool, int, float, complex)):
        return type(target)(value)
    return value


def latest_step(directory: str | os.PathLike) -> int | None:
    """The largest step with a complete checkpoint in ``directory``, or ``None``
    (also when ``directory`` does not exist). Interrupted saves do not count."""
    path = _as_path(directory)
    if not path.exists():
        return None
    with _manager(path) as manager:
        return manager.latest_step()


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    state: PyTree,
    *,
    keep: int = 3,
    overwrite: bool = False,
) -> None:
    """Saves ``state`` as checkpoint ``step`` in ``directory``; returns when written.

    The write is atomic: orbax writes into a temporary directory
    (``<step>.orbax-checkpoint-tmp``) and renames it to ``<step>`` only once
    everything is on disk (on object stores without atomic rename, a
    ``commit_success.txt`` marks completion instead). A save that fails or is
    killed midway leaves the earlier checkpoints intact and is invisible to
    :func:`latest_step` and :func:`restore_checkpoint`; its leftovers are
    removed by the next save.

    Args:
      directory: the checkpoint directory (created if needed); local path or
        any URL orbax supports (``gs://...``).
      step: non-negative int, the checkpoint's number. It need not exceed the
        existing ones.
      state: any pytree of ``jax.Array``, NumPy arrays and Python / NumPy
        scalars (``None`` leaves and empty containers are kept by the target's
        structure at restore time). Sharded arrays are saved from their shards.
      keep: positive int; after saving, only the ``keep`` checkpoints with the
        largest steps are kept.
      overwrite: replace an existing checkpoint ``step``. The old one is deleted
        before the new one is written, so a crash in between loses that step
        (never the others).

    Raises:
      ValueError: a negative or non-int ``step``, ``keep < 1``, or a ``state``
        without leaves.
      TypeError: a leaf that is not an array or a scalar.
      FileExistsError: checkpoint ``step`` exists and ``overwrite`` is False.
    """
    step = as_non_negative_int("step", step)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"`keep` must be a positive int, got {keep!r}.")
    paths, leaves, shapes, dtypes, _ = _layout(state)
    if not leaves:
        raise ValueError("`state` has no array leaves: nothing to save.")
    leaves = [np.asarray(x) if isinstance(x, np.generic) else x for x in leaves]
    layout = {
        "format": _FORMAT,
        "paths": paths,
        "shapes": shapes,
        "dtypes": dtypes,
        "weak_types": [bool(getattr(x, "weak_type", False)) for x in leaves],
    }
    ocp = _orbax()
    path = _as_path(directory)
    with _manager(path, keep=keep, writing=True) as manager:
        if step in manager.all_steps():
            if not overwrite:
                raise FileExistsError(
                    f"a checkpoint for step {step} already exists in {os.fspath(directory)!r};"
                    " pass `overwrite=True` to replace it."
                )
            manager.delete(step)
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(leaves), layout=ocp.args.JsonSave(layout)
            ),
            force=True,
        )
        manager.wait_until_finished()


def restore_checkpoint(
    directory: str | os.PathLike, target: PyTree, step: int | None = None
) -> tuple[int, PyTree]:
    """Restores checkpoint ``step`` (the latest when ``None``) into ``target``'s form.

    Args:
      directory: the checkpoint directory.
      target: a pytree with the saved state's structure, e.g. fresh
        ``params`` and ``opt.init(params)``, or their ``jax.eval_shape`` with
        shardings. Its treedef (``NamedTuple`` types, ``None`` fields), leaf
        dtypes (values are cast to them), and shardings (``jax.Array`` /
        ``jax.ShapeDtypeStruct`` leaves; a single local device when a
        ``ShapeDtypeStruct`` has none) are those of the result. Its values are
        not used, except for leaves that a checkpoint written by an earlier
        version lacks (a state field added since): those keep the target's
        values, with a warning naming them. Weakly typed scalars come back
        weakly typed as saved, so a jitted step sees the avals it was traced
        with and does not retrace.
      step: a non-negative int, or ``None`` for the latest step.

    Returns:
      ``(step, state)``: the restored step and the state.

    Raises:
      ValueError: a negative or non-int ``step``; ``target``'s leaves (key paths
        and shapes) do not match the checkpoint's (the message says how).
      FileNotFoundError: ``directory`` holds no checkpoint, or none for ``step``.
    """
    if step is not None:
        step = as_non_negative_int("step", step)
    paths, target_leaves, shapes, _, treedef = _layout(target)
    ocp = _orbax()
    path = _as_path(directory)
    steps = []
    if path.exists():
        with _manager(path) as manager:
            steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {os.fspath(directory)!r}.")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {os.fspath(directory)!r}; it holds steps {steps}."
        )
    with _manager(path) as manager:
        saved = manager.restore(step, args=ocp.args.Composite(layout=ocp.args.JsonRestore()))
        layout = saved.layout
        if not isinstance(layout, dict) or layout.get("format") != _FORMAT:
            raise ValueError(
                f"step {step} in {os.fspath(directory)!r} was not written by "
                "twophase.save_checkpoint."
            )
        added = _added_fields(layout, paths, target_leaves)
        new_fields = set(added)
        kept = [i for i, p in enumerate(paths) if p not in new_fields]
        why = _mismatch(layout, [paths[i] for i in kept], [shapes[i] for i in kept])
        if why is not None:
            why = _mismatch(layout, paths, shapes)
            raise ValueError(
                f"`target` does not match checkpoint step {step} in "
                f"{os.fspath(directory)!r}: {why}."
            )
        specs = [_restore_spec(target_leaves[i]) for i in kept]
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(specs))
        ).state
    if added:
        warnings.warn(
            f"checkpoint step {step} in {os.fspath(directory)!r} predates "
            f"{_listing(added)}: those fields take `target`'s values.",
            stacklevel=2,
        )
    weak_types = layout.get("weak_types", [False] * len(restored))
    leaves = list(target_leaves)
    for i, value, weak in zip(kept, restored, weak_types, strict=True):
        leaves[i] = _restored_leaf(value, target_leaves[i], weak)
    return step, jax.tree.unflatten(treedef, leaves)
