"""`python -m dwm ...` (and `torchrun ... -m dwm train ...`): the `dwm` command."""

import sys

from dwm.cli import main

if __name__ == "__main__":
    sys.exit(main())
