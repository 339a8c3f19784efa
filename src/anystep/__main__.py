"""``python -m anystep`` (and ``torchrun --nproc_per_node=N -m anystep train ...``)."""

import sys

from anystep.cli import main

sys.exit(main())
