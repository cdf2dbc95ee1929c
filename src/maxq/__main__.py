"""``python -m maxq ...`` (and ``torchrun ... -m maxq train``)."""

import sys

from .cli import main

sys.exit(main())
