"""``python -m moshi_ttt COMMAND ...``: the same as ``moshi-ttt COMMAND ...``."""

import sys

from moshi_ttt.cli import main

raise SystemExit(main(sys.argv[1:]))
