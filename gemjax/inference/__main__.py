"""python -m gemjax.inference: the generate CLI (gemjax/inference/cli.py)."""

import sys

from gemjax.inference.cli import main

sys.exit(main())
