"""Entry point: python train.py configs/nano.yaml [section.key=value ...]."""

import sys

if __name__ == '__main__':
  # Before jax is imported: huge pages for XLA's per-step buffers (gemjax/hostmem.py).
  from gemjax.hostmem import reexec_with_huge_pages
  reexec_with_huge_pages()

from gemjax.train.loop import main  # noqa: E402

if __name__ == '__main__':
  sys.exit(main())
