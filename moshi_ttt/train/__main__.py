"""``torchrun --nproc_per_node N -m moshi_ttt.train CONFIG.yaml``: torchrun starts a module; this one hands
the process over to ``python -m moshi_ttt train CONFIG.yaml`` (same PID, flags, environment and streams).

``moshi-ttt train`` is composed above this package: the evaluation layer gives it its periodic evaluation
(``data.eval``), and the command line its one-line errors and exit codes. The training package imports
nothing from those layers, so its module entry point runs the composed command instead of importing it.
"""

import os
import sys

flags = sys.orig_argv[1:sys.orig_argv.index("-m")] if "-m" in sys.orig_argv else []  # e.g. torchrun's -u
os.execv(sys.executable, [sys.executable, *flags, "-m", "moshi_ttt", "train", *sys.argv[1:]])
