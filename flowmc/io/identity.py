r"""What a reused file is: the identity of an ensemble or checkpoint, compared before reuse.

Wherever flowmc reuses a file instead of writing it (a finished scan point, a resumed ensemble,
a shard, an adapted flow, a training stage, the checkpoint a training resumes or starts from,
a stored :math:`\log\hat Z`), the file's **identity** — action, lattice, sampler and its
settings, seed, the run or scan it belongs to, the flow's SHA-256 — is compared with what the
command would have produced. A mismatch is refused in one line that names the file and the
first field that differs:

``'scan/L4_lam4.h5': action.lam is 4.5, this scan needs 4.0``

The functions here compare plain JSON-like dicts, so every site builds its expected identity
from what it knows (a scan from its manifest, a training from its options) and reads the stored
one from the file (:func:`ensemble_identity`, :func:`checkpoint_identity`).

Example:
    >>> first_difference({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}})
    ('b.c', 2, 3)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "ENSEMBLE_FIELDS",
    "TUNED",
    "checkpoint_identity",
    "check_adapted",
    "check_checkpoint",
    "check_condition",
    "check_identity",
    "check_stage",
    "ensemble_identity",
    "first_difference",
    "mismatch",
]

#: The fields of an ensemble's identity, in the order they are compared (the most telling first).
ENSEMBLE_FIELDS = ("lattice_shape", "n_chains", "action", "sampler", "model_sha256", "seed",
                   "scan", "shard")  # fmt: skip
#: Sampler settings tuned in warm-up: they follow from the others and the seed, not compared.
TUNED = ("sampler.step_size", "sampler.num_steps")

_MISSING = object()


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples become lists, numpy scalars numbers)."""
    return json.loads(json.dumps(value, default=_default, sort_keys=True))


def _default(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def first_difference(
    stored: Any,
    expected: Any,
    field: str = "",
    *,
    partial: Iterable[str] = (),
    ignore: Iterable[str] = (),
) -> tuple[str, Any, Any] | None:
    """The first field where ``stored`` differs from ``expected``, as ``(field, stored,
    expected)``, or ``None``.

    Dicts are compared key by key in ``expected``'s order, then keys only ``stored`` has;
    lists of equal length element by element (``field[i]``); everything else after a JSON round
    trip (so ``(2, 2) == [2, 2]`` and ``np.int64(3) == 3``).

    Args:
        stored: what the file holds.
        expected: what this run needs.
        field: the dotted name of this level (``""`` at the top).
        partial: dotted names of dicts compared only on ``expected``'s keys (e.g. ``"scan"``:
            the directory a scan was written in is not part of its identity).
        ignore: dotted names never compared (e.g. :data:`TUNED`).
    """
    partial, ignore = set(partial), set(ignore)
    if field in ignore:
        return None
    if isinstance(stored, Mapping) and isinstance(expected, Mapping):
        keys = list(expected) + ([] if field in partial else
                                 sorted((k for k in stored if k not in expected), key=str))
        for key in keys:
            sub = f"{field}.{key}" if field else str(key)
            diff = first_difference(stored.get(key, None), expected.get(key, None), sub,
                                    partial=partial, ignore=ignore)  # fmt: skip
            if diff is not None:
                return diff
        return None
    a, b = _plain(stored), _plain(expected)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and any(
        isinstance(x, (dict, list)) for x in a + b
    ):
        for i, (x, y) in enumerate(zip(a, b)):
            diff = first_difference(x, y, f"{field}[{i}]", partial=partial, ignore=ignore)
            if diff is not None:
                return diff
        return None
    return None if a == b else (field, stored, expected)


def _short(value: Any, limit: int = 120) -> str:
    text = repr(_plain(value)) if isinstance(value, (Mapping, list, tuple)) else repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...}"


def mismatch(path: str | os.PathLike[str], field: str, stored: Any, expected: Any,
             *, who: str = "this run", hint: str = "") -> ValueError:  # fmt: skip
    """The one-line refusal: ``'<path>': <field> is <stored>, <who> needs <expected>; <hint>``."""
    msg = f"{os.fspath(path)}: {field} is {_short(stored)}, {who} needs {_short(expected)}"
    return ValueError(f"{msg}; {hint}" if hint else msg)


def check_identity(
    path: str | os.PathLike[str],
    stored: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    who: str = "this run",
    hint: str = "",
    partial: Iterable[str] = (),
    ignore: Iterable[str] = (),
) -> None:
    """Refuse ``path`` (one ``ValueError``) unless ``stored`` has every field of ``expected``.

    Only the top-level keys of ``expected`` are compared (a site says what identifies the file
    for it); below them, see :func:`first_difference`.
    """
    for key in expected:
        diff = first_difference(stored.get(key, None), expected[key], str(key),
                                partial=partial, ignore=ignore)  # fmt: skip
        if diff is not None:
            raise mismatch(path, *diff, who=who, hint=hint)


def ensemble_identity(path: str | os.PathLike[str]) -> tuple[dict[str, Any], int]:
    """The identity of an ensemble file (:data:`ENSEMBLE_FIELDS`, plus the storage options)
    and its committed rows per chain ``n``; opens it read-only.

    ``scan`` and ``shard`` are the ``meta`` entries that say which scan point or which shard of
    a sharded run the file is (``None`` if none).
    """
    from flowmc.io.ensemble import open_ensemble  # the reader imports this module's hints

    with open_ensemble(path) as ens:
        attrs = ens.attrs
        ident = {
            "lattice_shape": list(ens.lattice_shape),
            "n_chains": int(ens.n_chains),
            "action": dict(ens.action),
            "sampler": dict(ens.sampler),
            "model_sha256": attrs.get("model_sha256", ""),
            "seed": ens.seed,
            "scan": ens.meta.get("scan"),
            "shard": ens.meta.get("shard"),
            "store_configs": bool(attrs.get("store_configs")),
            "config_dtype": attrs.get("config_dtype"),
            "compression": attrs.get("compression") or "",
        }
        return _plain(ident), int(ens.n)


