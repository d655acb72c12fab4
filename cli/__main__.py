"""``python -m cli``: see ``cli.batch``."""

import sys

from cli.batch import main

sys.exit(main())
