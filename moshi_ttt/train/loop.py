"""The training loop: truncated BPTT over in-order chunk streams (DESIGN.md sections 4, 5).

Each step takes one chunk per lane from the in-order stream, resets the lanes whose file starts,
runs the chunked forward (attention keys/values and TTT memory carried from the previous chunk),
computes moshi-finetune's loss, backpropagates within the chunk (the memory's path to the learned
initial weights per ``ttt.state_grad``), clips, steps AdamW, and carries the state on.
``ttt.persistent_states: false`` resets the memory every chunk (the seeds' baseline).

Checkpoints hold everything needed to continue bit for bit (on CPU): weights, optimizer,
scheduler, sampler position, RNG states and the carried per-lane memory.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.dataset import EncodedDataset
from ..data.report import DataError
from ..data.stream import ChunkBatch, ChunkStream
from ..errors import EXIT_STOPPED, MoshiTTTError
from ..fileio import atomic_write_json, atomic_write_text
from ..model.build import build_lm, tiny_lm_kwargs, ttt_blocks
from ..model.chunked import ChunkedLM
from ..model.hybrid import BlockCall, recorded_calls, reset_memory
from ..model.loss import TokenLosses, WeightedSums, combine, weighted_sums
from ..model.memory import load_stream, restore_stream, save_stream, snapshot_stream, stream_finite, stream_nbytes
from ..model.weights import adapter_keys, apply_lora, load_lm, save_ttt_checkpoint, trainable_names
from ..records import dump, load
from .checkpoint import (
    CheckpointError,
    find_resumable,
    list_checkpoints,
    move_aside,
    resume_point,
    rng_state,
    saved_config,
    set_rng_state,
    write_checkpoint,
    write_config,
)
from .config import ConfigError, TrainConfig, resume_changes
from .distributed import DistInfo, all_reduce_sum, init_distributed
from .fsdp import FSDPState, resume_sharded_run, save_sharded_run
from .logging import MetricsLogger

#: The trainer's evaluation callback: ``(model, step) -> {metric: value}``, called on the main rank
#: every ``eval_every`` steps with the training streams parked; its metrics are logged as ``eval/<k>``.
#: The caller builds it (``moshi_ttt.eval.evaluate.periodic_evaluator``): training imports no evaluation.
Evaluator = Callable[[nn.Module, int], Mapping[str, float]]


class TrainingStopped(MoshiTTTError, RuntimeError):
    """The run stopped on purpose (too many non-finite steps); the message says why (exit code 3)."""

    exit_code = EXIT_STOPPED


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N``...; an unknown string or an absent device is a
    :class:`~moshi_ttt.errors.DeviceError` naming it."""
    from ..errors import DeviceError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as e:
        raise DeviceError(f"device {name!r}: not a device (use auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r}: CUDA is not available on this machine (use device=cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {name!r}: only cpu and cuda are supported")
    return dev


