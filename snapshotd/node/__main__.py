"""``python -m snapshotd.node serve ...``: run the daemon without the tools package."""

import sys

from snapshotd.node.cli import main

sys.exit(main())
