"""Subcommands of the flowmc CLI; each module defines register(subparsers)."""
