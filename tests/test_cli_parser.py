"""The ``lit_sft`` command line as a user meets it: help for every key, ``lit_sft --help`` saying what lit_sft is,
one-line errors naming the closest key, YAML errors naming the file, and every key from the environment
(``LIT_SFT_FIT__MODEL__LEARNING_RATE``) with the command line still winning."""

from __future__ import annotations

import inspect

import pytest
import yaml

from conftest import ROOT


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _run(capsys, *args: str) -> tuple[int, str, str]:
    from lit_sft.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def _fit_parser():
    """The parser of ``lit_sft fit`` as ``main`` builds it (stopped before parsing)."""
    from lit_sft.cli import SFTCLI
    from lit_sft.data.datamodule import SFTDataModule
    from lit_sft.module import SFTModule

    class Built(Exception):
        pass

    class ParserOnly(SFTCLI):
        def parse_arguments(self, parser, args):
            raise Built()

    cli = ParserOnly.__new__(ParserOnly)
    with pytest.raises(Built):
        ParserOnly.__init__(cli, SFTModule, SFTDataModule, args=["fit"], auto_configure_optimizers=False)
    return cli._subcommand_parsers["fit"]


def test_every_key_has_its_own_help():
    """``run.push_to_hub``, ``hub_model_id``, ``hub_strategy``, ``hub_private_repo``, the AdamW constants and the
    strategy's ZeRO-3 knobs had none (their docstring grouped several keys in one line)."""
    from jsonargparse import ArgumentParser

    from lit_sft.strategy import SFTDeepSpeedStrategy

    parser = _fit_parser()
    keys = [a for a in parser._actions if a.option_strings]  # every key of lit_sft fit: run, model, data, trainer
    assert len([a for a in keys if a.dest.split(".")[0] in ("run", "model", "data")]) > 60
    missing = [a.dest for a in keys if not (a.help or "").strip()]
    assert not missing, f"keys without help: {missing}"
    for key in ("run.push_to_hub", "run.hub_model_id", "run.hub_strategy", "run.hub_private_repo"):
        assert next(a for a in keys if a.dest == key).help.strip()
    strategy = ArgumentParser()
    strategy.add_class_arguments(SFTDeepSpeedStrategy, "strategy")
    own = set(inspect.signature(SFTDeepSpeedStrategy.__init__).parameters) - {"self", "kwargs"}
    helps = {a.dest.split(".", 1)[1]: a.help for a in strategy._actions if a.dest.startswith("strategy.")}
    missing = sorted(name for name in own if not (helps.get(name) or "").strip())
    assert not missing, f"strategy keys without help: {missing}"


def test_top_level_help_says_what_lit_sft_is(capsys):
    from lit_sft.cli_parser import README_COMMANDS
    from lit_sft.commands import COMMANDS

    code, out, _ = _run(capsys, "--help")
    assert code == 0
    assert "Lightning Trainer command line tool" not in out
    assert "supervised fine-tuning" in out and "open-r1" in out
    for name in ["fit", *COMMANDS]:
        assert f"\n  {name} " in out, name  # every command, lit_sft's own included
    for line in README_COMMANDS:
        assert line.split("#")[0].strip() in out
    assert "--recipe" in out and "LIT_SFT_FIT__" in out


@pytest.mark.parametrize("args, suggestion", [
    (["--model.learnig_rate", "1e-3"], "model.learning_rate"),
    (["--data.per_device_train_batchsize", "4"], "data.per_device_train_batch_size"),
    (["--run.hub_modelid", "me/x"], "run.hub_model_id")])
def test_misspelled_key_is_one_line_with_the_closest_key(capsys, args, suggestion):
    code, out, err = _run(capsys, "fit", "--config", "configs/tiny_cpu.yaml", *args, "--print_config")
    assert code == 2 and not out
    lines = err.strip().splitlines()
    assert len(lines) == 3, err  # the error, the suggestion, the pointer to --help: no usage
    assert lines[0].startswith("error: ") and args[0].lstrip("-") in lines[0]
    assert lines[1] == f"Did you mean {suggestion}?"
    assert "lit_sft fit --help" in lines[2]


