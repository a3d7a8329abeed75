"""Whole-model benchmark: stock moshi vs moshi-ttt, measured side by side in one process.

For the same config, input length and batch:
* training forward+backward time (all parameters trainable, as moshi-finetune's full fine-tune)
  and peak memory, and training tokens/s, on two paths: moshi's full-sequence forward (what
  moshi-finetune runs on stock moshi) and the path moshi-ttt's trainer runs (the T frames as one
  training span in chunks of ``chunk_frames`` through ``ChunkedLM``, streaming state carried; its
  stock arm is moshi with the chunk-capable attention cache and no TTT, trained the same way);
* ``LMGen.step`` latency at the given batch sizes.
On CPU the two arms are measured in alternation, step by step (both models in memory), so that
the load of a shared machine weighs on both alike; on a GPU one after the other.
Results are printed as a table with ratios (TTT / stock) and written as JSON. On CPU the tiny
preset runs (seconds); with CUDA the 7B config runs at bf16 with random weights. Absolute times
only mean something on the GPU named in the output.

    python -m moshi_ttt.bench.model            # or: moshi-ttt bench model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..model.build import build_lm, moshi_7b_lm_kwargs, tiny_lm_kwargs
from ..model.chunked import ChunkedLM
from ..model.loss import WeightedSums, combine, lm_loss, weighted_sums
from ..model.presets import mid_lm_kwargs, moshi_7b_ttt_kwargs
from ..runtime import load_average, load_warning, machine_state
from ..ttt.config import TTTConfig
from .common import device_name


@dataclass
class ModelBenchConfig:
    preset: str = "auto"            # "tiny", "mid", "7b" or "auto" (7b with CUDA, tiny without)
    seq_len: int | None = None      # frames; default 3000 (7b) / 256 (tiny, mid)
    chunk_frames: int | None = None  # the trainer's chunks; default 750 (7b) / 64 (tiny, mid), as the configs
    batch: int = 1
    ttt_layers: Any = None          # None: the preset's default layout (PRESET_TTT)
    ttt_heads: int | None = None    # TTT heads / head dim; None: the preset's default
    ttt_head_dim: int | None = None
    mini_batch_size: int = 16
    train_iters: int = 5
    warmup: int = 2
    gen_batches: list[int] = field(default_factory=lambda: [1, 8])
    gen_steps: int = 50
    dtype: str = "auto"             # bf16 on CUDA, fp32 on CPU
    interleave: bool | None = None  # alternate the arms step by step; default: on CPU only
    skip_train: bool = False
    skip_gen: bool = False


# Default TTT layout per preset. 7B: the default of configs/moshi7b_finetune.yaml (8 of 32 layers,
# 8 heads of 128 = 1/4 of the width). mid: the same proportions (2 of 8 layers, every other layer
# of the top half, 2 heads of 128 = 1/4 of the width 1024). tiny: the tiny configs' layout.
PRESET_TTT: dict[str, dict[str, Any]] = {
    "7b": moshi_7b_ttt_kwargs(),
    "mid": {"layers": [5, 7], "num_heads": 2, "head_dim": 128},
    "tiny": {"layers": "middle"},
}
PRESET_LM = {"7b": moshi_7b_lm_kwargs, "mid": mid_lm_kwargs, "tiny": tiny_lm_kwargs}


class Timer:
    """Wall time on CPU, CUDA events on GPU. On CPU the process CPU time of each call is kept
    too (``cpu_times``): with one thread it does not count time spent waiting for a busy machine,
    so its ratios hold on a loaded machine where wall times do not."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.cpu_times: list[float] = []

    def __call__(self, fn) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b) / 1000.0
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        t1 = time.perf_counter()
        self.cpu_times.append(time.process_time() - c0)
        return t1 - t0


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _codes(model, B: int, T: int, device) -> torch.Tensor:
    text = torch.randint(0, model.text_card, (B, 1, T), device=device)
    audio = torch.randint(0, model.card, (B, model.num_codebooks - 1, T), device=device)
    return torch.cat([text, audio], 1)


