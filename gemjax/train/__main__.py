import sys

from gemjax.train.loop import main

sys.exit(main())
