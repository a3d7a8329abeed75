"""``torchrun --nproc_per_node N -m moshi_ttt.train CONFIG.yaml``: torchrun starts a module, and this
one is ``moshi-ttt train`` (the one entry point, ``moshi_ttt.cli``, parses and runs it)."""

import sys

from moshi_ttt.cli import main

raise SystemExit(main(["train", *sys.argv[1:]]))
