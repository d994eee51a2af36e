"""``flowmc train``: fit a flow to e^{-S} by reverse KL and write a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from flowmc import report
from flowmc.commands._common import (
    RESUME_FORCE,
    action_from_args,
    add_action_options,
    check_distributed_options,
)
from flowmc.config import (
    add_common_options,
    apply_threads,
    given,
    int_list,
    refuse_unused,
    resolve_device,
    resolve_dtype,
    resolved,
)
from flowmc.flows.flow import CNF_SETTINGS
from flowmc.io.checkpoint import load_checkpoint
from flowmc.io.identity import check_condition, check_identity, checkpoint_identity
from flowmc.io.shipped import resolve_model_path
from flowmc.lattice.action import Phi4Action
from flowmc.training.recipes import RECIPES
from flowmc.training.workflow import train_flow, train_staged


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a flow by reverse KL",
        description="Train a coupling flow for lattice phi^4 by reverse KL; writes a checkpoint "
        "with the model, optimizer and RNG states, history and the resolved config.",
    )
    add_common_options(p)
    add_action_options(p)
    p.add_argument("--out", type=Path, required=False, default=None, help="checkpoint to write")
    p.add_argument("--recipe", default="default", choices=sorted(RECIPES),
                   help="base recipe (default: default; with --init-from, the ancestor's)")
    g = p.add_argument_group("flow (overrides the recipe)")
    g.add_argument("--layers", type=int, default=None, help="number of coupling layers")
    g.add_argument("--hidden", type=int_list, default=None, help="hidden channels, e.g. 8,8")
    g.add_argument("--kernel", type=int, default=None, help="odd conv kernel size")
    g.add_argument("--activation", default=None, help="leaky_relu, tanh, gelu, silu, relu")
    g.add_argument("--coupling", default=None,
                   help="layer family: affine or spline (coupling layers), cnf (an equivariant "
                   "continuous flow; the cnf recipe)")
    g.add_argument("--prior-sigma", type=float, default=None, help="prior standard deviation")
    g.add_argument("--bins", type=int, default=None, help="spline bins (coupling spline)")
    g.add_argument("--spline-bound", type=float, default=None,
                   help="spline interval [-B, B]; identity outside (coupling spline)")
    g.add_argument("--momentum", action=argparse.BooleanOptionalAction, default=None,
                   help="a momentum-space scaling layer first (learned sigma(k) per momentum "
                   "orbit; docs/recipes.md)")
    g.add_argument("--zero-mode-bins", type=int, default=None,
                   help="bins of an odd spline of the magnetisation (0: none)")
    g.add_argument("--int-steps", type=int, default=None,
                   help="integration steps of a continuous flow (coupling cnf)")
    g.add_argument("--integrator", default=None,
                   help="integrator of a continuous flow: rk4, rk38, midpoint or euler")
    g.add_argument("--cnf-freq", type=int, default=None,
                   help="site-feature frequencies of a continuous flow")
    g.add_argument("--cnf-channels", type=int, default=None,
                   help="feature channels of a continuous flow")
    g.add_argument("--cnf-time", type=int, default=None,
                   help="Fourier modes of a continuous flow's time dependence (odd)")
    g.add_argument("--penalty", type=float, default=None,
                   help="weight of a continuous flow's integration-error penalty in training")
    g.add_argument("--equivariant", action=argparse.BooleanOptionalAction, default=None,
                   help="Z2-equivariant couplings")
    g.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="train and sample the Z2-symmetrised density q_s = [q(phi)+q(-phi)]/2. "
                   "Default: train q, then sample q_s if the trained flow's draws are "
                   "sign-imbalanced (it misses a mode) for a Z2-symmetric action; see "
                   "docs/broken-phase.md")
    t = p.add_argument_group("training (overrides the recipe)")
    t.add_argument("--steps", type=int, default=None, help="total optimizer steps")
    t.add_argument("--batch", type=int, default=None,
                   help="batch size (the global batch, split across ranks under torchrun)")
    t.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    t.add_argument("--schedule", choices=["constant", "cosine"], default=None)
    t.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (0: off)")
    t.add_argument("--estimator", choices=["reparam", "path"], default=None)
    p.add_argument("--resume", action="store_true", help="continue training from --out")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from this checkpoint's architecture and weights, on --L (may differ "
                   "from its lattice: transfer L -> 2L); --m2/--lam default to its action's")
    p.add_argument("--force", action="store_true",
                   help="replace an existing flowmc checkpoint --out (nothing else)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--plot", type=Path, default=None,
                   help="training-curve PNG (default: OUT with suffix .train.png, e.g. "
                   "model.pt -> model.train.png); replaces only an earlier training curve")
    p.add_argument("--dist-timeout", type=float, default=600.0,
                   help="under torchrun: seconds a rank waits for the others before failing")
    p.set_defaults(func=run)


def _parse_hidden(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        return tuple(int(h) for h in text)
    try:
        return tuple(int(h) for h in str(text).split(",") if h.strip())
    except ValueError:
        raise ValueError(f"Expected --hidden as comma-separated integers; got {text!r}") from None


#: architecture flags (dest -> flag), which --init-from excludes
_ARCH_FLAGS = {
    "layers": "--layers", "hidden": "--hidden", "kernel": "--kernel", "activation": "--activation",
    "coupling": "--coupling", "prior_sigma": "--prior-sigma", "bins": "--bins",
    "spline_bound": "--spline-bound", "equivariant": "--equivariant", "momentum": "--momentum",
    "zero_mode_bins": "--zero-mode-bins", "int_steps": "--int-steps",
    "integrator": "--integrator", "cnf_freq": "--cnf-freq", "cnf_channels": "--cnf-channels",
    "cnf_time": "--cnf-time", "penalty": "--penalty",
}  # fmt: skip


#: architecture flags (dest) -> FlowConfig field (``extra.KEY`` for coupling settings)
_ARCH_FIELDS = {
    "layers": "n_layers", "hidden": "hidden", "kernel": "kernel_size",
    "activation": "activation", "coupling": "coupling", "prior_sigma": "prior_sigma",
    "equivariant": "equivariant", "momentum": "momentum", "zero_mode_bins": "zero_mode_bins",
    "bins": "extra.n_bins", "spline_bound": "extra.spline_bound", "int_steps": "extra.int_steps",
    "integrator": "extra.integrator", "cnf_freq": "extra.n_freq",
    "cnf_channels": "extra.n_channels", "cnf_time": "extra.n_time", "penalty": "extra.penalty",
}  # fmt: skip
#: defaults of the coupling settings in ``FlowConfig.extra`` (a checkpoint may omit them)
_EXTRA_DEFAULTS = {"n_bins": 8, "spline_bound": 4.0, **CNF_SETTINGS}


def check_modes(args: argparse.Namespace) -> None:
    """Refuse architecture options the chosen layer family does not use (a new flow; with
    --init-from or --resume the architecture is the checkpoint's, checked elsewhere)."""
    check_distributed_options(args)
    if args.resume:
        refuse_unused(args, ["--force"], RESUME_FORCE)
    if args.init_from is not None or args.resume:
        return
    coupling = args.coupling or RECIPES[args.recipe]["flow"].get("coupling", "affine")
    if coupling != "spline":
        refuse_unused(args, ["--bins", "--spline-bound"], "needs --coupling spline")
    if coupling != "cnf":
        refuse_unused(args, ["--int-steps", "--integrator", "--cnf-freq", "--cnf-channels",
                             "--cnf-time", "--penalty"], "needs --coupling cnf (a continuous "
                      "flow)")  # fmt: skip
    else:
        refuse_unused(args, ["--hidden", "--kernel", "--activation", "--equivariant"],
                      "does not apply to a continuous flow (coupling cnf; it is Z2-equivariant "
                      "and has no convolutional conditioners)")


def check_resume(args: argparse.Namespace) -> None:
    """``--resume`` continues the checkpoint's own training: every action, seed, recipe, dtype
    or architecture option the user gave must be what the checkpoint holds."""
    ckpt = load_checkpoint(args.out)
    stored = checkpoint_identity(ckpt)
    stored["flow_config"]["extra"] = {**_EXTRA_DEFAULTS, **stored["flow_config"].get("extra", {})}
    want: dict = {}
    act: dict = {}
    if given(args, "L") and args.L is not None:
        act["lattice_shape"] = [int(args.L)] * int(args.dim)
    if args.kappa is not None or args.lam_h is not None:
        hop = action_from_args(argparse.Namespace(**{
            **vars(args), "L": args.L or 2, "m2": None, "lam": None}))  # fmt: skip
        act.update(m2=hop.m2, lam=hop.lam)
    else:
        if given(args, "m2") and args.m2 is not None:
            act["m2"] = float(args.m2)
        if given(args, "lam") and isinstance(args.lam, tuple):
            want["condition"] = [float(v) for v in args.lam]
        elif given(args, "lam") and args.lam is not None:
            act["lam"] = float(args.lam)
    if act:
        want["action"] = act
    for dest in ("seed", "recipe", "dtype"):
        if given(args, dest):
            want[dest] = getattr(args, dest)
    flow: dict = {}
    for dest, name in _ARCH_FIELDS.items():
        if given(args, dest) and getattr(args, dest) is not None:
            value = getattr(args, dest)
            value = list(_parse_hidden(value)) if dest == "hidden" else value
            if name.startswith("extra."):
                flow.setdefault("extra", {})[name[6:]] = value
            else:
                flow[name] = value
    if flow:
        want["flow_config"] = flow
    check_identity(args.out, stored, want, partial=("action", "flow_config", "flow_config.extra"),
                   hint="--resume continues the training stored there: drop the option, or "
                   "train a new --out")  # fmt: skip


def _action(args: argparse.Namespace) -> Phi4Action | None:
    """The target action; with --init-from and no couplings given, the ancestor's at --L."""
    if args.resume:
        return None
    if isinstance(args.lam, tuple):  # a flow conditioned on lam: the action at the midpoint
        lo, hi = args.lam
        return action_from_args(argparse.Namespace(**{**vars(args), "lam": 0.5 * (lo + hi)}))
    hopping = args.kappa is not None or args.lam_h is not None
    if args.init_from is None or hopping or (args.m2 is not None and args.lam is not None):
        return action_from_args(args)
    if args.L is None:
        raise ValueError("--L is required (lattice extent of the new flow)")
    old = Phi4Action.from_params(load_checkpoint(args.init_from)["action"])
    # a coupling not given is the ancestor's (e.g. --init-from L16.pt --L 32 --lam 4.572)
    m2 = old.m2 if args.m2 is None else args.m2
    lam = old.lam if args.lam is None else args.lam
    return action_from_args(argparse.Namespace(**{**vars(args), "m2": m2, "lam": lam}))


def _ancestor_recipe(ckpt: dict) -> str | None:
    """The recipe that trained an ``--init-from`` checkpoint (``None`` if it is not a known
    one): a continued training takes its training hyper-parameters unless ``--recipe`` says
    otherwise (a continuous flow would otherwise get the coupling recipes' batch of 256)."""
    recipe = (ckpt.get("meta") or {}).get("recipe")
    return recipe if recipe in RECIPES else None


def _staged_args(args: argparse.Namespace) -> argparse.Namespace:
    """``--resume`` of a staged pipeline whose final checkpoint does not exist yet: the action
    options are needed again (a range ``--lam LO:HI`` stands for its midpoint)."""
    if isinstance(args.lam, tuple):
        return argparse.Namespace(**{**vars(args), "lam": 0.5 * sum(args.lam)})
    return args


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    check_modes(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype)
    if args.out is None:
        raise ValueError("--out is required (checkpoint path to write)")
    if args.resume and args.init_from is not None:
        raise ValueError("give either --resume or --init-from, not both")
    if args.init_from is not None:  # a path, or a shipped flow's name (as sample and eval)
        args.init_from = resolve_model_path(args.init_from)
        ancestor = load_checkpoint(args.init_from)
        check_condition(args.init_from, ancestor, args.lam if given(args, "lam") else None)
        if not given(args, "recipe"):  # the training hyper-parameters of the ancestor's recipe
            args.recipe = _ancestor_recipe(ancestor) or args.recipe
    if args.resume and Path(args.out).exists():
        check_resume(args)
    # the training curve may replace only an earlier training curve, never the checkpoint or
    # the --init-from ancestor; checked before training starts
    plot_path = Path(args.plot) if args.plot else report.default_train_plot_path(args.out)
    report.check_outputs([(plot_path, "png", "train-history")],
                         inputs=[args.out, args.init_from])
    arch = [flag for dest, flag in _ARCH_FLAGS.items() if getattr(args, dest) is not None]
    if args.init_from is not None and arch:
        raise ValueError(f"the architecture comes from --init-from; drop {', '.join(arch)}")
    extra = {
        "n_bins": args.bins, "spline_bound": args.spline_bound, "int_steps": args.int_steps,
        "integrator": args.integrator, "n_freq": args.cnf_freq, "n_channels": args.cnf_channels,
        "n_time": args.cnf_time, "penalty": args.penalty,
    }
    flow_overrides = {
        "n_layers": args.layers,
        "hidden": _parse_hidden(args.hidden),
        "kernel_size": args.kernel,
        "activation": args.activation,
        "coupling": args.coupling,
        "equivariant": args.equivariant,
        "momentum": args.momentum,
        "zero_mode_bins": args.zero_mode_bins,
        "prior_sigma": args.prior_sigma,
        "extra": {k: v for k, v in extra.items() if v is not None} or None,
        "condition": ({"lam": list(args.lam)}  # with --init-from: its own (checked above)
                      if isinstance(args.lam, tuple) and args.init_from is None else None),
    }
    common = {
        "train_overrides": {  # training hyper-parameters given on the command line (None: keep)
            "n_steps": args.steps,
            "batch_size": args.batch,
            "lr": args.lr,
            "schedule": args.schedule,
            "grad_clip": args.grad_clip,
            "estimator": args.estimator,
        },
        "symmetric": args.symmetric,
        "seed": args.seed,
        "device": device,
        # a resumed training keeps the checkpoint's dtype unless --dtype is given (and equal)
        "dtype": None if args.resume and not given(args, "dtype") else dtype,
        "out": args.out,
        "resume": args.resume,
        "force": args.force,
        "checkpoint_every": args.checkpoint_every,
        "progress": not args.quiet,
        "record": resolved(args),
        "timeout_s": args.dist_timeout,
    }
    if args.init_from is not None or (args.resume and Path(args.out).exists()):
        # one stage: from an ancestor, or continuing this checkpoint (a resumed run keeps its
        # stored flow; its training hyper-parameters may change)
        res = train_flow(_action(args), recipe=args.recipe, init_from=args.init_from,
                         flow_overrides=None if args.resume else flow_overrides, **common)
    else:  # the recipe's stages for this lattice (beyond extent 8: train small, then transfer)
        action = _action(args) if not args.resume else action_from_args(_staged_args(args))
        res = train_staged(action, recipe=args.recipe, flow_overrides=flow_overrides, **common)
    if res.rank != 0:  # rank 0 alone writes plots and reports
        return 0
    trainer, h = res.trainer, res.history
    tail = slice(-100, None)
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    if h["loss"]:
        report.plot_training_history(h, plot_path, title=f"{res.action!r}",
                                     inputs=[args.out, args.init_from])
    lines = [
        f"trained {trainer.step_count} steps in {res.wall_time_s:.1f} s "
        f"(training time {trainer.elapsed:.1f} s)",
        f"  last-100 mean: F_q = {mean(h['loss'][tail]):.4f} (>= -log Z), "
        f"batch ESS = {mean(h['ess'][tail]):.3f}; skipped non-finite steps: "
        f"{trainer.skipped_steps}",
        f"  proposal: {'Z2-symmetrised q_s' if res.symmetric else 'q'}"
        f"{' (auto: the flow is sign-imbalanced)' if res.auto_symmetrised else ''}",
    ]
    if res.world_size > 1:
        lines.append(
            f"  ranks: {res.world_size}, global batch {trainer.config.batch_size} = "
            f"{res.world_size} x {trainer.local_batch_size}"
        )
    if res.training_time_total_s > res.training_time_s:
        lines.append(f"  training time incl. --init-from stages: {res.training_time_total_s:.1f} s")
    lines += [f"  checkpoint: {args.out}", f"  curve: {plot_path}"]
    print("\n".join(lines))
    return 0
