"""``python -m cssfs`` runs the command-line interface."""

import sys

from cssfs.cli import main

sys.exit(main())
