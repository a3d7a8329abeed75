"""``torchrun --nproc_per_node N -m moshi_ttt.train CONFIG.yaml`` (or plain ``python -m``): the
``moshi-ttt train`` command, through the command line's entry point (which wires the periodic
evaluation in; this script is an entry point, imported by nothing)."""

import sys

from ..cli import main

raise SystemExit(main(["train", *sys.argv[1:]]))
