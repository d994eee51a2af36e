"""Flow checkpoints: model config and weights, action, training state, provenance.

A checkpoint is a ``torch.save`` dict of plain Python values and tensors (loadable with
``weights_only=True``)::

    format            "flowmc-checkpoint"
    format_version    1
    flowmc_version    version that wrote it
    flow_config       FlowConfig.to_dict()
    model_state       state_dict of the Flow
    action            Phi4Action.params()
    symmetric         bool: sample/evaluate with the Z2-symmetrised density
    train_config      TrainConfig.to_dict()
    trainer_state     optimizer state, step, history, generator state (for resuming)
    resolved_config   the CLI options that made it
    meta              free-form provenance (machine, created, training wall time, ...)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path

import torch

import flowmc
from flowmc.action import Phi4Action
from flowmc.flow import Flow, FlowAt, FlowConfig, Z2SymmetricFlow, build_flow
from flowmc.shipped import resolve_model_path

__all__ = ["save_checkpoint", "load_checkpoint", "load_model", "LoadedModel", "FORMAT"]

FORMAT = "flowmc-checkpoint"
FORMAT_VERSION = 1


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": str(torch.__version__),
        "torch_threads": torch.get_num_threads(),
    }


def save_checkpoint(
    path: str | Path,
    flow: Flow,
    action: Phi4Action,
    *,
    symmetric: bool = False,
    train_config: dict | None = None,
    trainer_state: dict | None = None,
    resolved_config: dict | None = None,
    meta: dict | None = None,
) -> None:
    """Write a checkpoint atomically (temporary file, then rename)."""
    if flow.config is None:
        raise ValueError("Expected a flow built by build_flow (flow.config is None)")

    def plain(x: dict | None) -> dict:  # JSON types only, so torch.load(weights_only=True) works
        return json.loads(json.dumps(x or {}, default=str))

    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "flowmc_version": flowmc.__version__,
        "flow_config": flow.config.to_dict(),
        "model_state": {k: v.detach().cpu() for k, v in flow.state_dict().items()},
        "action": action.params(),
        "symmetric": bool(symmetric),
        "train_config": plain(train_config),
        "trainer_state": trainer_state,
        "resolved_config": plain(resolved_config),
        "meta": plain({"created": _dt.datetime.now(_dt.timezone.utc).isoformat(), **(meta or {})}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and validate a checkpoint dict.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a flowmc checkpoint or has a newer format.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not ours"
        raise ValueError(
            f"{path} is not a readable flowmc checkpoint ({exc.__class__.__name__})"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a flowmc checkpoint (missing format '{FORMAT}')")
    if int(ckpt.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format {ckpt['format_version']}; this flowmc reads "
            f"<= {FORMAT_VERSION} (upgrade flowmc)"
        )
    return ckpt


class LoadedModel:
    """A flow restored from a checkpoint, ready to sample.

    Attributes:
        flow: the underlying :class:`Flow` (in eval mode).
        proposal: the density to sample: ``flow`` (a conditional flow at ``lam``:
            :class:`FlowAt`), or its :class:`Z2SymmetricFlow` if the checkpoint says
            ``symmetric``.
        action: the :class:`Phi4Action` it samples (a conditional flow's at ``lam``).
        lam: the coupling a conditional flow is used at (``None`` for a flow of one action).
        checkpoint: the raw checkpoint dict.
        path: where it was loaded from.
    """

    def __init__(
        self, flow: Flow, action: Phi4Action, checkpoint: dict, path: Path,
        lam: float | None = None,
    ) -> None:
        self.flow = flow
        self.action = action
        self.checkpoint = checkpoint
        self.path = path
        self.lam = lam
        self.symmetric = bool(checkpoint.get("symmetric", False))
        base: Flow | FlowAt = flow.at(lam) if lam is not None else flow
        # an equivariant flow with an even prior has q(-phi) = q(phi): q_s = q exactly
        wrap = self.symmetric and not (flow.config is not None and flow.config.equivariant)
        self.proposal: Flow | FlowAt | Z2SymmetricFlow = Z2SymmetricFlow(base) if wrap else base


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    lattice_shape: tuple[int, ...] | None = None,
    symmetric: bool | None = None,
    lam: float | None = None,
) -> LoadedModel:
    """Restore a trained flow.

    Args:
        path: checkpoint file, or the name of a shipped flow (``"phi4_L8_m2-4_lam8"``; see
            :func:`flowmc.shipped_models`). An existing file of that name wins.
        device: where to put the model.
        dtype: parameter dtype.
        lattice_shape: if given, the lattice the caller expects (error if different).
        symmetric: override the checkpoint's choice of Z2-symmetrised proposal.
        lam: the quartic coupling to use a flow conditioned on it at (required for such a flow,
            inside its range); for a flow of one action it may only repeat that action's.

    Raises:
        FileNotFoundError: if ``path`` is neither a file nor a shipped flow's name.
        ValueError: if the checkpoint is for another lattice than ``lattice_shape``, or ``lam``
            does not fit the flow.
    """
    path = resolve_model_path(path)
    ckpt = load_checkpoint(path)
    config = FlowConfig.from_dict(ckpt["flow_config"])
    if lattice_shape is not None and tuple(lattice_shape) != tuple(config.lattice_shape):
        raise ValueError(
            f"checkpoint {path} is for lattice {tuple(config.lattice_shape)}; expected "
            f"{tuple(lattice_shape)}"
        )
    flow = build_flow(config)
    flow.load_state_dict(ckpt["model_state"])
    flow.to(device=device, dtype=dtype).eval()
    for p in flow.parameters():
        p.requires_grad_(False)
    action = Phi4Action.from_params(ckpt["action"])
    if flow.is_conditional:
        lo, hi = flow.lam_range
        if lam is None:
            raise ValueError(
                f"{path} is a flow conditioned on lam over [{lo:g}, {hi:g}]; give the coupling "
                "to sample (--lam)"
            )
        lam = float(lam)
        if not lo <= lam <= hi:
            raise ValueError(
                f"Expected --lam inside the range [{lo:g}, {hi:g}] that {path} was trained on; "
                f"got {lam:g}"
            )
        action = Phi4Action(action.m2, lam, action.lattice_shape)
    elif lam is not None:
        if float(lam) != action.lam:
            raise ValueError(
                f"{path} was trained at lam = {action.lam:g} only (it is not conditioned on lam); "
                f"got --lam {float(lam):g}"
            )
        lam = None
    if symmetric is not None:
        ckpt = {**ckpt, "symmetric": bool(symmetric)}
    return LoadedModel(flow, action, ckpt, path, lam=lam)
