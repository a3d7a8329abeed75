"""FSDP2 sharded training (``distributed: fsdp``) with 2 CPU processes over gloo, through torchrun:
the same weights as one process with the same global batch, and a resumed run equal bit for bit
to the uninterrupted one."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from moshi_ttt.data.synthetic import SynthConfig, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_fsdp")
    write_corpus(SynthConfig(seed=0, num_files=7, frames_min=96, frames_max=160), root / "train", progress=False)
    return root


ENV = {**os.environ, "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1"}


def common(corpus, trainable):
    return ["--quiet", "--set", f"data.train={corpus / 'train'}", "--set", "data.eval=null",
            "--set", "data.chunk_frames=32", "--set", "steps=4", "--set", "ckpt_every=2", "--set", "log_every=1",
            "--set", "ttt.layers=[1,2]", "--set", "optim.warmup_steps=1", "--set", "device=cpu",
            "--set", f"trainable={trainable}"]


def torchrun(args, run_dir, *extra):
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "moshi_ttt.train", *args, "--set", "data.lanes=2", "--set", "distributed=fsdp",
                          "--set", f"run_dir={run_dir}", *extra], env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return res.stdout


def weights(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"step_{step:07d}" / "trainable.safetensors"))


def losses(run_dir):
    import json

    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.mark.parametrize("span", [[], ["--set", "ttt.state_grad=full", "--set", "bptt_chunks=2"]],
                         ids=["delta", "full-2-chunk-spans"])
def test_fsdp_two_processes_equal_one_process(corpus, tmp_path, span):
    """Full fine-tune: sharded base weights (FSDP's reduce-scatter, the sharded clip and AdamW)
    and replicated TTT parameters (one all-reduce) together; also with several chunk forwards per
    backward (``state_grad: full`` over 2-chunk spans)."""
    args = common(corpus, "full") + span
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "moshi_ttt.train", *args, "--set", "data.lanes=4",
                    "--set", f"run_dir={one}"], check=True, env=ENV, capture_output=True)
    two = tmp_path / "two"
    out = torchrun(args, two)
    # The base model's layers and depformer are sharded (not a DDP run under another name).
    assert "FSDP: 5 units sharded over 2 processes" in out
    sharded, total = (int(x) for x in out.split("parameters sharded")[0].split(";")[1].split(" of "))
    assert 0.5 * total < sharded < total
    wa, wb = weights(one, 4), weights(two, 4)
    assert set(wa) == set(wb) and any(".ttt." in k for k in wa) and any("gating" in k for k in wa)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4), (k, (wa[k] - wb[k]).abs().max())
    earlier = weights(one, 2)
    assert any((earlier[k] - wa[k]).abs().max() > 1e-4 for k in wa)  # the steps did train
    la, lb = losses(one), losses(two)
    assert all(abs(la[s] - lb[s]) < 1e-4 for s in la)


def test_fsdp_resume_equals_uninterrupted(corpus, tmp_path):
    """A run that lost everything after its step-2 checkpoint (the step-4 one is deleted, as a
    crash would leave it) resumes and reproduces steps 3-4 bit for bit: sharded weights and AdamW
    states gathered and re-sharded, each rank's carried streams and RNG states restored."""
    args = common(corpus, "full")
    ref = tmp_path / "ref"
    torchrun(args, ref)
    crashed = tmp_path / "crashed"
    shutil.copytree(ref, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step_0000004")
    ck = crashed / "checkpoints" / "step_0000002"
    assert {"stream_rank0.safetensors", "stream_rank1.safetensors", "rank0.pt", "rank1.pt"} <= \
        {p.name for p in ck.iterdir()}
    out = torchrun(args, crashed, "--resume")
    assert "resumed from" in out and "step 2" in out
    wa, wb = weights(ref, 4), weights(crashed, 4)
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    la, lb = losses(ref), losses(crashed)
    assert sorted(lb) == [1, 2, 3, 4] and all(la[s] == lb[s] for s in la)
