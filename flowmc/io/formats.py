"""The format identifiers that flowmc writes into its files and checks when it reads them.

A module of constants only, imported by the writers and readers (:mod:`flowmc.io.ensemble`,
:mod:`flowmc.io.checkpoint`) and by :func:`flowmc.io.safeio.sniff`, which tells the kinds of
file apart before one is replaced.
"""

from __future__ import annotations

__all__ = [
    "ENSEMBLE_FORMAT",
    "ENSEMBLE_SCHEMA_VERSION",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
]

#: The root attribute ``format`` of an ensemble file (HDF5).
ENSEMBLE_FORMAT = "flowmc-ensemble"
#: The newest ensemble schema this flowmc writes and reads (root attribute ``schema_version``).
ENSEMBLE_SCHEMA_VERSION = 1
#: The first entry (``"format"``) of a flow checkpoint's dict.
CHECKPOINT_FORMAT = "flowmc-checkpoint"
#: The newest checkpoint format this flowmc writes and reads (``"format_version"``).
CHECKPOINT_FORMAT_VERSION = 1
