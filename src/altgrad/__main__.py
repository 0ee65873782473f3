"""``python -m altgrad ...`` runs the ``altgrad`` command (as torchrun's ``-m altgrad`` needs)."""

import sys

from altgrad.cli import main

sys.exit(main())