def _train_step(model, cfg: ModelBenchConfig, T: int, device):
    """One training forward+backward of ``model`` on fixed random codes, as a closure."""
    model.train()
    codes = _codes(model, cfg.batch, T, device)

    def step():
        out = model(codes)
        lm_loss(out, codes).total.backward()
        model.zero_grad(set_to_none=True)

    return step


def _trainer_step(model, cfg: ModelBenchConfig, T: int, device):
    """One training forward+backward as ``Trainer.train_step`` runs it: the T frames as one span
    (``bptt_chunks`` = T / chunk) of ``chunk_frames`` chunks through ``ChunkedLM``, the streaming
    state carried from the previous step, the token-mean loss of the span. Returns the step as a
    closure and the function that ends the streaming session."""
    model.train()
    codes = _codes(model, cfg.batch, T, device)
    runner = ChunkedLM(model, cfg.batch)
    runner.start()
    C = cfg.chunk_frames

    def step():
        runner.cut()
        sums = []
        for c0 in range(0, T, C):
            w = weighted_sums(runner.step(codes[:, :, c0:c0 + C]).losses)
            sums.append(torch.stack([w.text_num, w.text_den, w.audio_num, w.audio_den]))
        combine(WeightedSums(*torch.stack(sums).sum(0))).total.backward()
        model.zero_grad(set_to_none=True)

    return step, runner.close


def _summary(times: list[float]) -> tuple[float, float]:
    """(median, p90) of a list of times."""
    return statistics.median(times), sorted(times)[int(0.9 * len(times))]


def bench_train(model, cfg: ModelBenchConfig, T: int, device, trainer_path: bool = False) -> dict[str, Any]:
    timer = Timer(device)
    step, close = _trainer_step(model, cfg, T, device) if trainer_path else (_train_step(model, cfg, T, device), None)
    for _ in range(cfg.warmup):
        step()
    _peak_reset(device)
    times = [timer(step) for _ in range(cfg.train_iters)]
    if close is not None:
        close()
    t = statistics.median(times)
    return {"fwd_bwd_s": t, "tokens_per_s": cfg.batch * T / t, "peak_gib": _peak_gib(device),
            "fwd_bwd_cpu_s": statistics.median(timer.cpu_times) if timer.cpu_times else None}


