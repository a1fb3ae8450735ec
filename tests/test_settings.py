"""One source per setting: flags come from dataclass fields, choices are checked by one rule,
presets derive from each other, and moved fields of old configs still load."""

from __future__ import annotations

import argparse
import dataclasses
import logging

import pytest

from allattn import runtime
from allattn.cli import build_parser, main
from allattn.config import ConfigError, RunConfig, RuntimeConfig, load_preset
from allattn.metrics import MetricsLog, bits, perplexity


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_flag_comes_from_a_settings_field():
    from allattn.cli import RUN_SECTIONS, _bench_commands, _commands

    parsers = _subparsers(build_parser())
    benches = _subparsers(parsers["bench"])
    for command, parser in [(c, parsers[c.name]) for c in _commands()] + [
        (c, benches[c.name]) for c in _bench_commands()
    ]:
        dests = {a.dest for a in parser._actions if a.dest != "help"}
        fields = {f.name for cls in command.settings for f in dataclasses.fields(cls)}
        sections = {
            f"{cls.section}.{f.name}" for cls in command.sections for f in dataclasses.fields(cls)
        }
        assert dests == fields | sections | {"quiet"}, command.name
        if command.sections:
            assert set(command.sections) <= set(RUN_SECTIONS)


def test_choices_are_checked_by_one_rule_naming_the_flag():
    with pytest.raises(ConfigError, match=r"--runtime.attn_impl \(fast\) must be one of auto, "):
        RuntimeConfig(attn_impl="fast")
    with pytest.raises(ConfigError, match=r"--runtime.precision \(float16\) must be one of fp32"):
        RunConfig().override({"runtime.precision": "float16"})


def test_a_preset_extends_another_and_the_twins_are_deltas(tmp_path):
    tiny, twin = load_preset("tiny"), load_preset("tiny_ff")
    assert (twin.model.n_persistent, twin.model.d_inner) == (0, 128)
    assert twin.replace(model=tiny.model) == tiny  # nothing else differs
    large = load_preset("enwik8_large")
    small = load_preset("enwik8_small")
    assert large.optim == small.optim and large.model.d_model == small.model.d_model
    mine = tmp_path / "mine.toml"
    mine.write_text('extends = "tiny"\n[train]\nsteps = 7\n')
    derived = load_preset(str(mine))
    assert derived.train.steps == 7 and derived.model == tiny.model
    child = tmp_path / "child.toml"
    child.write_text('extends = "mine.toml"\n[model]\nn_layers = 2\n')  # relative to the file
    assert load_preset(str(child)).model.n_layers == 2
    assert load_preset(str(child)).train.steps == 7


def test_unknown_base_and_cycles_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    (tmp_path / "c.toml").write_text('extends = "enwik9"\n')
    assert main(["train", "--preset", str(tmp_path / "a.toml"), "--print-config"]) == 2
    assert "extends itself" in one_line(capsys)
    assert main(["train", "--preset", str(tmp_path / "c.toml"), "--print-config"]) == 2
    assert "unknown preset 'enwik9'" in one_line(capsys)


def test_print_config_shows_the_resolved_derived_preset(capsys):
    assert main(["train", "--preset", "enwik8_large_ff", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "extends" not in out and "[runtime]" in out
    assert "n_layers = 36" in out and "d_inner = 2048" in out and "n_persistent = 0" in out
    assert "114,146,797 parameters" in out


def test_fields_that_moved_to_runtime_still_load():
    old = load_preset("tiny").to_dict()
    runtime_section = old.pop("runtime")
    old["train"] |= {"device": "cpu", "dtype": "bfloat16"}  # as older runs wrote it
    old["model"]["attn_impl"] = "reference"
    config = RunConfig.from_dict(old)
    assert config.runtime == RuntimeConfig(device="cpu", attn_impl="reference", precision="bf16")
    assert "precision" in runtime_section and "dtype" not in runtime_section
    runtime_section["dtype"] = "float64"  # runtime.dtype, the name before runtime.precision
    del runtime_section["precision"]
    assert RunConfig.from_dict({"runtime": runtime_section}).runtime.precision == "fp64"


def test_auto_kernel_is_chosen_and_logged_with_its_reason(caplog):
    assert runtime.choose_attn_impl("auto", "fp32")[0] == "chunked"
    assert runtime.choose_attn_impl("auto", "bf16")[0] == "chunked"
    assert runtime.choose_attn_impl("reference", "bf16") == ("reference", "asked for")
    chosen = runtime.resolve(RuntimeConfig(device="cpu", precision="bf16"))
    with caplog.at_level(logging.INFO):
        chosen.log()
    assert "attention kernel: chunked (auto in bf16" in caplog.text


def test_metrics_conversions_and_log(tmp_path):
    assert bits(2 * 0.6931471805599453) == pytest.approx(2.0)
    assert perplexity(0.0) == 1.0 and perplexity(1000.0) == float("inf")
    log = MetricsLog(tmp_path)
    for step in (4, 8, 12):
        log.append({"step": step, "valid_loss": 1.0 / step})
    log.truncate(8)
    assert [r["step"] for r in log.records()] == [4, 8]