def test_misspelled_key_in_a_config_file_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"learnig_rate": 1e-3}}))
    code, _, err = _run(capsys, "fit", "--config", "configs/tiny_cpu.yaml", "--config", str(bad), "--print_config")
    assert code == 2 and len(err.strip().splitlines()) == 3, err
    assert "learnig_rate" in err and "Did you mean model.learning_rate?" in err


def test_yaml_error_names_the_file(capsys, tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  learning_rate: [1e-3\n")
    code, _, err = _run(capsys, "fit", "--config", "configs/tiny_cpu.yaml", "--config", str(bad), "--print_config")
    assert code == 2
    assert str(bad) in err and "<unicode string>" not in err and "line 3" in err
    section = tmp_path / "model.yaml"  # a section file
    section.write_text("learning_rate: [1e-3\n")
    code, _, err = _run(capsys, "fit", "--config", "configs/tiny_cpu.yaml", "--model", str(section), "--print_config")
    assert code == 2 and f'in "{section}", line 1' in err and "<unicode string>" not in err


def test_environment_variables_set_keys_and_the_command_line_wins(capsys, monkeypatch):
    monkeypatch.setenv("LIT_SFT_FIT__MODEL__WEIGHT_DECAY", "0.25")
    monkeypatch.setenv("LIT_SFT_FIT__RUN__RUN_NAME", "job-123")
    monkeypatch.setenv("LIT_SFT_FIT__DATA__NUM_WORKERS", "3")  # tiny_cpu.yaml sets 0: the config wins
    code, out, err = _run(capsys, "fit", "--config", "configs/tiny_cpu.yaml", "--print_config")
    assert code == 0, err
    printed = yaml.safe_load(out)
    assert printed["model"]["weight_decay"] == 0.25 and printed["run"]["run_name"] == "job-123"
    assert printed["data"]["num_workers"] == 0
    code, out, _ = _run(capsys, "fit", "--config", "configs/tiny_cpu.yaml", "--model.weight_decay", "0.5",
                        "--print_config")
    assert yaml.safe_load(out)["model"]["weight_decay"] == 0.5  # the command line wins over the environment
    # the config itself from the environment, as a job script sets it (README)
    monkeypatch.setenv("LIT_SFT_FIT__CONFIG", "configs/tiny_cpu.yaml")
    code, out, err = _run(capsys, "fit", "--run.output_dir", "elsewhere", "--print_config")
    assert code == 0, err
    printed = yaml.safe_load(out)
    assert printed["model"]["learning_rate"] == 3e-3 and printed["run"]["output_dir"] == "elsewhere"
    assert printed["model"]["weight_decay"] == 0.25


def test_misspelled_environment_variable_is_an_error(capsys, monkeypatch):
    """A ``LIT_SFT_FIT__*`` variable that names no key was ignored silently; now it stops the run naming it."""
    monkeypatch.setenv("LIT_SFT_FIT__MODEL__LEARNIN_RATE", "1e-5")
    code, _, err = _run(capsys, "fit", "--config", "configs/tiny_cpu.yaml", "--print_config")
    assert code == 2, err
    assert ("error: environment variable LIT_SFT_FIT__MODEL__LEARNIN_RATE is not a key of `lit_sft fit`; "
            "did you mean LIT_SFT_FIT__MODEL__LEARNING_RATE?") in err, err


def test_help_names_each_keys_environment_variable(capsys):
    code, out, _ = _run(capsys, "fit", "--help")
    assert code == 0
    assert "LIT_SFT_FIT__MODEL__LEARNING_RATE" in out and "LIT_SFT_FIT__RUN__PUSH_TO_HUB" in out
