"""``python -m fastbroker``: the same as the ``fastbroker`` command."""

import sys

from fastbroker.cli import main

sys.exit(main())
