"""Config errors, one test per kind: each message names the dotted key (or the file, or the
override) and the value, through the one loader every config goes through (``moshi_ttt.records``)."""

import json

import pytest

from moshi_ttt.eval.experiment import load_experiment_config
from moshi_ttt.records import dump, load
from moshi_ttt.train.config import ConfigError, TrainConfig, load_train_config
from moshi_ttt.ttt.config import TTTConfig, TTTConfigError


def error_of(overrides, path=None, loader=load_train_config) -> str:
    with pytest.raises(ConfigError) as e:
        loader(path, overrides)
    return str(e.value)


def test_unknown_key_names_the_key_and_the_known_ones():
    msg = error_of(["optim.lrr=0.1"])
    assert "optim.lrr" in msg and "unknown" in msg and "lr" in msg.split("known:")[1]
    msg = error_of(["ttt.mini_batch=4"])                     # a nested record in another package
    assert "ttt.mini_batch" in msg and "unknown TTTConfig key" in msg


@pytest.mark.parametrize("override, key, value", [
    ("optim.lr=fast", "optim.lr", "'fast'"),
    ("data.lanes=2.5", "data.lanes", "2.5"),
    ("steps=true", "steps", "True"),
    ("progress=1", "progress", "1"),                         # no number becomes a flag
    ("ttt.enable=yes_please", "ttt.enable", "'yes_please'"),
    ("run_dir=5", "run_dir", "5"),                           # no number becomes a string
    ("ttt.layers={a: 1}", "ttt.layers", "{'a': 1}"),
    ("optim={lr: [1]}", "optim.lr", "[1]"),
    ("data=7", "data", "7"),
])
def test_wrong_type_names_key_and_value(override, key, value):
    msg = error_of([override])
    assert msg.startswith(f"{key}: expected") and msg.endswith(f"got {value}"), msg


def test_bad_choice_names_key_value_and_choices():
    msg = error_of(["optim.schedule=cosin"])
    assert msg == "optim.schedule: expected one of ['cosine', 'linear', 'constant'], got 'cosin'"
    msg = error_of(["ttt.state_grad=half"])
    assert "ttt.state_grad" in msg and "'half'" in msg and "'full'" in msg


@pytest.mark.parametrize("override, expected", [
    ("optim.beta1=1.5", "optim.beta1: must be a finite number in [0.0, 1.0), got 1.5"),
    ("steps=0", "steps: must be >= 1, got 0"),
    ("ttt.mini_batch_size=0", "ttt.mini_batch_size: must be an integer >= 1, got 0"),
    ("ttt.layers=every:0", "ttt.layers: unknown layer spec"),
    ("model.preset=local", "model.preset: needs model.moshi_weights"),
])
def test_out_of_range_from_post_init_names_key_and_value(override, expected):
    assert error_of([override]).startswith(expected)


def test_experiment_errors_name_the_nested_key():
    msg = error_of(["train.optim.lr=-1"], loader=load_experiment_config)
    assert msg.startswith("train.optim.lr: must be a finite number") and msg.endswith("got -1.0")
    msg = error_of(["corpora=[{kind: kvv}]"], loader=load_experiment_config)
    assert msg.startswith("corpora[0].kind: expected one of") and "got 'kvv'" in msg
    msg = error_of(["arms=[A, D]"], loader=load_experiment_config)
    assert msg.startswith("arms[1]: expected one of ['A', 'B', 'C'], got 'D'")


