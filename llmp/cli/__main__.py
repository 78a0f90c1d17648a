"""``python -m llmp.cli``: the ``llmp`` command."""

import sys

from llmp.cli import main

sys.exit(main())
