"""``moshi-ttt bench {model,op,generate}``: benchmarks that compare against stock Moshi in one run."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from . import model

    p = sub.add_parser("bench", help="speed and memory, moshi-ttt vs stock moshi (ratios)",
                       description="Benchmarks measured in one process, printed as ratios. On CPU they run "
                       "the tiny preset; with CUDA the 7B width.")
    bsub = p.add_subparsers(dest="bench", metavar="WHAT", required=True)
    pm = bsub.add_parser("model", help="whole model: training fwd+bwd, peak memory, LMGen.step",
                         description=model.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model.add_arguments(pm)
    pm.set_defaults(func=model.main_args)
    from . import generate

    pg = bsub.add_parser("generate", help="streaming generation over a long input: memory use, real-time factor",
                         description=generate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    generate.add_arguments(pg)
    pg.set_defaults(func=generate.main_args)
    try:
        from . import op
    except ImportError:  # the op benchmark lands with the kernels
        return
    if hasattr(op, "add_arguments") and hasattr(op, "main_args"):
        po = bsub.add_parser("op", help="TTT operator: reference vs kernel, time and memory",
                             description=op.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        op.add_arguments(po)
        po.set_defaults(func=op.main_args)
