"""Entry point: python train.py configs/nano.yaml [section.key=value ...]."""

import sys

from gemjax.train.loop import main

if __name__ == '__main__':
  sys.exit(main())
