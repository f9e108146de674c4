"""`python -m scanner.cli`: the `memscan` command."""

import sys

from . import main

sys.exit(main())
