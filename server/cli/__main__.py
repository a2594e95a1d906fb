"""``python -m chainrule.server.cli``: the ``chainrule`` command without its console script."""
import sys

from . import main

sys.exit(main())
