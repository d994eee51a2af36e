"""Interoperability: flowmc ensembles as :class:`arviz.InferenceData`.

Example:
    >>> idata = to_inference_data("run.h5", discard=100)  # doctest: +SKIP
    >>> import arviz as az  # doctest: +SKIP
    >>> az.ess(idata, method="mean")  # doctest: +SKIP

Note that arviz reports ``ess`` and the *statistics literature's* autocorrelation time
:math:`1 + 2\\sum\\rho`, while flowmc uses :math:`\\tau_\\mathrm{int} = \\tfrac12 + \\sum\\rho`
(``docs/statistics.md``); both give ESS :math:`= N/(2\\tau_\\mathrm{int})`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

import numpy as np

from flowmc.io.ensemble import Ensemble, open_ensemble
from flowmc.lattice.observables import ising_energy

__all__ = ["to_inference_data"]

#: Sampler scalars put into the ``sample_stats`` group when present.
_STATS = ("accepted", "is_accepted", "log_q", "log_weight", "delta_h")


def to_inference_data(
    ensemble_or_path: str | os.PathLike[str] | Ensemble,
    *,
    discard: int = 0,
    energy: bool = True,
    chunk: int = 512,
) -> Any:
    r"""Convert an ensemble into an :class:`arviz.InferenceData` with dims ``(chain, draw)``.

    ``posterior`` holds per-configuration observables: ``m`` :math:`= M/V`, ``abs_m``,
    ``m2`` (from the stored ``magnetization`` scalar), ``action_density`` :math:`= S/V` (from
    ``action``), and ``energy`` (Ising energy, see ``docs/observables.md``; streamed from the
    configurations, only when stored and ``energy=True``). ``sample_stats`` holds the sampler
    scalars present among ``accepted``, ``log_q``, ``log_weight`` and ``delta_h``. The attrs
    carry the lattice shape, action and sampler (JSON strings) and ``discard``.

    Args:
        ensemble_or_path: an ensemble file or an open :class:`~flowmc.io.ensemble.Ensemble`.
        discard: rows per chain dropped at the start (thermalisation).
        energy: also stream the configurations to compute ``energy``.
        chunk: rows per chain read at a time for ``energy``.

    Returns:
        ``arviz.InferenceData`` with groups ``posterior`` and (if any stats) ``sample_stats``.

    Raises:
        ValueError: if ``discard`` leaves no rows, or the ensemble has no usable scalars.
        ImportError: if arviz is not installed.
    """
    if isinstance(ensemble_or_path, Ensemble):
        return _convert(ensemble_or_path, discard, energy, chunk)
    with open_ensemble(ensemble_or_path) as ens:
        return _convert(ens, discard, energy, chunk)


def _convert(ens: Ensemble, discard: int, energy: bool, chunk: int) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    if int(discard) != discard or not 0 <= discard < ens.n:
        raise ValueError(f"Expected 0 <= discard < n = {ens.n}; got {discard!r}")
    discard = int(discard)
    vol = math.prod(ens.lattice_shape)
    names = set(ens.scalar_names)
    post: dict[str, np.ndarray] = {}
    if "magnetization" in names:
        m = ens.scalar("magnetization")[discard:] / vol
        post.update(m=m, abs_m=np.abs(m), m2=m**2)
    if "action" in names:
        post["action_density"] = ens.scalar("action")[discard:] / vol
    if energy and ens.has_configs:
        parts = []
        for block in ens.iter_configs(chunk, start=discard):
            k = block.shape[0]
            flat = np.asarray(block, dtype=np.float64).reshape(k * ens.n_chains, *ens.lattice_shape)
            parts.append(ising_energy(flat).reshape(k, ens.n_chains))
        post["energy"] = np.concatenate(parts)
    if not post:
        raise ValueError(
            f"{ens.path!r} has neither 'magnetization' nor 'action' scalars nor configurations"
        )
    stats = {k: np.asarray(ens.scalar(k)[discard:]) for k in _STATS if k in names}  # (n, C) each
    attrs = {
        "lattice_shape": json.dumps(list(ens.lattice_shape)),
        "action": json.dumps(ens.action, sort_keys=True),
        "sampler": json.dumps(ens.sampler, sort_keys=True),
        "discard": discard,
        "source": str(ens.path),
    }
    # arviz wants (chain, draw): transpose the (n, C) storage
    kwargs: dict[str, Any] = {"posterior": {k: np.ascontiguousarray(v.T) for k, v in post.items()}}
    if stats:
        kwargs["sample_stats"] = {k: np.ascontiguousarray(v.T) for k, v in stats.items()}
    idata = arviz.from_dict(**kwargs)
    for group in idata.groups():  # set explicitly: from_dict(attrs=) is not honoured everywhere
        idata[group].attrs.update(attrs)
    return idata
