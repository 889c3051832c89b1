"""Entry point: python eval.py [CONFIG.yaml] [section.key=value ...]."""

import sys

from gemjax.eval.run import main

if __name__ == '__main__':
  sys.exit(main())
