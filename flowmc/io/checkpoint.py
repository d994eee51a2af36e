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

Writing is atomic and durable (:func:`flowmc.io.durable.write_atomically`: temporary file
``.<name>.tmp-<pid>``, ``fsync``, rename, ``fsync`` of the directory): a reader sees the previous
checkpoint or the complete new one, also after a crash or power cut. Reading validates every key
(:func:`load_checkpoint`), so a damaged or hand-edited file gives one clear error.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from flowmc._version import flowmc_version
from flowmc.flows.flow import (
    Flow,
    FlowAt,
    FlowConfig,
    Z2SymmetricFlow,
    build_flow,
    check_integration,
)
from flowmc.io import durable, safeio
from flowmc.io.formats import CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION
from flowmc.io.shipped import resolve_model_path
from flowmc.lattice.action import Phi4Action

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "claim_output",
    "check_output",
    "LoadedModel",
    "FORMAT",
    "export_checkpoint",
]

#: The ``format`` entry of every flowmc checkpoint.
FORMAT = CHECKPOINT_FORMAT
FORMAT_VERSION = CHECKPOINT_FORMAT_VERSION


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
        "flowmc_version": flowmc_version(),
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
    buf = io.BytesIO()
    torch.save(payload, buf)
    try:
        durable.write_atomically(str(path), buf.getbuffer())
    except OSError as e:
        keep = "the previous checkpoint there is unchanged" if path.exists() else "nothing written"
        err = OSError(f"Cannot write checkpoint {str(path)!r}: {e.strerror or e}; {keep}")
        err.errno = e.errno
        raise err from None


#: Keys of a checkpoint and their types (required ones first).
_REQUIRED_KEYS = {"flow_config": dict, "model_state": dict, "action": dict}
_OPTIONAL_KEYS = {
    "format_version": int,
    "flowmc_version": str,
    "symmetric": bool,
    "train_config": dict,
    "trainer_state": (dict, type(None)),
    "resolved_config": dict,
    "meta": dict,
}
_TRAINER_KEYS = {"optimizer": dict, "step": int, "elapsed": (int, float), "history": dict}


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {dict: "a dict", int: "an integer", float: "a number", str: "a string",
             bool: "a boolean", type(None): "None"}
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join(names.get(x, x.__name__) for x in ts)