def test_bad_yaml_names_the_file_and_the_place(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: [0.1\n")
    msg = error_of([], p)
    assert str(p) in msg and "not valid YAML" in msg and "line" in msg
    p.write_text("- a list\n")
    assert error_of([], p) == f"{p}: the top level must be a mapping"


def test_missing_file_names_the_path(tmp_path):
    p = tmp_path / "nope.yaml"
    assert error_of([], p) == f"config file not found: {p}"


@pytest.mark.parametrize("override, expected", [
    ("optim.lr", "--set 'optim.lr': expected key=value"),
    ("optim..lr=1", "--set 'optim..lr=1': empty key component"),
    ("optim.lr=[1", "--set 'optim.lr=[1': the value is not valid YAML"),
    ("steps.x=1", "--set 'steps.x=1': 'steps' is 300 in the config, not a mapping"),
])
def test_bad_set_override_names_the_override(override, expected):
    p = None
    if override.startswith("steps."):
        import tempfile
        from pathlib import Path

        p = Path(tempfile.mkdtemp()) / "c.yaml"
        p.write_text("steps: 300\n")
    assert error_of([override], p).startswith(expected)


def test_numbers_as_yaml_12_reads_them(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1e-3\n  weight_decay: 5E-2\n")
    cfg = load_train_config(p, ["optim.grad_clip=2e0"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip) == (1e-3, 5e-2, 2.0)
    assert load_train_config(None, ["optim.lr=1"]).optim.lr == 1.0   # an integer is a number
    assert load_train_config(None, ["run_dir=1e-3x"]).run_dir == "1e-3x"


def test_round_trip_through_json_is_identity():
    cfg = load_train_config(None, ["ttt.layers=[0, 2]", "model.lm_overrides={context: 8}", "optim.lr=1e-3"])
    again = load(TrainConfig, json.loads(json.dumps(dump(cfg))))
    assert again == cfg
    assert TTTConfig.from_dict(TTTConfig(layers=[1]).to_dict()) == TTTConfig(layers=[1])
    with pytest.raises(TTTConfigError, match=r"^mini_batch_size: expected an integer, got '3'$"):
        TTTConfig.from_dict({"mini_batch_size": "3"})



# ----------------------------------------------------------------------------- one CLI style
def test_every_command_takes_a_config_file_and_set_overrides():
    from moshi_ttt.cli import _leaf_parsers, build_parser

    leaves = list(_leaf_parsers(build_parser()))
    assert len(leaves) >= 10
    for p in leaves:
        dests = {a.dest for a in p._actions}
        assert "set" in dests and ({"config", "options_file"} & dests), p.prog


def test_command_options_from_file_flags_and_set(tmp_path, capsys):
    from moshi_ttt.cli import main as cli_main

    out = tmp_path / "demo"
    (tmp_path / "o.yaml").write_text("rounds: 3\npairs: 4\nseed: 1\n")
    assert cli_main(["demo", "--out", str(out), "--config", str(tmp_path / "o.yaml"), "--pairs", "5",
                     "--set", "seed=2"]) == 0
    cfg = json.loads((out / "demo.json").read_text())["config"]
    assert (cfg["rounds"], cfg["num_pairs"], cfg["seed"]) == (3, 5, 2)   # file < flags, --set
    capsys.readouterr()
    for argv, expected in [
        (["--set", "rounds=two"], "error: rounds: expected an integer, got 'two'"),
        (["--set", "round=2"], "error: round: unknown option of this command; known: out, pairs, rounds, seed"),
        (["--rounds", "3", "--set", "rounds=2"], "error: rounds: given both as --rounds and with --set"),
        (["--config", str(tmp_path / "none.yaml")], f"error: config file not found: {tmp_path / 'none.yaml'}"),
    ]:
        assert cli_main(["demo", "--out", str(out), *argv]) == 2
        assert capsys.readouterr().err.startswith(expected), argv


def test_records_strict_by_default_lax_on_request():
    from dataclasses import dataclass

    from moshi_ttt.errors import ConfigValueError

    @dataclass
    class Counts:
        tokens: int = 0
        seen: bool = False

    both = r"^tokens: expected an integer, got 3.0; seen: expected true/false, got 1$"
    with pytest.raises(ConfigValueError, match=both):
        load(Counts, {"tokens": 3.0, "seen": 1})
    assert load(Counts, {"tokens": 3.0, "seen": 1}, strict=False) == Counts(3, True)
    with pytest.raises(ConfigValueError, match=r"^extra: unknown Counts key; known: tokens, seen$"):
        load(Counts, {"extra": 1}, strict=False)


def test_keys_of_earlier_versions_are_dropped_only_where_listed():
    from dataclasses import dataclass, field
    from typing import ClassVar

    from moshi_ttt.errors import ConfigValueError

    @dataclass
    class Inner:
        LEGACY_KEYS: ClassVar[frozenset[str]] = frozenset({"old"})
        n: int = 0

    @dataclass
    class Outer:
        inner: Inner = field(default_factory=Inner)
        many: list[Inner] = field(default_factory=list)

    got = load(Outer, {"inner": {"n": 1, "old": 5}, "many": [{"old": "x"}, {"n": 2}]})
    assert got == Outer(Inner(1), [Inner(0), Inner(2)])
    with pytest.raises(ConfigValueError, match=r"^old: unknown Outer key"):
        load(Outer, {"old": 1})                                   # listed by Inner, not by Outer
