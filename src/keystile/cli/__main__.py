"""``python -m keystile.cli``: the ``keystile`` command."""

import sys

from keystile.cli import main

sys.exit(main())
