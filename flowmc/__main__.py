"""``python -m flowmc ...`` runs the ``flowmc`` command."""

import sys

from flowmc.cli import main

sys.exit(main())
