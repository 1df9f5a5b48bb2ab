"""`python -m medsim`: the medsim command (a wheel install can migrate with `python -m medsim migrate`)."""

import sys

from medsim.cli import main

sys.exit(main())
