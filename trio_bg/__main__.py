"""``python -m trio_bg``: see ``python -m trio_bg --help``."""

import sys

from ._cli.main import main

sys.exit(main())