def _check_keys(d: dict, spec: dict, where: str, *, required: bool) -> None:
    for key, t in spec.items():
        if key not in d:
            if required:
                raise ValueError(f"{where}: key {key!r} is missing")
            continue
        v = d[key]
        if not isinstance(v, t) or (isinstance(v, bool) and t in (int, (int, float))):
            raise ValueError(
                f"{where}: key {key!r} must be {_type_name(t)}; got {type(v).__name__}"
            )


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    require_trainer_state: bool = False,
) -> dict:
    """Load and validate a checkpoint dict.

    Every key the readers use is checked for presence and type, so a damaged, hand-edited or
    foreign file gives one clear error rather than a ``KeyError`` deep inside.

    Args:
        path: the checkpoint.
        map_location: passed to ``torch.load``.
        require_trainer_state: also require the optimizer/step/history state that
            ``flowmc train --resume`` needs.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a flowmc checkpoint, has a newer format, lacks a key or
            holds one of the wrong type (the message names the file and the key).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file, so not a flowmc checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not ours"
        raise ValueError(
            f"{path} is not a readable flowmc checkpoint ({exc.__class__.__name__})"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a flowmc checkpoint (missing format '{FORMAT}')")
    where = f"{path} is not a usable flowmc checkpoint"
    _check_keys(ckpt, _OPTIONAL_KEYS, where, required=False)
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format {ckpt['format_version']}; this flowmc reads "
            f"<= {FORMAT_VERSION} (upgrade flowmc)"
        )
    _check_keys(ckpt, _REQUIRED_KEYS, where, required=True)
    bad = [k for k, v in ckpt["model_state"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{where}: model_state entry {bad[0]!r} is not a tensor")
    if require_trainer_state:
        state = ckpt.get("trainer_state")
        if not isinstance(state, dict):
            raise ValueError(
                f"{path} has no trainer state to resume (optimizer, step, history; e.g. a "
                "checkpoint written by a script); start a new stage from it with init_from "
                "(--init-from) instead"
            )
        _check_keys(state, _TRAINER_KEYS, f"{where} (trainer_state)", required=True)
        _check_keys(ckpt, {"train_config": dict}, where, required=True)
    return ckpt


def _identify_checkpoint(path: str) -> str | None:
    """``None`` if the regular file ``path`` is a flowmc checkpoint, else what it is."""
    info = safeio.sniff(path)  # reads the pickle's opcodes only, never unpickles
    return None if info.kind == "checkpoint" else f"it is {info.what}"


def check_output(path: str | Path, *, force: bool, lock_held: bool = False) -> bool:
    """Check that ``flowmc train`` may write a new checkpoint to ``path``.

    Without ``force`` the name must be free; with ``force`` only a regular file holding a
    flowmc checkpoint is replaced (never a directory, device, link or someone's data).

    Returns:
        Whether ``path`` exists (and will be replaced by the first save).

    Raises:
        FileExistsError: if ``path`` may not be replaced.
    """
    return durable.check_replaceable(
        str(path), force=force, what="flowmc checkpoint", identify=_identify_checkpoint,
        lock_held=lock_held,
    )


def claim_output(path: str | Path, *, force: bool = False, resume: bool = False) -> Any:
    """Take the name ``path`` for one training run; returns the held :class:`NameLock`.

    Checks the replacement policy (:func:`check_output`) unless ``resume``; the lock makes a
    second ``flowmc train`` of the same ``--out`` fail at once. Release it (or use it as a
    context manager) when the run ends.

    Raises:
        FileExistsError: see :func:`check_output`.
        BlockingIOError: if another process trains into ``path``.
    """
    lock = durable.NameLock(str(path)).acquire()
    try:
        if not resume:
            check_output(path, force=force, lock_held=True)
    except BaseException:
        lock.release()
        raise
    return lock


def _config_and_action(ckpt: dict, path: Path) -> tuple[FlowConfig, Phi4Action]:
    """The checkpoint's flow config and action, with one clear error if either is invalid."""
    try:
        config = FlowConfig.from_dict(ckpt["flow_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid flow_config ({e})") from e
    try:
        action = Phi4Action.from_params(ckpt["action"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid action ({type(e).__name__}: {e})") from e
    return config, action


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
        #: integration steps of the continuous layers (``None``: the flow has none)
        self.int_steps: int | None = (
            flow.continuous_layers[0].int_steps if flow.continuous_layers else None
        )
        base: Flow | FlowAt = flow.at(lam) if lam is not None else flow
        # an equivariant flow with an even prior has q(-phi) = q(phi): q_s = q exactly
        wrap = self.symmetric and not (flow.config is not None and flow.config.z2_equivariant)
        self.proposal: Flow | FlowAt | Z2SymmetricFlow = Z2SymmetricFlow(base) if wrap else base


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    lattice_shape: tuple[int, ...] | None = None,
    symmetric: bool | None = None,
    lam: float | None = None,
    int_steps: int | None = None,
) -> LoadedModel:
    """Restore a trained flow.

    Args:
        path: checkpoint file, or the name of a shipped flow (``"phi4_L8_m2-4_lam8"``; see
            :func:`flowmc.shipped_models`). An existing file of that name wins.
        device: where to put the model.
        dtype: parameter dtype.
        lattice_shape: if given, the lattice the caller expects (error if different).
        symmetric: override the checkpoint's choice of Z2-symmetrised proposal.
        int_steps: integration steps of a continuous flow's layers (default: as trained).
        lam: the quartic coupling to use a flow conditioned on it at (required for such a flow,
            inside its range); for a flow of one action it may only repeat that action's.

    Raises:
        FileNotFoundError: if ``path`` is neither a file nor a shipped flow's name.
        ValueError: if the checkpoint is for another lattice than ``lattice_shape``, or ``lam``
            does not fit the flow.
    """
    path = resolve_model_path(path)
    ckpt = load_checkpoint(path)
    config, action = _config_and_action(ckpt, path)
    if lattice_shape is not None and tuple(lattice_shape) != tuple(config.lattice_shape):
        raise ValueError(
            f"checkpoint {path} is for lattice {tuple(config.lattice_shape)}; expected "
            f"{tuple(lattice_shape)}"
        )
    flow = build_flow(config)
    try:
        flow.load_state_dict(ckpt["model_state"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: model_state does not fit its flow_config ({first})") from e
    flow.to(device=device, dtype=dtype).eval()
    for p in flow.parameters():
        p.requires_grad_(False)
    if int_steps is not None:
        if not flow.continuous_layers:
            raise ValueError(
                f"{path} has no continuous flow layers; --int-steps applies only to a "
                "continuous flow (coupling cnf)"
            )
        flow.set_int_steps(int_steps)
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


def export_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    int_steps: int | None = None,
    lam: float | None = None,
    n_check: int = 256,
    force: bool = False,
) -> dict:
    r"""Write a copy of a trained checkpoint for use (e.g. to ship it), optionally with the
    integration steps its continuous layers sample with from now on.

    A continuous flow trains with few steps (its training penalty keeps the carried log
    determinant honest) but an exact chain needs :math:`\ell_N` converged
    (:func:`flowmc.flows.flow.check_integration`). The copy stores ``int_steps`` in its
    ``flow_config``, so every command that loads it samples with that many steps; the copy is
    written only if the flow passes the integration check at ``int_steps`` on ``n_check`` draws
    (at ``lam`` for a conditional flow: default the middle of its range). Weights, action,
    training state and history are unchanged; ``meta["exported"]`` records the source, its sha256,
    the steps before and after, and the measured discrepancy.

    Args:
        src: the trained checkpoint (or a shipped name).
        dst: the new file; an existing file is replaced only with ``force``, and only if it is a
            flowmc checkpoint (:func:`check_output`).
        int_steps: integration steps of the copy (a continuous flow only; default: unchanged).
        lam: coupling of a conditional flow for the check.
        n_check: draws of the integration check.
        force: replace an existing flowmc checkpoint ``dst``.

    Returns:
        ``meta["exported"]`` of the copy.

    Raises:
        ValueError: if ``int_steps`` is given for a flow without continuous layers, or the flow
            fails the integration check (one line naming ``src``).
        FileExistsError: if ``dst`` may not be replaced.
    """
    src = resolve_model_path(src)
    ckpt = load_checkpoint(src)
    if Path(dst).resolve() == Path(src).resolve():
        raise ValueError(f"export_checkpoint: {dst} is the source itself; write a new file")
    model = load_model(src, int_steps=int_steps, lam=lam, dtype=torch.float32)
    before = None  # load_model refused int_steps for a flow without continuous layers
    found = check_integration(model.proposal, str(src), n=n_check)
    if model.flow.continuous_layers:
        before = int(ckpt["flow_config"].get("extra", {}).get("int_steps", 0)) or None
    if int_steps is not None:
        ckpt["flow_config"].setdefault("extra", {})["int_steps"] = int(int_steps)
    digest = hashlib.sha256(Path(src).read_bytes()).hexdigest()
    exported = {
        "source": str(src),
        "source_sha256": digest,
        "int_steps_before": before,
        "int_steps": model.int_steps,
        "discrepancy_sd": [float(d.sd) for d in found],
        "discrepancy_max": [float(d.max) for d in found],
        "check_draws": int(n_check),
        "exported": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    ckpt["meta"] = {**ckpt.get("meta", {}), "exported": exported}
    with claim_output(dst, force=force):
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        durable.write_atomically(str(dst), buf.getbuffer())
    return exported
