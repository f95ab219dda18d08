"""``python -m trio_bg``: see ``python -m trio_bg --help``."""

import sys

from ._cli import main

sys.exit(main())
