"""`python -m smartspec.cli ...`: how `smartspec up` and the tests start each part."""

import sys

from smartspec.cli import main

sys.exit(main())
