"""``python -m clbench.cli ...``, the same as ``clbench ...``."""

import sys

from clbench.cli import main

sys.exit(main())
