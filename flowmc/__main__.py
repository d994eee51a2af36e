"""``python -m flowmc ...`` runs the ``flowmc`` command (also under ``torchrun -m flowmc``)."""

import sys

from flowmc.cli import main

if __name__ == "__main__":
    sys.exit(main())
