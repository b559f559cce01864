"""`python -m geode.train RECIPE [options]` (also under torchrun) is `geode train RECIPE`."""

import sys

from ..cli import main

sys.exit(main(["train", *sys.argv[1:]]))
