"""`python -m geode` is the `geode` console script."""

import sys

from .cli import main

sys.exit(main())
