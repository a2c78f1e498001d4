"""``python -m facetron.cli``: the same as the ``facetron`` command."""

import sys

from facetron.cli.main import main

sys.exit(main())
