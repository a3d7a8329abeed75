"""``torchrun --nproc_per_node N -m moshi_ttt.train CONFIG.yaml`` (or plain ``python -m``)."""

from .commands import main

raise SystemExit(main())