def _alternate(steps: dict[str, Any], cfg: ModelBenchConfig, timer: Timer) -> dict[str, list[float]]:
    """Warm up, then time the arms' steps in alternation (a changing load weighs on all alike)."""
    for _ in range(cfg.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {arm: [] for arm in steps}
    for _ in range(cfg.train_iters):
        for arm, step in steps.items():
            times[arm].append(timer(step))
    return times


def bench_gen(model, B: int, cfg: ModelBenchConfig, device) -> dict[str, Any]:
    from moshi.models import LMGen

    model.eval()
    gen = LMGen(model, temp=0.8, temp_text=0.7)
    n_user = model.num_codebooks - 1 - model.dep_q
    timer = Timer(device)
    with torch.no_grad(), gen.streaming(B):
        user = torch.randint(0, model.card, (B, n_user, 1), device=device)
        for _ in range(max(cfg.warmup, 4)):  # the first steps capture CUDA graphs
            gen.step(user)
        times = [timer(lambda: gen.step(user)) for _ in range(cfg.gen_steps)]
    cpu = timer.cpu_times[-len(times):]
    return {"step_ms": 1000 * statistics.median(times), "step_ms_p90": 1000 * sorted(times)[int(0.9 * len(times))],
            "step_cpu_ms": 1000 * statistics.median(cpu) if cpu else None}


def bench_interleaved(models: dict[str, Any], cfg: ModelBenchConfig, T: int, device,
                      chunked: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Both arms measured in alternation (stock step, TTT step, stock step, ...), so that a load
    that changes during the run (a shared machine) weighs on both arms alike. Needs both models in
    memory at once: the default on CPU, not at 7B on a GPU. ``chunked``: the models of the
    trainer's path (stock: chunk-capable, no TTT), timed the same way as ``train_chunked``."""
    from contextlib import ExitStack

    from moshi.models import LMGen

    timer = Timer(device)
    out: dict[str, dict[str, Any]] = {arm: {} for arm in models}
    if not cfg.skip_train:
        paths = [("train", {arm: _train_step(m, cfg, T, device) for arm, m in models.items()}, [])]
        if chunked is not None:
            made = {arm: _trainer_step(m, cfg, T, device) for arm, m in chunked.items()}
            paths.append(("train_chunked", {arm: s for arm, (s, _) in made.items()}, [c for _, c in made.values()]))
        for key, steps, closers in paths:
            times = _alternate(steps, cfg, timer)
            for close in closers:
                close()
            for arm in models:
                t = statistics.median(times[arm])
                out[arm][key] = {"fwd_bwd_s": t, "fwd_bwd_min_s": min(times[arm]),
                                 "tokens_per_s": cfg.batch * T / t, "peak_gib": None, "times_s": times[arm],
                                 "load_1min": load_average()}
    if not cfg.skip_gen:
        for arm in models:
            out[arm]["gen"] = {}
        for B in cfg.gen_batches:
            with torch.no_grad(), ExitStack() as stack:
                gens, users = {}, {}
                for arm, m in models.items():
                    m.eval()
                    gens[arm] = LMGen(m, temp=0.8, temp_text=0.7)
                    stack.enter_context(gens[arm].streaming(B))
                    n_user = m.num_codebooks - 1 - m.dep_q
                    users[arm] = torch.randint(0, m.card, (B, n_user, 1), device=device)
                for _ in range(max(cfg.warmup, 4)):
                    for arm, g in gens.items():
                        g.step(users[arm])
                gtimes: dict[str, list[float]] = {arm: [] for arm in models}
                for _ in range(cfg.gen_steps):
                    for arm, g in gens.items():
                        gtimes[arm].append(timer(lambda g=g, u=users[arm]: g.step(u)))
            for arm in models:
                med, p90 = _summary(gtimes[arm])
                out[arm]["gen"][str(B)] = {"step_ms": 1000 * med, "step_ms_p90": 1000 * p90,
                                           "step_ms_min": 1000 * min(gtimes[arm]), "load_1min": load_average()}
    return out


def run(cfg: ModelBenchConfig) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = cfg.preset if cfg.preset != "auto" else ("7b" if device.type == "cuda" else "tiny")
    lm_kwargs = PRESET_LM[preset]()
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.dtype]
    T = cfg.seq_len or (3000 if preset == "7b" else 256)
    if cfg.chunk_frames is None:
        cfg = dataclasses.replace(cfg, chunk_frames=min(T, 750 if preset == "7b" else 64))
    layout = dict(PRESET_TTT[preset])
    for key, value in (("layers", cfg.ttt_layers), ("num_heads", cfg.ttt_heads), ("head_dim", cfg.ttt_head_dim)):
        if value is not None:
            layout[key] = value
    arms = {"stock": TTTConfig(layers="none"), "ttt": TTTConfig(mini_batch_size=cfg.mini_batch_size, **layout)}
    warn = load_warning(torch.get_num_threads())
    if warn:
        print(warn, file=sys.stderr)
    results: dict[str, Any] = {"device": device_name(device), "preset": preset, "dtype": str(dtype),
                               "seq_len": T, "config": asdict(cfg), "ttt": arms["ttt"].to_dict(), "arms": {},
                               "machine": machine_state(), "load_warning": warn,
                               "load_average": _load_average()}
    interleave = cfg.interleave if cfg.interleave is not None else device.type == "cpu"
    results["interleaved"] = interleave
    if interleave:
        models = {}
        for arm, tcfg in arms.items():
            torch.manual_seed(0)
            models[arm] = build_lm(lm_kwargs, tcfg, device=device, dtype=dtype)
        chunked = None
        if not cfg.skip_train:  # the trainer's path: stock with the chunk-capable cache (same init)
            torch.manual_seed(0)
            chunked = {"stock": build_lm(lm_kwargs, arms["stock"], device=device, dtype=dtype, chunkable=True),
                       "ttt": models["ttt"]}
        measured = bench_interleaved(models, cfg, T, device, chunked=chunked)
        for arm, model in models.items():
            results["arms"][arm] = {"ttt_layers": model.ttt_layers,
                                    "params_m": sum(p.numel() for p in model.parameters()) / 1e6, **measured[arm]}
        results["load_average_end"] = _load_average()
        results["ratios"] = _ratios(results["arms"])
        return results
    for arm, tcfg in arms.items():
        torch.manual_seed(0)
        model = build_lm(lm_kwargs, tcfg, device=device, dtype=dtype)
        r: dict[str, Any] = {"ttt_layers": model.ttt_layers,
                             "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
        if not cfg.skip_train:
            r["train"] = {**bench_train(model, cfg, T, device), "load_1min": load_average()}
        if not cfg.skip_gen:
            r["gen"] = {str(B): {**bench_gen(model, B, cfg, device), "load_1min": load_average()}
                        for B in cfg.gen_batches}
        if not cfg.skip_train:
            if arm == "stock":  # the trainer's path needs the chunk-capable cache (same init)
                del model
                torch.manual_seed(0)
                model = build_lm(lm_kwargs, tcfg, device=device, dtype=dtype, chunkable=True)
            r["train_chunked"] = {**bench_train(model, cfg, T, device, trainer_path=True),
                                  "load_1min": load_average()}
        results["arms"][arm] = r
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["ratios"] = _ratios(results["arms"])
    results["load_average_end"] = _load_average()
    return results


def _load_average() -> list[float] | None:
    """1, 5, 15-minute load averages (figures from a busy machine are not comparable)."""
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _ratios(arms: dict[str, Any]) -> dict[str, float]:
    s, t = arms["stock"], arms["ttt"]
    out = {}
    for key, name in (("train", "train"), ("train_chunked", "trainer_path")):
        if key in s:
            out[f"{name}_fwd_bwd_time"] = t[key]["fwd_bwd_s"] / s[key]["fwd_bwd_s"]
            if s[key].get("fwd_bwd_cpu_s"):
                out[f"{name}_fwd_bwd_cpu_time"] = t[key]["fwd_bwd_cpu_s"] / s[key]["fwd_bwd_cpu_s"]
            if s[key]["peak_gib"]:
                out[f"{name}_peak_memory"] = t[key]["peak_gib"] / s[key]["peak_gib"]
    for B in s.get("gen", {}):
        out[f"lmgen_step_B{B}"] = t["gen"][B]["step_ms"] / s["gen"][B]["step_ms"]
        if s["gen"][B].get("step_cpu_ms"):
            out[f"lmgen_step_B{B}_cpu"] = t["gen"][B]["step_cpu_ms"] / s["gen"][B]["step_cpu_ms"]
    return out


def format_table(res: dict[str, Any]) -> str:
    s, t = res["arms"]["stock"], res["arms"]["ttt"]
    w = res.get("ttt", {})
    width = f", {w['num_heads']} heads x {w['head_dim']}" if w.get("head_dim") else ""
    m = res.get("machine", {})
    load = "unknown" if m.get("load_1min") is None else f"{m['load_1min']:.2f}"
    busy = "" if m.get("busy_cpus_now") is None else f", {m['busy_cpus_now']:.1f} busy now"
    rows = [f"moshi-ttt model benchmark on {res['device']}, machine load {load}{busy} on {m.get('cpus')} CPUs "
            "at start (load at each figure in the JSON)",
            f"preset {res['preset']}, {res['dtype']}, T={res['seq_len']} frames, "
            f"TTT in layers {t['ttt_layers']}{width}",
            f"{'measure':52s}{'stock':>12s}{'moshi-ttt':>12s}{'ratio':>9s}"]

    def row(name, a, b, fmt="{:.4g}"):
        ratio = f"{b / a:8.2f}x" if a and b else "      n/a"
        rows.append(f"{name:52s}{fmt.format(a) if a is not None else 'n/a':>12s}"
                    f"{fmt.format(b) if b is not None else 'n/a':>12s}{ratio}")

    row("parameters (M)", s["params_m"], t["params_m"])
    chunk = res["config"].get("chunk_frames")
    for key, name in (("train", "train fwd+bwd, full sequence"),
                      ("train_chunked", f"train, trainer's path ({chunk}-f chunks)")):
        if key not in s:
            continue
        row(f"{name} (s)", s[key]["fwd_bwd_s"], t[key]["fwd_bwd_s"])
        if "fwd_bwd_min_s" in s[key]:
            row(f"{name} (s, fastest)", s[key]["fwd_bwd_min_s"], t[key]["fwd_bwd_min_s"])
        if s[key].get("fwd_bwd_cpu_s"):
            row(f"{name}, CPU time (s)", s[key]["fwd_bwd_cpu_s"], t[key]["fwd_bwd_cpu_s"])
        row(f"{name} tokens/s", s[key]["tokens_per_s"], t[key]["tokens_per_s"])
        row(f"{name} peak memory (GiB)", s[key]["peak_gib"], t[key]["peak_gib"])
    for B in s.get("gen", {}):
        row(f"LMGen.step B={B} (ms, median)", s["gen"][B]["step_ms"], t["gen"][B]["step_ms"])
        if "step_ms_min" in s["gen"][B]:
            row(f"LMGen.step B={B} (ms, fastest)", s["gen"][B]["step_ms_min"], t["gen"][B]["step_ms_min"])
        if s["gen"][B].get("step_cpu_ms"):
            row(f"LMGen.step B={B}, CPU time (ms)", s["gen"][B]["step_cpu_ms"], t["gen"][B]["step_cpu_ms"])
    if "train_chunked" in s:
        rows.append("(trainer's path: the T frames as one training span through ChunkedLM, state carried; "
                    "its stock arm is moshi with the chunk-capable attention cache, no TTT)")
    if res["device"].startswith("CPU"):
        rows.append("(CPU: peak memory is measured on CUDA only; CPU times are not GPU estimates)")
    if res.get("interleaved"):
        rows.append("(arms measured in alternation, step by step: a changing machine load weighs on both alike)")
    if res.get("load_warning"):
        rows.append(res["load_warning"])
    if res["device"].startswith("CPU"):
        load = res.get("load_average"), res.get("load_average_end")
        if load[0]:
            rows.append(f"load average (1/5/15 min) at start {load[0]}, at end {load[1]}; on a busy machine "
                        "compare the CPU-time rows, measured with one thread (OMP_NUM_THREADS=1)")
    return "\n".join(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=["auto", "tiny", "mid", "7b"], default="auto")
    p.add_argument("--seq-len", type=int, default=None, help="frames per training sequence")
    p.add_argument("--chunk-frames", type=int, default=None,
                   help="the trainer's chunk length for the trainer-path rows (default: 64; 750 at 7B)")
    p.add_argument("--batch", type=int, default=1, help="training batch size")
    p.add_argument("--ttt-layers", default=None, help="'middle', 'all', 'every:K' or '3,5,7' "
                   "(default: the preset's layout)")
    p.add_argument("--ttt-heads", type=int, default=None, help="TTT heads (default: the preset's)")
    p.add_argument("--ttt-head-dim", type=int, default=None, help="TTT head dim (default: the preset's)")
    p.add_argument("--iters", type=int, default=5, help="timed training iterations")
    p.add_argument("--gen-steps", type=int, default=50, help="timed LMGen steps per batch size")
    p.add_argument("--gen-batches", default="1,8", help="LMGen batch sizes, comma separated")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="alternate stock and TTT steps (both models in memory); default: on CPU only")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-gen", action="store_true")
    p.add_argument("--out", default=None, help="write the JSON results here")


def from_args(args: argparse.Namespace) -> ModelBenchConfig:
    layers: Any = args.ttt_layers
    if layers is not None and ("," in layers or layers.isdigit()):
        layers = [int(x) for x in layers.split(",")]
    return ModelBenchConfig(preset=args.preset, seq_len=args.seq_len, chunk_frames=args.chunk_frames,
                            batch=args.batch, ttt_layers=layers,
                            ttt_heads=args.ttt_heads, ttt_head_dim=args.ttt_head_dim,
                            train_iters=args.iters, gen_steps=args.gen_steps,
                            gen_batches=[int(b) for b in args.gen_batches.split(",")], dtype=args.dtype,
                            skip_train=args.skip_train, skip_gen=args.skip_gen, interleave=args.interleave)


def main_args(args: argparse.Namespace) -> int:
    res = run(from_args(args))
    print(format_table(res))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    p = argparse.ArgumentParser(prog="python -m moshi_ttt.bench.model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return main_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
