"""``flowmc train``: fit a flow to e^{-S} by reverse KL and write a checkpoint."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from flowmc import report
from flowmc.action import Phi4Action
from flowmc.checkpoint import load_checkpoint, machine_info, save_checkpoint
from flowmc.commands._common import action_from_args, add_action_options, make_generator
from flowmc.config import (
    add_common_options,
    apply_threads,
    resolve_device,
    resolve_dtype,
    resolved,
)
from flowmc.evaluate import needs_symmetrisation
from flowmc.flow import FlowConfig, build_flow
from flowmc.recipes import RECIPES, get_recipe, override
from flowmc.train import TrainConfig, Trainer


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
    p.add_argument("--recipe", default="default", choices=sorted(RECIPES), help="base recipe")
    g = p.add_argument_group("flow (overrides the recipe)")
    g.add_argument("--layers", type=int, default=None, help="number of coupling layers")
    g.add_argument("--hidden", type=str, default=None, help="hidden channels, e.g. 8,8")
    g.add_argument("--kernel", type=int, default=None, help="odd conv kernel size")
    g.add_argument("--activation", default=None, help="leaky_relu, tanh, gelu, silu, relu")
    g.add_argument("--coupling", default=None, help="coupling type: affine or spline")
    g.add_argument("--prior-sigma", type=float, default=None, help="prior standard deviation")
    g.add_argument("--bins", type=int, default=None, help="spline bins (coupling spline)")
    g.add_argument("--spline-bound", type=float, default=None,
                   help="spline interval [-B, B]; identity outside (coupling spline)")
    g.add_argument("--equivariant", action=argparse.BooleanOptionalAction, default=None,
                   help="Z2-equivariant couplings")
    g.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="train and sample the Z2-symmetrised density q_s = [q(phi)+q(-phi)]/2. "
                   "Default: train q, then sample q_s if the trained flow's draws are "
                   "sign-imbalanced (it misses a mode) for a Z2-symmetric action; see "
                   "docs/broken-phase.md")
    t = p.add_argument_group("training (overrides the recipe)")
    t.add_argument("--steps", type=int, default=None, help="total optimizer steps")
    t.add_argument("--batch", type=int, default=None, help="batch size")
    t.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    t.add_argument("--schedule", choices=["constant", "cosine"], default=None)
    t.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (0: off)")
    t.add_argument("--estimator", choices=["reparam", "path"], default=None)
    p.add_argument("--resume", action="store_true", help="continue training from --out")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--plot", type=Path, default=None,
                   help="training-curve PNG (default: OUT with suffix .train.png, e.g. "
                   "model.pt -> model.train.png); replaces only an earlier training curve")
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


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype)
    if args.out is None:
        raise ValueError("--out is required (checkpoint path to write)")
    out = Path(args.out)
    # the training curve may replace only an earlier training curve, never the checkpoint
    plot_path = Path(args.plot) if args.plot else report.default_train_plot_path(out)
    report.check_outputs([(plot_path, "png", "train-history")], inputs=[out])
    gen = make_generator(args.seed, device)
    hyper = {  # training hyper-parameters given on the command line (None: keep)
        "n_steps": args.steps,
        "batch_size": args.batch,
        "lr": args.lr,
        "schedule": args.schedule,
        "grad_clip": args.grad_clip,
        "estimator": args.estimator,
    }
    if args.resume:
        ckpt = load_checkpoint(out)
        action = Phi4Action.from_params(ckpt["action"])
        flow_cfg = FlowConfig.from_dict(ckpt["flow_config"])
        train_cfg = TrainConfig.from_dict(ckpt["train_config"])
        # a resumed run may change the training hyper-parameters (e.g. a second phase with the
        # path-gradient estimator or a larger batch); the flow and the action stay as stored
        train_cfg = override(train_cfg, **hyper)
        symmetric = bool(ckpt.get("symmetric", False))
        flow = build_flow(flow_cfg)
        flow.load_state_dict(ckpt["model_state"])
        flow.to(device=device, dtype=dtype)
        trainer = Trainer(flow, action, train_cfg, generator=gen)
        trainer.load_state_dict(ckpt["trainer_state"])
        config_record = {**ckpt.get("resolved_config", {}), "resumed_with": resolved(args)}
        print(f"resuming {out} at step {trainer.step_count} -> {train_cfg.n_steps}",
              file=sys.stderr)
    else:
        if out.exists() and not args.force:
            raise FileExistsError(f"{out} exists; use --force to overwrite or --resume to continue")
        action = action_from_args(args)
        flow_cfg, train_cfg = get_recipe(args.recipe, action.lattice_shape)
        flow_cfg = override(
            flow_cfg,
            n_layers=args.layers,
            hidden=_parse_hidden(args.hidden),
            kernel_size=args.kernel,
            activation=args.activation,
            coupling=args.coupling,
            equivariant=args.equivariant,
            prior_sigma=args.prior_sigma,
        )
        extra = dict(flow_cfg.extra)
        if args.bins is not None:
            extra["n_bins"] = args.bins
        if args.spline_bound is not None:
            extra["spline_bound"] = args.spline_bound
        flow_cfg = override(flow_cfg, extra=extra)
        symmetric = bool(args.symmetric)  # training objective; None (auto) trains plain q
        train_cfg = override(train_cfg, symmetric=symmetric, **hyper)
        torch.manual_seed(args.seed)  # parameter initialisation
        flow = build_flow(flow_cfg).to(device=device, dtype=dtype)
        trainer = Trainer(flow, action, train_cfg, generator=gen)
        config_record = resolved(args)
    t_start = time.perf_counter()

    sample_symmetric = train_cfg.symmetric

    def save(tr: Trainer) -> None:
        save_checkpoint(
            out,
            tr.flow,
            action,
            symmetric=sample_symmetric,
            train_config=train_cfg.to_dict(),
            trainer_state=tr.state_dict(),
            resolved_config=config_record,
            meta={
                "training_time_s": tr.elapsed,
                "machine": machine_info(),
                "dtype": args.dtype,
                "device": str(device),
                "recipe": getattr(args, "recipe", None),
            },
        )

    trainer.run(progress=not args.quiet, callback=save, callback_every=args.checkpoint_every)
    auto = args.symmetric is None and not (args.resume and sample_symmetric)
    if auto:
        flow.eval()
        sample_symmetric = sample_symmetric or needs_symmetrisation(
            flow, action, generator=make_generator(args.seed + 1, device)
        )
        flow.train()
    save(trainer)
    h = trainer.history
    tail = slice(-100, None)
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    if h["loss"]:
        report.plot_training_history(h, plot_path, title=f"{action!r}", inputs=[out])
    print(
        f"trained {trainer.step_count} steps in {time.perf_counter() - t_start:.1f} s "
        f"(training time {trainer.elapsed:.1f} s)\n"
        f"  last-100 mean: F_q = {mean(h['loss'][tail]):.4f} (>= -log Z), "
        f"batch ESS = {mean(h['ess'][tail]):.3f}; skipped non-finite steps: "
        f"{trainer.skipped_steps}\n"
        f"  proposal: {'Z2-symmetrised q_s' if sample_symmetric else 'q'}"
        f"{' (auto: the flow is sign-imbalanced)' if auto and sample_symmetric else ''}\n"
        f"  checkpoint: {out}\n  curve: {plot_path}"
    )
    return 0
