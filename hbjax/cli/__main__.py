"""``python -m hbjax.cli``: the ``hbjax`` command."""

import sys

from . import main

sys.exit(main())
