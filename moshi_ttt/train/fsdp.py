"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``) through ``torchrun``.

Selected by ``distributed: fsdp`` in the train config (``ddp``, the default, keeps
``DistributedDataParallel``). What is sharded and what is not, and why:

* every temporal-transformer layer and the depformer are FSDP units: their weights (and, when
  they are trained, gradients and AdamW states) are sharded over the ranks and all-gathered
  around each unit's forward and backward. That is where 7B's bytes are: a full fine-tune no
  longer has to fit weights + gradients + AdamW states on one GPU;
* replicated, as under DDP: the TTT and LoRA parameters (small by design, see ``bench cost``, and
  read outside the units' forward: the memory's initial weights at every stream reset, the gate
  in the logs), parameters of another dtype than their unit (moshi 7B's float32 norm scales in a
  bf16 model: an FSDP unit all-gathers one dtype), and the model-level embeddings and output
  heads (moshi calls them from ``forward_text`` / ``forward_depformer_training``, not from a
  module forward FSDP could hook). Their gradients are averaged over ranks in one all-reduce after
  backward (``sync_grads``), in a fixed order.

The chunk-step wrapper (the module whose forward the trainer calls) is the FSDP root: it owns no
sharded parameter, and makes every unit's hooks belong to one root (one post-backward wait).

Checkpoints (``gather_trainable`` / ``optimizer_state`` / ``load_optimizer_state``): trainable
parameters and AdamW states are gathered to full tensors (every rank takes part), written once by
rank 0, and re-sharded on load (each rank keeps its slice of the full tensor: the same values it
held), so a resumed run continues bit for bit. The world size must stay the same (the carried
streams are per rank).
Each rank's carried streams (TTT memory, KV caches) and RNG states go in per-rank files.
"""

from __future__ import annotations

import abc
from collections import Counter

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .distributed import DistInfo


def _is_adapter(name: str) -> bool:
    return ".ttt." in f".{name}" or ".lora_A." in name or ".lora_B." in name


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded as FSDP units: each temporal layer, and the depformer."""
    units = list(model.transformer.layers)
    if getattr(model, "depformer", None) is not None:
        units.append(model.depformer)
    return units


def _register_fsdp_class(cls: type) -> None:
    """Give ``fully_shard`` a class it can swap in for a moshi module.

    ``fully_shard`` re-types each unit to ``type("FSDP" + name, (FSDPModule, cls))``. moshi's
    ``StreamingModule`` derives from ``abc.ABC`` (``__slots__ = ()``) and, with ``FSDPModule``
    first, CPython refuses the ``__class__`` assignment ("object layout differs"; torch 2.9.1).
    With ``cls`` first the layout is the same; ``FSDPModule``'s methods (unshard, reshard,
    set_*) are still found, as nothing in moshi's classes defines them. Two of its overrides of
    ``nn.Module`` then lose: ``_apply`` (moving a sharded module with ``.to()``, which we never do
    after sharding) and ``__new__`` (constructing a copy, likewise); deepcopy is refused as torch
    does.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard import _fully_shard as impl

    if cls in impl.cls_to_fsdp_cls or not issubclass(cls, abc.ABC):
        return

    def _no_deepcopy(*args, **kwargs):
        raise AssertionError("FSDP does not support deepcopy. Please use state dict for serialization.")

    impl.cls_to_fsdp_cls[cls] = type(f"FSDP{cls.__name__}", (cls, FSDPModule), {"__deepcopy__": _no_deepcopy})


def _unit_ignored(unit: nn.Module) -> set[nn.Parameter]:
    """Parameters of an FSDP unit that stay replicated: adapters, and any dtype but the unit's main one."""
    named = list(unit.named_parameters())
    main_dtype = Counter(p.dtype for n, p in named if not _is_adapter(n)).most_common(1)[0][0]
    return {p for n, p in named if _is_adapter(n) or p.dtype != main_dtype}


