"""``python -m msn.export`` (same as the ``msn-export`` console script)."""

import sys

from msn.export.cli import main

sys.exit(main())
