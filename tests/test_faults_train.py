"""Issue 12, failures 1-7: training under faults and bad input (resume, checkpoints, carried state,
config ranges, finished runs, metrics, resume overrides, SIGTERM, disk full).

Each test compares against expectations computed independently of the code under test (step
numbers, file bytes, saved tensors), so it fails on the landed code and passes after the fix."""

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moshi_ttt.cli import main as cli_main
from moshi_ttt.data.synthetic import SynthConfig, write_corpus
from moshi_ttt.train import checkpoint as ckmod
from moshi_ttt.train.checkpoint import CheckpointError
from moshi_ttt.train.config import ConfigError, load_train_config
from moshi_ttt.train.loop import Trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_faults")
    write_corpus(SynthConfig(seed=0, num_files=5, frames_min=96, frames_max=128), root / "train", progress=False)
    return root


def sets(corpus, run_dir, *extra):
    return [f"run_dir={run_dir}", f"data.train={corpus / 'train'}", "data.eval=null", "data.chunk_frames=32",
            "data.lanes=2", "steps=6", "log_every=1", "eval_every=1000", "ckpt_every=2", "keep_last=3",
            "progress=false", "ttt.layers=[1,2]", "optim.warmup_steps=1", *extra]


def cfg_of(corpus, run_dir, *extra):
    return load_train_config(None, sets(corpus, run_dir, *extra))


def train(cfg, **kw):
    tr = Trainer(cfg, **kw)
    try:
        return tr.train()
    finally:
        tr.close()


def steps_logged(run_dir):
    return [json.loads(ln)["step"] for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if ln.strip() and "loss" in json.loads(ln)]


def list_checkpoints(run):
    """``(step, folder)`` of the complete checkpoints, by step number (independent of the code)."""
    folder = Path(run) / "checkpoints"
    found = [(int(p.name[5:]), p) for p in folder.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found)


def carried_state(tr):
    """Every tensor of the streaming state (TTT memory, KV caches, offsets) + the delay tail."""
    import dataclasses

    from moshi.modules.transformer import RingKVCache

    out = {"tail": tr.runner.tail.clone()}
    for name, st in tr.model.get_streaming_state().items():
        for f in dataclasses.fields(st):
            v = getattr(st, f.name)
            if isinstance(v, torch.Tensor):
                out[f"{name}:{f.name}"] = v.detach().clone()
            elif isinstance(v, RingKVCache):
                out[f"{name}:{f.name}.cache"] = v.cache.detach().clone()
            elif hasattr(v, "W1"):
                for g, t in v.items():  # conv only when the layer has a short convolution
                    out[f"{name}:{f.name}.{g}"] = t.detach().clone()
    return out


def corrupt(ck: Path):
    f = ck / "trainable.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------ failure 1
