"""``python -m regnde``: the ``regnde`` command."""

import sys

from regnde.cli import main

sys.exit(main())
