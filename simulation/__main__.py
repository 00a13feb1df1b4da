"""``python -m simulation``: the Python entry (:func:`flwr_gkt.app.__main__.main`)."""

import sys

from flwr_gkt.app.__main__ import main

sys.exit(main())
