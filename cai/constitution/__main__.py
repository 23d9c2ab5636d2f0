"""``python -m cai.constitution validate FILE...`` / ``import SRC ...``: the ``cai constitution`` command."""

import sys

from cai.constitution.importer import main

sys.exit(main())
