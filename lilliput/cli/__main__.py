"""`python -m lilliput.cli ...`: the same as the `lilliput` command."""

import sys

from lilliput.cli import main

sys.exit(main())