def make_model(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """Build the model of a training config (tiny preset or local weights), LoRA, trainable set."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.model.dtype]
    ttt = cfg.ttt  # its reset schedule is not the model's: the trainer passes it (``reset_every``)
    torch.manual_seed(cfg.model.init_seed)
    if cfg.model.preset == "tiny":
        # chunkable: exact attention over chunks longer than one frame, with or without TTT.
        model = build_lm(tiny_lm_kwargs(**cfg.model.lm_overrides), ttt, device=device, dtype=dtype, chunkable=True)
    else:
        if cfg.model.lm_overrides:
            raise ConfigError("model.lm_overrides applies to the tiny preset only (the config.json "
                              "of local weights defines the architecture)")
        model = load_lm(cfg.model.moshi_weights, cfg.model.moshi_config, ttt, device=device, dtype=dtype,
                        chunkable=True)
    if cfg.model.gradient_checkpointing:
        raise ConfigError("model.gradient_checkpointing: moshi's layer checkpointing re-runs the forward "
                          "in backward, which would advance the streaming state (KV cache, TTT memory) "
                          "twice; not supported with chunked training yet")
    if cfg.lora.enable:
        apply_lora(model, cfg.lora.rank, cfg.lora.scaling)
    names = set(trainable_names(model, cfg.trainable))
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return model


def reset_every(cfg: TrainConfig) -> int | None:
    """The memory's reset schedule in training: kept across a file's chunks (None), or reset
    every chunk (``ttt.persistent_states: false``, the seeds' baseline)."""
    return None if cfg.ttt.persistent_states else cfg.data.chunk_frames


def lr_lambda(cfg: TrainConfig):
    o = cfg.optim

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape

    return f


class _ChunkStep(nn.Module):
    """The chunk forward as a module, so that DDP can wrap it (its reducer hooks on ``forward``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.runner: ChunkedLM | None = None

    def forward(self, codes: torch.Tensor, reset: torch.Tensor, valid: torch.Tensor):
        assert self.runner is not None
        tl = self.runner.step(codes, reset, valid).losses
        return tl.text, tl.text_target, tl.text_mask, tl.audio, tl.audio_target, tl.audio_mask


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, dist: DistInfo | None = None,
                 restart: bool = False, evaluator: Evaluator | None = None):
        self.cfg = cfg
        self.evaluator = evaluator
        self.device = resolve_device(cfg.device)
        self.dist = dist or init_distributed(self.device.type)
        self.run_dir = Path(cfg.run_dir)
        torch.manual_seed(cfg.seed)
        self.model = make_model(cfg, self.device)
        self.fsdp = FSDPState(self.model, self.device, self.dist) \
            if self.dist.enabled and cfg.distributed == "fsdp" else None  # shards before the optimizer sees params
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError(f"trainable={cfg.trainable}: the model has no such parameters (TTT in no layer?)")
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                           weight_decay=cfg.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.dataset = EncodedDataset(cfg.data.train)
        self._check_layout(self.dataset, cfg.data.train)
        if len(self.dataset) == 0:
            raise DataError(str(cfg.data.train), "no usable file in the training dataset (see the messages above)")
        # One schedule over lanes x world; the stream gives each rank its lanes (and loads only their
        # files), so a run on N processes sees exactly the batches of one process with N times the lanes.
        self.stream = ChunkStream(self.dataset, cfg.data.lanes, cfg.data.chunk_frames, seed=cfg.seed,
                                  mode=cfg.data.mode, rank=self.dist.rank, world_size=self.dist.world_size)
        self.step_module: nn.Module = _ChunkStep(self.model)
        if self.fsdp is not None:
            self.step_module = self.fsdp.shard_root(self.step_module)
        elif self.dist.enabled:
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        self.step = 0
        self._probed: dict[int, BlockCall] = {}  # the last probed span's TTT calls (memory_metrics)
        self.nonfinite_in_row = 0
        self.skipped = 0
        self._stop_requested = False
        self._stop_signal: str | None = None
        self.runner = ChunkedLM(self.model, cfg.data.lanes, recompute=cfg.recompute_chunks,
                                reset_every=reset_every(cfg))
        self.runner.start()
        self._inner(self.step_module).runner = self.runner
        # memory_dropout restarts kept memories only (a memory reset every chunk has nothing to drop).
        self._dropout_blocks = ttt_blocks(self.model) if cfg.memory_dropout > 0 and cfg.ttt.persistent_states else {}
        if resume and self.dist.world_size > 1 and self.fsdp is None:
            raise ConfigError("resuming a multi-process run: run the same world size; the carried memory "
                              "of every rank's lanes is in the checkpoint of rank 0 only for now")
        ck = self._claim_run_dir(resume, restart) if self.dist.is_main else None
        if self.fsdp is not None:  # every rank resumes its shard from the checkpoint rank 0 chose
            chosen = [str(ck) if ck is not None else None]
            torch.distributed.broadcast_object_list(chosen, src=0)
            ck = Path(chosen[0]) if chosen[0] else None
        self.logger = MetricsLogger(self.run_dir, enabled=self.dist.is_main, tensorboard=True)
        self.resumed_from: Path | None = None
        if ck is not None:
            self._resume(ck)
        elif self.dist.is_main:
            self.logger.truncate_after(0)  # lines of a run killed before its first checkpoint
            atomic_write_json(self.run_dir / "config.json", dump(cfg))

    @staticmethod
    def _inner(m: nn.Module) -> _ChunkStep:
        return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m  # type: ignore[return-value]

    def _check_layout(self, ds: EncodedDataset, path: str) -> None:
        rows = ds.layout.num_rows if getattr(ds, "layout", None) is not None else None
        if rows is not None and rows != self.model.num_codebooks:
            raise ConfigError(f"data {path}: codes have {rows} rows, the model expects "
                              f"{self.model.num_codebooks} (1 text + n_q audio)")

    # ------------------------------------------------------------------ one step
    def train_step(self, batches: list[ChunkBatch] | ChunkBatch, probe: bool = False) -> dict[str, Any]:
        """One optimizer step over a training span of ``len(batches)`` consecutive chunks
        (``bptt_chunks``): the loss is the token mean over the span; with ``ttt.state_grad: full``
        its gradient is that of one forward over the span's frames. ``probe``: keep each TTT
        block's last call of the span for ``memory_metrics`` (inner loss before/after)."""
        cfg = self.cfg
        if isinstance(batches, ChunkBatch):
            batches = [batches]
        t0 = time.perf_counter()
        self.model.train()
        self.runner.cut()  # a new span: the carried state enters without the previous span's graph
        snap = snapshot_stream(self.model)  # all carried state: TTT memory, KV caches, delay tail
        local = []  # per chunk: this rank's [text num, text den, audio num, audio den] (nums differentiable)
        frames = 0.0
        epoch = 0
        with recorded_calls(ttt_blocks(self.model) if probe else {}) as calls:  # forward only
            for i, batch in enumerate(batches):
                batch = batch.to(self.device)
                if self._dropout_blocks:
                    reset_memory(self._dropout_blocks, self._memory_dropout_mask(i))
                text, ttgt, tmask, audio, atgt, amask = self.step_module(batch.codes, batch.reset, batch.valid)
                w = weighted_sums(TokenLosses(text, ttgt, tmask, audio, atgt, amask), cfg.loss)
                local.append(torch.stack([w.text_num, w.text_den, w.audio_num, w.audio_den]))
                frames += float(batch.valid.sum()) * self.dist.world_size
                epoch = batch.epoch
        self._probed = calls
        sums = torch.stack(local).sum(0)                                            # [4]: the span's sums
        glob = all_reduce_sum(sums.detach().float(), self.dist)                     # [4]: over all ranks
        # The token mean over the global batch: this rank's numerators over the global denominators.
        # DDP averages gradients over ranks: scale so that the result is the global token mean.
        (combine(WeightedSums(*sums), cfg.loss, glob[1], glob[3]).total * self.dist.world_size).backward()
        if self.fsdp is not None:
            self.fsdp.sync_grads()
        clip = self.fsdp.clip_grad_norm_ if self.fsdp is not None else torch.nn.utils.clip_grad_norm_
        grad_norm = clip(self.params, cfg.optim.grad_clip)
        reported = combine(WeightedSums(*glob), cfg.loss)                           # the global loss, every rank
        loss_value = reported.total
        finite = bool(torch.isfinite(loss_value)) and bool(torch.isfinite(grad_norm)) and self._carried_finite()
        lr = self.scheduler.get_last_lr()[0]
        if finite:
            self.optimizer.step()
            self.nonfinite_in_row = 0
        else:
            # Nothing non-finite is carried on or saved; lanes whose file started in the span start it.
            restore_stream(self.model, snap)
            self.runner.reset(torch.stack([b.reset for b in batches]).any(0))
            self.nonfinite_in_row += 1
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        dt = time.perf_counter() - t0
        metrics = {"step": self.step, "loss": float(loss_value), "text_loss": float(reported.text),
                   "audio_loss": float(reported.audio), "grad_norm": float(grad_norm), "lr": lr,
                   "frames_per_s": frames / dt, "epoch": epoch, "skipped": not finite}
        if not finite:
            print(f"step {self.step}: non-finite loss or gradient (loss={float(loss_value)}, "
                  f"grad_norm={float(grad_norm)}); step skipped ({self.nonfinite_in_row} in a row)")
            if self.nonfinite_in_row >= cfg.max_nonfinite:
                raise TrainingStopped(f"{self.nonfinite_in_row} non-finite steps in a row (max_nonfinite="
                                      f"{cfg.max_nonfinite}); stopping. Lower optim.lr or ttt.base_lr, "
                                      "or check the data; the last good checkpoint is kept.")
        return metrics

    # ------------------------------------------------------------------ carried state
    def _memory_dropout_mask(self, chunk: int) -> torch.Tensor:
        """[lanes] bool: this rank's lanes whose memory ``memory_dropout`` resets before chunk
        ``chunk`` of this step. A function of (seed, step, chunk) alone, drawn over the global
        lanes: resuming, or running on more processes, draws the same resets."""
        n, r = self.cfg.data.lanes, self.dist.rank
        u = np.random.default_rng([0x6D656D, self.cfg.seed, self.step, chunk]).random(n * self.dist.world_size)
        return torch.from_numpy(u[r * n:(r + 1) * n] < self.cfg.memory_dropout).to(self.device)

    def _carried_finite(self) -> bool:
        ok = torch.tensor(float(stream_finite(self.model)), device=self.device)
        return bool(all_reduce_sum(ok, self.dist) == self.dist.world_size) if self.dist.enabled else bool(ok)

    @torch.no_grad()
    def memory_metrics(self) -> dict[str, float]:
        """Per TTT layer: gate mean |tanh(alpha)| and state drift (mean over lanes)."""
        out = {}
        for i, b in ttt_blocks(self.model).items():
            out[f"gate/layer{i}"] = float(b.layer.gate().abs().mean())
            st = b._streaming_state
            if st is not None:
                out[f"drift/layer{i}"] = float(b.layer.state_drift(st.memory).mean())
            call = self._probed.get(i)
            if call is not None:
                out[f"inner_loss_before/layer{i}"], out[f"inner_loss_after/layer{i}"] = b.inner_loss_before_after(call)
        if out:
            gates = [v for k, v in out.items() if k.startswith("gate/")]
            drifts = [v for k, v in out.items() if k.startswith("drift/")]
            out["gate_mean"] = sum(gates) / len(gates)
            if drifts:
                out["ttt_state_drift"] = sum(drifts) / len(drifts)
            for key in ("inner_loss_before", "inner_loss_after"):
                vals = [v for k, v in out.items() if k.startswith(key + "/")]
                if vals:
                    out[key] = sum(vals) / len(vals)
        return out

    # ------------------------------------------------------------------ eval
    def run_eval(self) -> dict[str, float] | None:
        """The evaluator's metrics as ``eval/<k>`` (None without one; FSDP: see fsdp.py)."""
        if self.evaluator is None or not self.dist.is_main or self.fsdp is not None:
            return None
        with _swap_streaming(self.model):
            metrics = self.evaluator(self.model, self.step)
        return {f"eval/{k}": v for k, v in metrics.items()}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        if self.fsdp is not None:
            return save_sharded_run(self)
        if not self.dist.is_main:
            return None
        trainable = {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}

        def writer(folder: Path) -> None:
            save_file(trainable, str(folder / "trainable.safetensors"))
            save_ttt_checkpoint(self.model, folder / "adapter",
                                extra={"step": self.step, "reset_every": self.runner.reset_every})
            save_stream(self.model, folder / "stream.safetensors")
            torch.save({
                "step": self.step, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "stream": self.stream.state_dict(),
                "rng": rng_state(), "nonfinite_in_row": self.nonfinite_in_row, "skipped": self.skipped,
            }, folder / "trainer.pt")
            write_config(folder, self.cfg)

        return write_checkpoint(self.run_dir, self.step, writer, self.cfg.keep_last,
                                expected_bytes=self._checkpoint_nbytes(trainable))

    def _checkpoint_nbytes(self, trainable: dict[str, torch.Tensor]) -> int:
        """About what a checkpoint takes on disk: weights, adapter, optimizer state, carried state."""
        def nbytes(ts) -> int:
            return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))

        adapter = nbytes(p for n, p in self.model.named_parameters() if n in set(adapter_keys(self.model)))
        optim = sum(nbytes(st.values()) for st in self.optimizer.state.values())
        return nbytes(trainable.values()) + adapter + optim + stream_nbytes(self.model) + (1 << 20)

    def _claim_run_dir(self, resume: bool, restart: bool) -> Path | None:
        """The checkpoint to resume from, or None to start at step 0 (see ``resume_point``). A new
        run never starts over another one's checkpoints unless ``restart`` moves them aside."""
        if resume:
            ck = resume_point(self.run_dir, restart)
            if ck is None and not restart:
                print(f"no checkpoint to resume in {self.run_dir / 'checkpoints'}; starting from step 0")
        else:
            done = list_checkpoints(self.run_dir)
            if done and not restart:
                raise CheckpointError(f"{self.run_dir} already holds checkpoints up to step {done[-1][0]}: "
                                      "give --resume to continue it, --restart to start again (the old "
                                      "outputs are moved aside), or another run_dir")
            if done:
                print(f"restart: old outputs moved to {move_aside(self.run_dir)}")
            ck = None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return ck

    def _apply_resume_config(self, saved: dict[str, Any]) -> None:
        """Overrides of a resumed run: applied (and said so) or refused, never recorded silently."""
        applied, refused = resume_changes(saved, dump(self.cfg))
        if self.cfg.steps < self.step:
            raise ConfigError(f"--resume: steps={self.cfg.steps} is below the checkpoint's step {self.step}")
        if refused:
            lines = ", ".join(f"{k} ({a!r} in the checkpoint, {b!r} now)" for k, a, b in refused)
            raise ConfigError(f"--resume: these settings cannot change in a resumed run: {lines}. Drop the "
                              "--set / config change, or start a new run_dir")
        for k, a, b in applied:
            if k == "optim.lr":  # the optimizer and scheduler state restored the old base lr
                for g in self.optimizer.param_groups:
                    g["initial_lr"] = b
                self.scheduler.base_lrs = [b for _ in self.optimizer.param_groups]
                factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
                for g in self.optimizer.param_groups:
                    g["lr"] = b * factor
                self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
            print(f"resume: applied {k}: {a!r} -> {b!r}")
        if applied:
            atomic_write_json(self.run_dir / "config.json", dump(self.cfg))

    def _resume(self, ck: Path) -> None:
        if self.fsdp is not None:
            return resume_sharded_run(self, ck)
        if self.dist.world_size > 1:
            raise ConfigError("resuming a multi-process run: run the same world size; the carried memory "
                              "of every rank's lanes is in the checkpoint of rank 0 only for now")
        st = torch.load(ck / "trainer.pt", map_location="cpu", weights_only=False)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in load_file(str(ck / "trainable.safetensors")).items():
                if n not in params:
                    raise ConfigError(f"{ck}: parameter {n} is not in the model (config changed?)")
                params[n].copy_(t)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        try:
            self.stream.load_state_dict(st["stream"])
        except ValueError as e:  # the dataset changed under the same path
            raise CheckpointError(f"{ck}: {e}; resume with the data the run started with") from e
        # Checkpoints written before the delay tail was part of the stream state keep it here.
        legacy = {":tail": st["tail"], ":before": st["before"]} if "tail" in st else None
        load_stream(self.model, ck / "stream.safetensors", fill=legacy)
        set_rng_state(st["rng"])
        self.step, self.nonfinite_in_row, self.skipped = st["step"], st["nonfinite_in_row"], st["skipped"]
        self._apply_resume_config(saved_config(ck))
        self.logger.truncate_after(self.step)
        self.resumed_from = ck
        print(f"resumed from {ck} (step {self.step})")

    # ------------------------------------------------------------------ loop
    def _on_sigint(self, signum, frame) -> None:
        """SIGINT and SIGTERM (scheduler pre-emption): finish the step, checkpoint, stop."""
        self._stop_requested = True
        self._stop_signal = signal.Signals(signum).name
        print(f"\n{self._stop_signal}: finishing this step, writing a checkpoint, then stopping "
              "(send it again to abort)", flush=True)
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        from tqdm import tqdm

        if self.resumed_from is not None and self.step >= cfg.steps:
            return self._finished_summary()
        old_handler = signal.signal(signal.SIGINT, self._on_sigint) if self.dist.is_main else None
        old_term = signal.signal(signal.SIGTERM, self._on_sigint) if self.dist.is_main else None
        # disable=None: no bar when stderr is not a terminal (log files, CI).
        bar = tqdm(total=cfg.steps, initial=self.step, disable=None if (cfg.progress and self.dist.is_main) else True,
                   desc="train", unit="step", dynamic_ncols=True)
        it = iter(self.stream)
        last: dict[str, Any] = {}
        t_start = time.perf_counter()
        try:
            while self.step < cfg.steps:
                will_log = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.steps
                metrics = self.train_step([next(it) for _ in range(cfg.bptt_chunks)], probe=will_log)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    metrics.update(self.memory_metrics())
                    self.logger.log(metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.1e}")
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    ev = self.run_eval()
                    if ev:
                        self.logger.log({"step": self.step, **ev})
                        bar.write(f"step {self.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in ev.items()))
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or self._stop_requested:
                    self.save_checkpoint()
                last = metrics
                if self._stop_requested:
                    bar.write(f"stopped at step {self.step}; resume with --resume")
                    break
        finally:
            bar.close()
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
        summary = {"steps": self.step, "final_loss": last.get("loss"), "skipped_steps": self.skipped,
                   "wall_s": time.perf_counter() - t_start, "run_dir": str(self.run_dir),
                   "interrupted": self._stop_requested, "signal": self._stop_signal}
        if self.dist.is_main:  # atomic: the experiment reads it to decide whether an arm is done
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        self.logger.close()
        return summary

    def _finished_summary(self) -> dict[str, Any]:
        """``--resume`` of a run that already reached ``steps``: its summary, untouched on disk."""
        path = self.run_dir / "summary.json"
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            summary = {"steps": self.step, "final_loss": None, "skipped_steps": self.skipped,
                       "run_dir": str(self.run_dir), "interrupted": False}
        self.logger.close()
        return {**summary, "already_finished": True}

    def close(self) -> None:
        self.runner.close()


@contextlib.contextmanager
def _swap_streaming(model):
    """Evaluate inside training: park the training streams' state, restore it after."""
    saved = model.get_streaming_state()
    model._stop_streaming()
    try:
        yield
    finally:
        model.set_streaming_state(saved)


__all__ = ["Trainer", "TrainingStopped", "make_model", "WeightedSums"]


def load_trained(path: str | Path, device: str | torch.device = "auto") -> tuple[nn.Module, TrainConfig, Path]:
    """A trained model from a checkpoint folder (``.../checkpoints/step_N``) or a run folder (its
    newest intact checkpoint). Returns (model in eval mode, its training config, checkpoint path)."""
    from .checkpoint import CheckpointError, verify_checkpoint

    path = Path(path)
    ck = path if (path / "trainable.safetensors").is_file() else find_resumable(path)
    if ck is None:
        raise CheckpointError(f"{path}: no checkpoint found (expected a run folder or checkpoints/step_N)")
    verify_checkpoint(ck)
    cfg = load(TrainConfig, saved_config(ck), error=ConfigError)
    model = make_model(cfg, resolve_device(device if device != "auto" else cfg.device))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in load_file(str(ck / "trainable.safetensors")).items():
            if n not in params or tuple(params[n].shape) != tuple(t.shape):
                raise CheckpointError(f"{ck}: parameter {n} does not fit the model its config builds")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{ck}: parameter {n} holds NaN or infinite values")
            params[n].copy_(t)
    return model.eval(), cfg, ck