def sharded_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters FSDP shards (``bench cost`` uses the same plan for its estimate)."""
    sharded: set[int] = set()
    for unit in fsdp_units(model):
        ignored = {id(p) for p in _unit_ignored(unit)}
        sharded |= {id(p) for p in unit.parameters() if id(p) not in ignored}
    return {n for n, p in model.named_parameters() if id(p) in sharded}


class FSDPState:
    """What the trainer needs to run FSDP2: the device mesh and the replicated parameters."""

    def __init__(self, model: nn.Module, device: torch.device, info: DistInfo):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.info = info
        self.mesh = init_device_mesh(device.type, (info.world_size,))
        for unit in fsdp_units(model):
            ignored = _unit_ignored(unit)
            _register_fsdp_class(type(unit))
            fully_shard(unit, mesh=self.mesh, ignored_params=ignored or None)
        self.model = model
        params = list(model.parameters())
        sharded = sum(p.numel() for p in params if isinstance(p, DTensor))
        self.summary = (f"FSDP: {len(fsdp_units(model))} units sharded over {info.world_size} processes; "
                        f"{sharded} of {sum(p.numel() for p in params)} parameters sharded, the rest replicated")
        if info.is_main:
            print(self.summary)

    def shard_root(self, step_module: nn.Module) -> nn.Module:
        """Make the chunk-step wrapper the FSDP root (it shards nothing itself)."""
        from torch.distributed.fsdp import fully_shard

        plain = {p for p in step_module.parameters() if not isinstance(p, DTensor)}
        fully_shard(step_module, mesh=self.mesh, ignored_params=plain or None)
        return step_module

    def replicated(self) -> list[nn.Parameter]:
        """Trainable parameters FSDP does not manage, in the model's (fixed) parameter order."""
        return [p for p in self.model.parameters() if p.requires_grad and not isinstance(p, DTensor)]

    @torch.no_grad()
    def sync_grads(self) -> None:
        """Average the replicated parameters' gradients over ranks (FSDP averages its own)."""
        params = [p for p in self.replicated() if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.info.world_size
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    @torch.no_grad()
    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over sharded and replicated gradients together: the
        sharded squares are summed over ranks, the replicated ones (equal on every rank) once."""
        sharded = torch.zeros((), dtype=torch.float64)
        replicated = torch.zeros((), dtype=torch.float64)
        grads = [p.grad for p in params if p.grad is not None]
        for g in grads:
            if isinstance(g, DTensor):
                sharded += g.to_local().double().pow(2).sum().cpu()
            else:
                replicated += g.double().pow(2).sum().cpu()
        dev = grads[0].device if grads else torch.device("cpu")
        sharded = sharded.to(dev)
        dist.all_reduce(sharded)
        total = (sharded + replicated.to(dev)).sqrt().float()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.dtype))
        return total

    # ------------------------------------------------------------------ checkpoints
    def gather_trainable(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) trainable parameters on CPU, on every rank (a collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                         broadcast_from_rank0=False))
        return {n: t.detach().cpu().contiguous() for n, t in sd.items() if n in trainable}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """``optimizer.state_dict()`` with every sharded state tensor gathered to a full CPU tensor
        (a collective: every rank calls it; the states are visited in the same order everywhere).
        Keyed by parameter index like the plain state dict, so it loads with the same config."""
        sd = optimizer.state_dict()
        state = {}
        for idx in sorted(sd["state"]):
            state[idx] = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
                          if isinstance(v, torch.Tensor) else v for k, v in sd["state"][idx].items()}
        return {"state": state, "param_groups": sd["param_groups"]}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, full: dict) -> None:
        """Inverse of ``optimizer_state``: each rank keeps its shard of every sharded state."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        state = {}
        for idx, st in full["state"].items():
            p = params[idx]
            state[idx] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                          if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.dim() > 0 else v
                          for k, v in st.items()}
        optimizer.load_state_dict({"state": state, "param_groups": full["param_groups"]})

    @torch.no_grad()
    def load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy full tensors into the (sharded or replicated) parameters of this rank."""
        params = dict(self.model.named_parameters())
        for n, t in tensors.items():
            p = params[n]
            if isinstance(p, DTensor):
                full = t.to(device=p.device, dtype=p.dtype)
                local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
                p.to_local().copy_(local)
            else:
                p.copy_(t)


# ----------------------------------------------------------------------------- trainer checkpoints
def _rank_files(folder, rank: int):
    return folder / f"stream_rank{rank}.safetensors", folder / f"rank{rank}.pt"


def save_sharded_run(trainer) -> object:
    """``Trainer.save_checkpoint`` under FSDP: every rank gathers (collectives), every rank writes
    its streams and RNG states to a staging folder, rank 0 writes the checkpoint (with the staged
    files) atomically through ``write_checkpoint``. Returns the folder on rank 0, None elsewhere."""
    import shutil

    from safetensors.torch import save_file

    from ..model.memory import save_stream
    from ..model.weights import save_ttt_checkpoint
    from .checkpoint import ckpt_dir, rng_state, write_checkpoint, write_config

    fs: FSDPState = trainer.fsdp
    info = fs.info
    trainable = fs.gather_trainable()
    optim = fs.optimizer_state(trainer.optimizer)
    final = ckpt_dir(trainer.run_dir, trainer.step)
    staging = final.with_name(final.name + ".ranks")
    if info.is_main and staging.exists():
        shutil.rmtree(staging)
    dist.barrier()
    staging.mkdir(parents=True, exist_ok=True)
    stream_path, rank_path = _rank_files(staging, info.rank)
    save_stream(trainer.model, stream_path)
    torch.save({"rng": rng_state()}, rank_path)  # the delay tail is in the stream file, as every carried state
    dist.barrier()
    out = None
    if info.is_main:
        def writer(folder):
            save_file(trainable, str(folder / "trainable.safetensors"))
            save_ttt_checkpoint(trainer.model, folder / "adapter",
                                extra={"step": trainer.step, "reset_every": trainer.runner.reset_every})
            torch.save({
                "step": trainer.step, "optimizer": optim, "scheduler": trainer.scheduler.state_dict(),
                "stream": trainer.stream.state_dict(), "nonfinite_in_row": trainer.nonfinite_in_row,
                "skipped": trainer.skipped, "world_size": info.world_size,
            }, folder / "trainer.pt")
            write_config(folder, trainer.cfg)
            for f in sorted(staging.iterdir()):
                shutil.move(str(f), str(folder / f.name))

        out = write_checkpoint(trainer.run_dir, trainer.step, writer, trainer.cfg.keep_last)
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    return out


def resume_sharded_run(trainer, ck) -> None:
    """``Trainer._resume`` under FSDP, from a checkpoint written by ``save_sharded_run``."""
    from safetensors.torch import load_file

    from ..model.memory import load_stream
    from .checkpoint import set_rng_state
    from .config import ConfigError

    fs: FSDPState = trainer.fsdp
    st = torch.load(ck / "trainer.pt", map_location="cpu", weights_only=False)
    if st.get("world_size") != fs.info.world_size:
        raise ConfigError(f"{ck}: written by {st.get('world_size')} FSDP process(es), resumed with "
                          f"{fs.info.world_size}: each rank's carried streams are in their own file")
    params = {n for n, _ in trainer.model.named_parameters()}
    tensors = load_file(str(ck / "trainable.safetensors"))
    missing = sorted(set(tensors) - params)
    if missing:
        raise ConfigError(f"{ck}: parameter {missing[0]} is not in the model (config changed?)")
    fs.load_trainable(tensors)
    fs.load_optimizer_state(trainer.optimizer, st["optimizer"])
    trainer.scheduler.load_state_dict(st["scheduler"])
    trainer.stream.load_state_dict(st["stream"])
    stream_path, rank_path = _rank_files(ck, fs.info.rank)
    rk = torch.load(rank_path, map_location="cpu", weights_only=False)
    # Rank files written before the delay tail was part of the stream state keep it there.
    legacy = {":tail": rk["tail"], ":before": rk["before"]} if "tail" in rk else None
    load_stream(trainer.model, stream_path, fill=legacy)
    set_rng_state(rk["rng"])
    trainer.step, trainer.nonfinite_in_row, trainer.skipped = st["step"], st["nonfinite_in_row"], st["skipped"]
    trainer.logger.truncate_after(trainer.step)
    trainer.resumed_from = ck
    if fs.info.is_main:
        print(f"resumed from {ck} (step {trainer.step}, FSDP over {fs.info.world_size} processes)")
