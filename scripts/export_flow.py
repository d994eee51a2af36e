#!/usr/bin/env python
"""Copy a trained checkpoint for use, e.g. into ``data/`` to ship it, with the integration steps
a continuous flow samples with (:func:`flowmc.io.checkpoint.export_checkpoint`).

The copy is written only if the flow passes ``flowmc sample``'s integration check at those steps.

Example:
    python scripts/export_flow.py runs/L32.pt data/phi4_L32_m2-4_lam4.572.pt --int-steps 40
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from flowmc.io.checkpoint import export_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("src", help="trained checkpoint (or shipped name)")
    p.add_argument("dst", help="the copy to write")
    p.add_argument("--int-steps", type=int, default=None,
                   help="integration steps the copy samples with (continuous flows)")
    p.add_argument("--lam", type=float, default=None, help="coupling of a conditional flow's check")
    p.add_argument("--n-check", type=int, default=256, help="draws of the integration check")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true", help="replace an existing flowmc checkpoint")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        info = export_checkpoint(args.src, args.dst, int_steps=args.int_steps, lam=args.lam,
                                 n_check=args.n_check, force=args.force)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
