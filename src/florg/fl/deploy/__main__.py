"""``python -m florg.fl.deploy``: see :func:`florg.fl.deploy.cli.main`."""

import sys

from .cli import main

sys.exit(main())
