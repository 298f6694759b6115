"""``python -m blockfp8 ...`` (and ``torchrun -m blockfp8 tp-demo ...``): the ``blockfp8`` command line."""

import sys

from .cli import main

sys.exit(main())
