"""`python -m cpcoord` runs the CLI."""

import sys

from cpcoord.cli import main

sys.exit(main())
