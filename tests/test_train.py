"""The trainer: resets, gradients, exact resume after kill -9, checkpoints, config errors, DDP."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moshi_ttt.data.synthetic import SynthConfig, write_corpus
from moshi_ttt.model.build import ttt_blocks
from moshi_ttt.train.checkpoint import CheckpointError, find_resumable, verify_checkpoint
from moshi_ttt.train.config import ConfigError, load_train_config
from moshi_ttt.train.loop import Trainer, TrainingStopped

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    # 7 files of different lengths (96..160 frames), chunks of 32: files start at different steps.
    write_corpus(SynthConfig(seed=0, num_files=7, frames_min=96, frames_max=160), root / "train", progress=False)
    write_corpus(SynthConfig(seed=1, num_files=2, frames_min=96, frames_max=96), root / "eval", progress=False)
    return root


def make_cfg(corpus, run_dir, *extra):
    sets = [f"run_dir={run_dir}", f"data.train={corpus / 'train'}", f"data.eval={corpus / 'eval'}",
            "data.chunk_frames=32", "data.lanes=3", "steps=12", "log_every=1", "eval_every=1000",
            "ckpt_every=1000", "progress=false", "ttt.layers=[1,2]", "ttt.init_std=0.1", "optim.warmup_steps=2",
            *extra]
    return load_train_config(None, sets)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_train_config(None, ["optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match="optim.lr: expected a number"):
        load_train_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="mini_batch_size"):
        load_train_config(None, ["ttt.mini_batch_size=0"])
    with pytest.raises(ConfigError, match="data.lanes: expected an integer"):
        load_train_config(None, ["data.lanes=2.5"])
    bad = tmp_path / "c.yaml"
    bad.write_text("model:\n  presett: tiny\n")
    with pytest.raises(ConfigError, match="model.presett"):
        load_train_config(bad)
    cfg = load_train_config(None, ["ttt.layers=[0,2]", "optim.lr=1e-3"])
    assert cfg.ttt.layers == [0, 2] and cfg.optim.lr == 1e-3


@pytest.mark.parametrize("persistent", [True, False])
def test_memory_resets_exactly_at_file_starts(corpus, tmp_path, persistent):
    cfg = make_cfg(corpus, tmp_path / "run", f"ttt.persistent_states={str(persistent).lower()}")
    tr = Trainer(cfg)
    resets = []
    orig = tr.model.reset_streaming
    tr.model.reset_streaming = lambda mask=None: (resets.append(mask.clone()), orig(mask))[1]
    frames_in_file = torch.zeros(cfg.data.lanes, dtype=torch.long)
    for batch in list(zip(range(12), iter(tr.stream))):
        batch = batch[1]
        n = len(resets)
        tr.train_step(batch)
        expect = batch.reset
        if bool(expect.any()):
            assert torch.equal(resets[n], expect)               # exactly the lanes whose file starts
        else:
            assert len(resets) == n                              # no reset at all
        assert torch.equal(batch.reset[batch.active], batch.is_first[batch.active])
        frames_in_file = torch.where(batch.reset, 0, frames_in_file) + cfg.data.chunk_frames
        pos = ttt_blocks(tr.model)[1]._streaming_state.memory.pos
        act = batch.active
        expected_pos = frames_in_file if persistent else torch.full_like(frames_in_file, cfg.data.chunk_frames)
        assert torch.equal(pos[act], expected_pos[act]), (pos, expected_pos)
    tr.close()


def test_memory_dropout_resets_only_the_memory_of_some_lanes(corpus, tmp_path):
    """``memory_dropout``: some lanes' fast weights restart mid-file (their token count restarts),
    attention and the rest of the stream are not reset (moshi's reset only at file starts)."""
    cfg = make_cfg(corpus, tmp_path / "run", "memory_dropout=0.5")
    tr = Trainer(cfg)
    resets = []
    orig = tr.model.reset_streaming
    tr.model.reset_streaming = lambda mask=None: (resets.append(mask.clone()), orig(mask))[1]
    since = torch.zeros(cfg.data.lanes, dtype=torch.long)      # frames since the memory's last reset
    dropped = 0
    for _, batch in zip(range(12), iter(tr.stream)):
        n = len(resets)
        tr.train_step(batch)
        assert len(resets) == n + int(bool(batch.reset.any()))  # moshi's reset: file starts only
        since = torch.where(batch.reset, 0, since) + cfg.data.chunk_frames
        pos = ttt_blocks(tr.model)[1]._streaming_state.memory.pos
        act = batch.active
        restarted = act & ~batch.reset & (pos == cfg.data.chunk_frames) & (since > cfg.data.chunk_frames)
        assert torch.equal(pos[act & ~restarted], since[act & ~restarted])  # kept: counts on
        since = torch.where(restarted, cfg.data.chunk_frames, since)
        dropped += int(restarted.sum())
    assert 3 <= dropped <= 27, dropped                          # about half of the mid-file chunks
    tr.close()


def test_forward_writes_no_parameter_and_every_chunk_reaches_initial_weights(corpus, tmp_path):
    for mode in ("delta", "detach"):
        cfg = make_cfg(corpus, tmp_path / mode, f"ttt.state_grad={mode}")
        tr = Trainer(cfg)
        it = iter(tr.stream)
        tr.train_step(next(it))                              # first chunks of the files
        batch = next(it)
        assert not bool(batch.reset.any())                   # a chunk in the middle of every file
        snap = {n: p.clone() for n, p in tr.model.named_parameters()}
        from moshi_ttt.model.loss import TokenLosses, weighted_sums

        out = tr.step_module(batch.codes, batch.reset, batch.valid)
        for n, p in tr.model.named_parameters():
            assert torch.equal(p, snap[n]), n                # forward wrote nothing
        weighted_sums(TokenLosses(*out)).text_num.backward()
        W1 = ttt_blocks(tr.model)[1].layer.W1
        if mode == "delta":
            assert W1.grad is not None and W1.grad.abs().max() > 0
        else:
            assert W1.grad is None or W1.grad.abs().max() == 0
        assert ttt_blocks(tr.model)[1].layer.wq.weight.grad.abs().max() > 0
        tr.close()


def _losses(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines) if "loss" in m}


