"""`python -m steptrain` (and `torchrun -m steptrain`) run the CLI."""

import sys

from steptrain.cli import main

sys.exit(main())
