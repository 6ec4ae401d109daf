"""``python -m fastdino.train`` and ``torchrun ... -m fastdino.train``."""

import sys

from .cli import main

sys.exit(main())