def test_kill_9_and_resume_equals_uninterrupted(corpus, tmp_path):
    base = ["-m", "moshi_ttt.train", "--quiet", "--set", f"data.train={corpus / 'train'}",
            "--set", f"data.eval={corpus / 'eval'}", "--set", "data.chunk_frames=32", "--set", "data.lanes=3",
            "--set", "steps=20", "--set", "log_every=1", "--set", "eval_every=1000", "--set", "ckpt_every=3",
            "--set", "ttt.layers=[1,2]", "--set", "optim.warmup_steps=2", "--set", "memory_dropout=0.3"]
    env = {**os.environ, "NO_TORCH_COMPILE": "1"}
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, *base, "--set", f"run_dir={ref}"], check=True, env=env, capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *base, "--set", f"run_dir={run}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Wait for the checkpoint (or the run's end), however slow the machine: no wall-clock limit.
    while not (run / "checkpoints" / "step_0000009").is_dir() and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    res = subprocess.run([sys.executable, *base, "--set", f"run_dir={run}", "--resume"], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout
    a, b = _losses(ref), _losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]][:3]
    wa = load_file(str(ref / "checkpoints" / "step_0000020" / "trainable.safetensors"))
    wb = load_file(str(run / "checkpoints" / "step_0000020" / "trainable.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_corrupted_checkpoint_is_detected_and_previous_used(corpus, tmp_path, capsys):
    cfg = make_cfg(corpus, tmp_path / "run", "steps=6", "ckpt_every=2")
    tr = Trainer(cfg)
    tr.train()
    tr.close()
    ck = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert [c.name for c in ck] == ["step_0000002", "step_0000004", "step_0000006"]
    target = ck[-1] / "trainable.safetensors"
    target.write_bytes(target.read_bytes()[:-7] + b"garbage")
    with pytest.raises(CheckpointError, match="trainable.safetensors is corrupted"):
        verify_checkpoint(ck[-1])
    assert find_resumable(tmp_path / "run") == ck[-2]
    assert "corrupted" in capsys.readouterr().out
    tr2 = Trainer(cfg, resume=True)
    assert tr2.step == 4
    tr2.close()


def test_non_finite_steps_are_skipped_then_stop(corpus, tmp_path):
    cfg = make_cfg(corpus, tmp_path / "run", "max_nonfinite=2")
    tr = Trainer(cfg)
    it = iter(tr.stream)
    tr.train_step(next(it))
    block = ttt_blocks(tr.model)[1].layer
    before = block.W1.detach().clone()
    with torch.no_grad():
        tr.model.text_linear.weight[0, 0] = float("nan")   # a frozen weight: the loss becomes NaN
    m = tr.train_step(next(it))
    assert m["skipped"] and torch.equal(block.W1, before)
    with pytest.raises(TrainingStopped, match="2 non-finite steps in a row"):
        tr.train_step(next(it))
    tr.close()


def test_training_lowers_loss_and_moves_the_memory(corpus, tmp_path):
    cfg = make_cfg(corpus, tmp_path / "run", "steps=30", "optim.lr=1e-2")
    tr = Trainer(cfg)
    first = tr.memory_metrics()
    summary = tr.train()
    tr.close()
    logs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in logs if "loss" in m]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    last = [m for m in logs if "gate_mean" in m][-1]
    assert abs(last["gate_mean"] - first["gate_mean"]) > 1e-3
    assert last["ttt_state_drift"] > 0
    assert last["inner_loss_after"] < last["inner_loss_before"]   # the memory learned from the chunk
    assert summary["steps"] == 30 and (tmp_path / "run" / "tb").is_dir()


def test_two_process_gloo_equals_one_process(corpus, tmp_path):
    common = ["--quiet", "--set", f"data.train={corpus / 'train'}", "--set", "data.eval=null",
              "--set", "data.chunk_frames=32", "--set", "steps=4", "--set", "ckpt_every=2",
              "--set", "ttt.layers=[1,2]", "--set", "optim.warmup_steps=1", "--set", "device=cpu"]
    env = {**os.environ, "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "moshi_ttt.train", *common, "--set", "data.lanes=4",
                    "--set", f"run_dir={one}"], check=True, env=env, capture_output=True)
    two = tmp_path / "two"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", "-m", "moshi_ttt.train", *common, "--set", "data.lanes=2",
                          "--set", f"run_dir={two}"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    wa = load_file(str(one / "checkpoints" / "step_0000004" / "trainable.safetensors"))
    wb = load_file(str(two / "checkpoints" / "step_0000004" / "trainable.safetensors"))
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4), (k, (wa[k] - wb[k]).abs().max())
    earlier = load_file(str(one / "checkpoints" / "step_0000002" / "trainable.safetensors"))
    assert any((earlier[k] - wa[k]).abs().max() > 1e-4 for k in wa)  # the steps did train
