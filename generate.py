"""Entry point: python generate.py CONFIG_OR_CHECKPOINT --prompt "..." [--image PATH] ..."""

import sys

from gemjax.inference.cli import main

if __name__ == '__main__':
  sys.exit(main())
