"""`python -m loralab.cli`: the `loralab` command."""

import sys

from loralab.cli import main

sys.exit(main())