def checkpoint_identity(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The identity of a loaded checkpoint: ``action``, ``condition`` (``None`` or ``[lo,
    hi]``), ``flow_config``, ``seed``, ``recipe``, ``dtype`` and the ``init_from`` ancestor's
    SHA-256 (``None`` for a first stage)."""
    meta = ckpt.get("meta") or {}
    cfg = dict(ckpt.get("flow_config") or {})
    cond = (cfg.get("condition") or {}).get("lam")
    return _plain({
        "action": ckpt.get("action"),
        "condition": None if cond is None else [float(cond[0]), float(cond[1])],
        "flow_config": cfg,
        "seed": meta.get("seed"),
        "recipe": meta.get("recipe"),
        "dtype": meta.get("dtype", "float32"),
        "init_from": (meta.get("init_from") or {}).get("sha256"),
    })  # fmt: skip


def check_checkpoint(path: str | os.PathLike[str], expected: Mapping[str, Any], *,
                     hint: str = "it is not the flow this run would train; move it away"
                     ) -> dict:  # fmt: skip
    """Load a checkpoint that a workflow reuses instead of training it, refusing it unless its
    identity (:func:`checkpoint_identity`; ``action`` and ``flow_config`` compared on
    ``expected``'s keys) has every field of ``expected``; returns the checkpoint."""
    from flowmc.io.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    check_identity(path, checkpoint_identity(ckpt), expected, hint=hint,
                   partial=("action", "flow_config", "flow_config.extra"))  # fmt: skip
    return ckpt


def check_condition(path: str | os.PathLike[str], ckpt: Mapping[str, Any],
                    lam: float | tuple[float, float] | None) -> None:  # fmt: skip
    """A training that starts from ``path`` (``--init-from``) keeps its condition on λ: a
    coupling ``lam`` must lie inside it, a range must be it; a flow of one coupling cannot be
    given a range.

    Raises:
        ValueError: one line naming the checkpoint, its condition and what the run asked for.
    """
    if lam is None:
        return
    cond = ((ckpt.get("flow_config") or {}).get("condition") or {}).get("lam")
    want = (f"lam over [{lam[0]:g}, {lam[1]:g}]" if isinstance(lam, tuple)
            else f"lam = {float(lam):g}")  # fmt: skip
    if cond is None:
        if isinstance(lam, tuple):
            raise ValueError(
                f"{os.fspath(path)}: a flow of one coupling (not conditioned on lam); this run "
                f"needs {want}; --init-from cannot add a condition (train a conditional flow "
                "with --lam LO:HI)"
            )
        return
    lo, hi = float(cond[0]), float(cond[1])
    ok = ((float(lam[0]), float(lam[1])) == (lo, hi) if isinstance(lam, tuple)
          else lo <= float(lam) <= hi)  # fmt: skip
    if not ok:
        raise ValueError(
            f"{os.fspath(path)}: conditioned on lam over [{lo:g}, {hi:g}]; this run needs {want} "
            "(--init-from keeps the condition of its flow: give --lam inside it, or none)"
        )


def check_adapted(path: str | os.PathLike[str], out: str | os.PathLike[str],
                  meta: Mapping[str, Any]) -> None:  # fmt: skip
    """A resumed ensemble reuses its adapted flow ``OUT.adapted.pt``: it must be the flow the
    ensemble was sampled with (``meta["model"]["sha256"]``)."""
    from flowmc.io.ensemble import file_sha256

    want = (meta.get("model") or {}).get("sha256")
    got = file_sha256(path)
    if want and got != want:
        raise ValueError(
            f"{os.fspath(path)}: sha256 is {got!r}, but the ensemble {os.fspath(out)!r} was "
            f"sampled with the adapted flow {want!r}: it is not this ensemble's adapted flow "
            "(restore it, or start a new ensemble)"
        )


def check_stage(path: str | os.PathLike[str], action: Any, recipe: str, seed: int,
                previous: str | os.PathLike[str] | None,
                flow_overrides: Mapping[str, Any] | None = None) -> None:  # fmt: skip
    """A staged training (:func:`flowmc.training.workflow.train_staged`) that resumes reuses
    its stage file ``path``: refuse one of another action, lattice, seed or recipe, or one that
    did not start from ``previous`` (the stage before it); for the first stage, of another
    condition on λ than ``flow_overrides`` asks for."""
    from flowmc.io.checkpoint import load_checkpoint
    from flowmc.io.ensemble import file_sha256

    want: dict[str, Any] = {"action": action.params(), "seed": int(seed), "recipe": recipe}
    cond = (flow_overrides or {}).get("condition") or {}
    if cond.get("lam") is not None:
        want["condition"] = [float(v) for v in cond["lam"]]
    if previous is not None:
        want["init_from"] = file_sha256(previous)
    check_identity(path, checkpoint_identity(load_checkpoint(path)), want,
                   hint="it is not this pipeline's stage; move it away (or train without "
                   "--resume)")  # fmt: skip