def test_all_corrupt_checkpoints_refuse_resume_unless_restart(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    train(cfg_of(corpus, run))
    cks = [p for _, p in list_checkpoints(run)]
    assert [p.name for p in cks] == ["step_0000002", "step_0000004", "step_0000006"]
    for ck in cks:
        corrupt(ck)
    with pytest.raises(CheckpointError, match="none of the 3 checkpoint"):
        Trainer(cfg_of(corpus, run), resume=True)
    assert [p.name for _, p in list_checkpoints(run)] == [p.name for p in cks]   # nothing touched
    # The CLI: one line, the checkpoint exit code, no traceback.
    rc = cli_main(["train", "--quiet", "--resume", *sum((["--set", s] for s in sets(corpus, run)), [])])
    err = capsys.readouterr().err
    assert rc == 4 and "Traceback" not in err and "--restart" in err
    # --restart: starts from step 0, the old ones are moved aside (not deleted, not pruned into).
    summary = train(cfg_of(corpus, run, "steps=4", "ckpt_every=1"), resume=True, restart=True)
    assert summary["steps"] == 4
    assert [s for s, _ in list_checkpoints(run)] == [2, 3, 4]
    assert sorted(p.name for p in (run / "restarted_1" / "checkpoints").iterdir()) == [p.name for p in cks]
    assert steps_logged(run) == [1, 2, 3, 4]


def test_prune_by_step_number_keeps_newest_good(tmp_path):
    run = tmp_path / "run"
    for step in (9, 10, 99999, 100000):  # names that sort differently as text past 7 digits
        (run / "checkpoints" / f"step_{step:07d}").mkdir(parents=True)
    (run / "checkpoints" / "step_10000000").mkdir()    # 8 digits: text order puts it first
    from moshi_ttt.train.checkpoint import prune

    prune(run, keep_last=2)
    assert [s for s, _ in list_checkpoints(run)] == [100000, 10000000]


def test_newer_corrupt_checkpoint_is_set_aside_and_resume_continues(corpus, tmp_path):
    run = tmp_path / "run"
    train(cfg_of(corpus, run))
    corrupt(run / "checkpoints" / "step_0000006")
    tr = Trainer(cfg_of(corpus, run, "steps=8", "ckpt_every=1"), resume=True)
    assert tr.step == 4
    tr.train()
    tr.close()
    # The corrupt folder is kept aside; the three newest by step are the new, intact ones.
    assert (run / "checkpoints" / "step_0000006.corrupt").is_dir()
    assert [s for s, _ in list_checkpoints(run)] == [6, 7, 8]
    for _, ck in list_checkpoints(run):
        ckmod.verify_checkpoint(ck)
    assert steps_logged(run) == list(range(1, 9))


# ------------------------------------------------------------------------------------ failure 2
def test_skipped_nonfinite_step_restores_carried_state(corpus, tmp_path):
    cfg = cfg_of(corpus, tmp_path / "run", "max_nonfinite=3")
    tr = Trainer(cfg)
    it = iter(tr.stream)
    tr.train_step(next(it))
    before = carried_state(tr)
    emb = tr.model.text_emb.weight
    saved = emb.detach().clone()
    with torch.no_grad():
        emb.fill_(float("nan"))                       # a frozen weight: activations, caches, memory go NaN
    m = tr.train_step(next(it))
    assert m["skipped"]
    after = carried_state(tr)
    assert set(after) == set(before) and any(".W1" in k for k in after) and any("cache" in k for k in after)
    for k in before:
        assert torch.equal(after[k], before[k]), k    # bit for bit the state before the skipped step
    with torch.no_grad():
        emb.copy_(saved)
    m = tr.train_step(next(it))
    assert not m["skipped"]
    ck = tr.save_checkpoint()
    tr.close()
    stream = load_file(str(ck / "stream.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in stream.values() if t.is_floating_point())


# ------------------------------------------------------------------------------------ failure 3
@pytest.mark.parametrize("override, key", [
    ("optim.grad_clip=-1", "optim.grad_clip"), ("optim.grad_clip=0", "optim.grad_clip"),
    ("data.chunk_frames=0", "data.chunk_frames"), ("optim.beta1=1.5", "optim.beta1"),
    ("optim.lr=.nan", "optim.lr"), ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("loss.text_weight=-1", "loss.text_weight"), ("data.eval_max_files=0", "data.eval_max_files"),
])
def test_config_ranges_checked_at_load(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_train_config(None, [override])


def test_set_does_not_replace_a_null_or_scalar_section(tmp_path):
    for body in ("data:\n", "data: 5\n"):
        p = tmp_path / "c.yaml"
        p.write_text(body)
        with pytest.raises(ConfigError, match="'data' is .* not a mapping"):
            load_train_config(p, ["data.chunk_frames=16"])


def test_cli_value_ranges(tmp_path, capsys, corpus):
    run = tmp_path / "run"
    train(cfg_of(corpus, run, "steps=2"))
    rc = cli_main(["eval", str(run), "--data", str(corpus / "train"), "--chunk-frames", "0", "--out",
                   str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert rc == 2 and "--chunk-frames" in err and not (tmp_path / "ev").exists()
    rc = cli_main(["prepare", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "o"), "--tokenizer",
                   str(tmp_path / "t.model"), "--random-mimi", "tiny", "--num-codebooks", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "--num-codebooks" in err and "0" in err


def test_eval_options_from_set_are_checked_like_flags(corpus, tmp_path, capsys):
    """The one CLI style on eval: --set sets an option by its name, typed and range-checked."""
    run, ev = tmp_path / "run", tmp_path / "ev"
    train(cfg_of(corpus, run, "steps=2"))
    base = ["eval", str(run), "--data", str(corpus / "train"), "--out", str(ev), "--quiet"]
    assert cli_main([*base, "--set", "chunk_frames=0"]) == 2
    assert "--chunk-frames must be >= 1, got 0" in capsys.readouterr().err and not ev.exists()
    assert cli_main([*base, "--set", "lanes=two"]) == 2
    assert "error: lanes: expected an integer, got 'two'" in capsys.readouterr().err
    assert cli_main([*base, "--set", "mode=reset", "--set", "max_files=1"]) == 0
    res = json.loads((ev / "eval_reset.json").read_text())
    assert sorted(p.name for p in ev.iterdir()) == ["eval_reset.json"] and len(res["files"]) == 1


# ------------------------------------------------------------------------------------ failure 4
def test_resume_of_finished_run_says_so_and_keeps_summary(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    train(cfg_of(corpus, run, "steps=2"))
    before = (run / "summary.json").read_bytes()
    rc = cli_main(["train", "--quiet", "--resume", *sum((["--set", s] for s in sets(corpus, run, "steps=2")), [])])
    out = capsys.readouterr()
    assert rc == 0 and "already finished at step 2" in out.out and "Traceback" not in out.err
    assert (run / "summary.json").read_bytes() == before
    assert json.loads(before)["final_loss"] is not None


# ------------------------------------------------------------------------------------ failure 5
def test_metrics_partial_last_line_and_trimmed_to_resumed_step(corpus, tmp_path):
    run = tmp_path / "run"
    train(cfg_of(corpus, run, "steps=5"))                       # checkpoints 2, 4 (and 5)
    shutil.rmtree(run / "checkpoints" / "step_0000005")          # killed after logging step 5
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "loss": 1.2')                       # an append cut short
    summary = train(cfg_of(corpus, run, "steps=6"), resume=True)
    assert summary["steps"] == 6
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]


def test_kill_before_first_checkpoint_does_not_log_twice(corpus, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')
    train(cfg_of(corpus, run, "steps=2"), resume=True)
    assert steps_logged(run) == [1, 2]


# ------------------------------------------------------------------------------------ failure 6
def test_resume_overrides_applied_or_refused(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    train(cfg_of(corpus, run, "steps=4", "optim.schedule=constant"))
    tr = Trainer(cfg_of(corpus, run, "steps=6", "optim.schedule=constant", "optim.lr=0.5"), resume=True)
    assert [g["lr"] for g in tr.optimizer.param_groups] == [0.5] * len(tr.optimizer.param_groups)
    assert "applied optim.lr" in capsys.readouterr().out
    tr.train()
    tr.close()
    ck = run / "checkpoints" / "step_0000006"
    st = torch.load(ck / "trainer.pt", weights_only=False)
    assert json.loads((ck / "config.json").read_text())["optim"]["lr"] == 0.5
    assert st["optimizer"]["param_groups"][0]["lr"] == 0.5     # what is recorded is what was used
    with pytest.raises(ConfigError, match=r"optim\.beta1"):
        Trainer(cfg_of(corpus, run, "steps=8", "optim.schedule=constant", "optim.lr=0.5", "optim.beta1=0.5"),
                resume=True)


def test_checkpoint_config_is_json_and_older_checkpoints_still_load(corpus, tmp_path):
    """The trained config is stored as JSON beside the weights; a checkpoint of the earlier format
    (the config pickled inside trainer.pt, no config.json) still loads and resumes."""
    import hashlib

    from moshi_ttt.train.loop import load_trained

    run = tmp_path / "run"
    train(cfg_of(corpus, run, "steps=2"))
    ck = list_checkpoints(run)[-1][1]
    saved = json.loads((ck / "config.json").read_text())
    st = torch.load(ck / "trainer.pt", weights_only=False)
    assert saved["data"]["lanes"] == 2 and saved["ttt"]["layers"] == [1, 2] and "config" not in st
    _, cfg, _ = load_trained(run)
    assert cfg == cfg_of(corpus, run, "steps=2")
    st["config"] = saved                                          # the earlier format
    torch.save(st, ck / "trainer.pt")
    (ck / "config.json").unlink()
    manifest = json.loads((ck / "manifest.json").read_text())
    del manifest["files"]["config.json"]
    manifest["files"]["trainer.pt"] = hashlib.sha256((ck / "trainer.pt").read_bytes()).hexdigest()
    (ck / "manifest.json").write_text(json.dumps(manifest))
    _, old, _ = load_trained(run)
    assert old == cfg
    assert train(cfg_of(corpus, run, "steps=4"), resume=True)["steps"] == 4


# ------------------------------------------------------------------------------------ failure 7
def test_sigterm_checkpoints_and_stops(corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    guard = signal.signal(signal.SIGTERM, lambda *a: None)   # the landed code would die otherwise
    orig = Trainer.train_step

    def step_then_term(self, batch, **kw):
        m = orig(self, batch, **kw)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return m

    monkeypatch.setattr(Trainer, "train_step", step_then_term)
    try:
        rc = cli_main(["train", "--quiet", *sum((["--set", s] for s in sets(corpus, run, "steps=10",
                                                                               "ckpt_every=100")), [])])
    finally:
        signal.signal(signal.SIGTERM, guard)
    assert rc == 143
    assert [s for s, _ in list_checkpoints(run)] == [3]
    assert signal.getsignal(signal.SIGTERM) is guard


def test_disk_full_during_checkpoint_write(corpus, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train(cfg_of(corpus, run, "steps=2"))
    from moshi_ttt.train import loop

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(a[1]) if len(a) > 1 else None)

    monkeypatch.setattr(loop, "save_file", full)
    rc = cli_main(["train", "--quiet", "--resume", *sum((["--set", s] for s in sets(corpus, run, "steps=4")), [])])
    err = capsys.readouterr().err
    assert rc == 6 and "No space left" in err and "Traceback" not in err
    assert not list((run / "checkpoints").glob("*.tmp"))            # no stale .tmp left behind
    assert [s for s, _ in list_checkpoints(run)] == [2]
    monkeypatch.undo()
    (run / "checkpoints" / "step_0000003.tmp").mkdir()              # as a kill -9 would leave it
    assert train(cfg_of(corpus, run, "steps=4"), resume=True)["steps"] == 4
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_free_space_checked_before_writing(corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    tr = Trainer(cfg_of(corpus, run, "steps=1"))
    tr.train_step(next(iter(tr.stream)))

    class Usage:
        free = 1000

    monkeypatch.setattr(ckmod.shutil, "disk_usage", lambda p: Usage)
    with pytest.raises(CheckpointError, match="not enough free space"):
        tr.save_checkpoint()
    tr.close()
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


# ------------------------------------------------------------------------------------ the CLI
def test_one_line_errors_distinct_exit_codes_and_debug(corpus, tmp_path, capsys):
    from moshi_ttt.cli import classify

    rc = cli_main(["train", "--set", "optim.grad_clip=-1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().count("\n") == 0 and "optim.grad_clip" in err and "Traceback" not in err
    rc = cli_main(["--debug", "train", "--set", "optim.grad_clip=-1"])
    assert rc == 2 and "Traceback (most recent call last)" in capsys.readouterr().err
    rc = cli_main(["train", "--set", "device=tpu9", "--set", f"data.train={corpus / 'train'}", "--set",
                   "data.eval=null", "--debug"])                            # --debug after the command
    assert rc == 7 and "Traceback" in capsys.readouterr().err
    from moshi_ttt.data.report import DataError
    from moshi_ttt.model.weights import WeightsError
    from moshi_ttt.train.loop import TrainingStopped

    kinds = [DataError("x", "bad"), ConfigError("k"), TrainingStopped("s"), CheckpointError("c"),
             WeightsError("w"), OSError(errno.ENOSPC, "No space left on device", "f"), RuntimeError("boom")]
    codes = [classify(e)[0] for e in kinds]
    assert codes == [1, 2, 3, 4, 5, 6, 70]
    assert "rerun with --debug" in classify(RuntimeError("boom"))[1]


def test_skipped_step_at_a_file_start_still_resets_that_lane(corpus, tmp_path):
    from moshi_ttt.model.build import ttt_blocks

    tr = Trainer(cfg_of(corpus, tmp_path / "run", "max_nonfinite=3"))
    it = iter(tr.stream)
    tr.train_step(next(it))
    batch = next(it)
    while not bool(batch.reset.any()) or bool(batch.reset.all()):
        tr.train_step(batch)
        batch = next(it)
    mem = ttt_blocks(tr.model)[1]._streaming_state.memory
    pos_before = mem.pos.clone()
    emb = tr.model.text_emb.weight
    saved = emb.detach().clone()
    with torch.no_grad():
        emb.fill_(float("nan"))
    assert tr.train_step(batch)["skipped"]
    with torch.no_grad():
        emb.copy_(saved)
    pos = ttt_blocks(tr.model)[1]._streaming_state.memory.pos
    assert torch.equal(pos[batch.reset], torch.zeros_like(pos[batch.reset]))     # the new file starts fresh
    assert torch.equal(pos[~batch.reset], pos_before[~batch.reset])               # the others: as before
    tr.close()
