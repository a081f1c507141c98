"""``python -m snapshotd_tools ...``: the ``snapshotd`` command."""

import sys

from snapshotd_tools.cli import main

sys.exit(main())
