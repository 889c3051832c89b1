import sys

from gemjax.hostmem import reexec_with_huge_pages

reexec_with_huge_pages()   # before jax is imported (gemjax/hostmem.py)

from gemjax.train.loop import main  # noqa: E402

sys.exit(main())
