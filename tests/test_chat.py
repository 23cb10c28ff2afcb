"""``lit_sft chat`` (``lit_sft/chat.py``): the answer is what plain ``model.generate`` gives on the chat-template
rendering of the conversation (greedy), and generation stops at the end-of-turn token ``<|im_end|>``.

Two tiny Qwen2 models (fp32, CPU): a random one (it never emits ``<|im_end|>``: the answer runs to
``max_new_tokens``), and a "chain" model whose decoder layers add nothing (``o_proj`` and ``down_proj`` zero), so the
next token depends on the current one only, and whose ``lm_head`` makes the greedy continuation of the generation
prompt's last token ``A B C <|im_end|>``: chat must answer exactly ``A B C`` and stop.
"""

from __future__ import annotations

import io
import re

import pytest
import torch

from sft_helpers import QWEN_TOKENIZER

IM_END = "<|im_end|>"
CHAIN = ["The", " answer", "."]  # one token each


def _save(model, tokenizer, path) -> str:
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    model.generation_config.eos_token_id = [im_end, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import TINY_QWEN2
    from lit_sft.data.loading import load_tokenizer

    tmp = tmp_path_factory.mktemp("chat")
    tokenizer = load_tokenizer(QWEN_TOKENIZER)
    config = AutoConfig.for_model(**{**TINY_QWEN2, "tie_word_embeddings": False})
    torch.manual_seed(0)
    random = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    torch.manual_seed(1)
    chain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for layer in chain.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head, embed = chain.lm_head.weight, chain.model.embed_tokens.weight
        head.zero_()
        prompt_end = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                   return_dict=True)["input_ids"][-1]
        chain_ids = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(piece)) for piece in CHAIN]
        assert all(len(ids) == 1 for ids in chain_ids)
        chain_ids = [ids[0] for ids in chain_ids]
        path = [prompt_end, *chain_ids, tokenizer.convert_tokens_to_ids(IM_END)]
        for prev, nxt in zip(path, path[1:]):
            head[nxt] = 10 * embed[prev] / embed[prev].norm()
    return {"tokenizer": tokenizer, "chain_ids": chain_ids,
            "random": _save(random, tokenizer, tmp / "random"), "chain": _save(chain, tokenizer, tmp / "chain"),
            "chain_state": {k: v.clone() for k, v in chain.state_dict().items()}, "tmp": tmp}


def _reference(folder: str, messages: list[dict], max_new_tokens: int) -> tuple[str, list[int]]:
    """Plain transformers: the folder's model and tokenizer, the template rendered to text, greedy ``generate``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), new


def _chat(capsys, *args: str) -> str:
    from lit_sft.cli import main

    capsys.readouterr()
    main(["chat", "--device", "cpu", "--do_sample", "false", *args])
    return capsys.readouterr().out


@pytest.mark.parametrize("stream", ["false", "true"])
def test_one_shot_is_greedy_generate_on_the_rendered_template(capsys, models, stream):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6 * 7?"}]
    expected, new = _reference(models["random"], messages, 12)
    assert len(new) == 12 and models["tokenizer"].convert_tokens_to_ids(IM_END) not in new
    out = _chat(capsys, "--model_dir", models["random"], "--prompt", "What is 6 * 7?", "--system", "Be brief.",
                "--max_new_tokens", "12", "--stream", stream)
    assert out == expected + "\n"


def test_stops_at_im_end(capsys, models):
    from lit_sft.chat import Chat, load_folder

    messages = [{"role": "user", "content": "What is 6 * 7?"}]
    expected, new = _reference(models["chain"], messages, 20)
    im_end = models["tokenizer"].convert_tokens_to_ids(IM_END)
    assert new == models["chain_ids"] + [im_end]  # the reference itself stops at the EOS
    assert expected == "".join(CHAIN)
    out = _chat(capsys, "--model_dir", models["chain"], "--prompt", "What is 6 * 7?", "--max_new_tokens", "20")
    assert out == "The answer.\n"

    session = Chat(*load_folder(models["chain"], torch.device("cpu")), max_new_tokens=20, do_sample=False)
    session.messages.append({"role": "user", "content": "What is 6 * 7?"})
    assert session.generate() == models["chain_ids"] + [im_end]


def test_checkpoint_gives_the_same_answer_as_the_folder(capsys, models, tmp_path):
    """A Lightning ``.ckpt`` of the chain model (``state_dict`` keys ``model.*``) in the config's architecture."""
    import yaml

    from conftest import TINY_QWEN2

    ckpt = tmp_path / "step-000001.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in models["chain_state"].items()}, "global_step": 1}, ckpt)
    config = {"model": {"model_name_or_path": None, "random_init": True, "torch_dtype": "float32",
                        "model_config": {**TINY_QWEN2, "tie_word_embeddings": False}},
              "data": {"dataset_name": "unused.jsonl", "tokenizer_name_or_path": QWEN_TOKENIZER}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    out = _chat(capsys, "--config", str(tmp_path / "run.yaml"), "--ckpt_path", str(ckpt), "--prompt", "Hello?",
                "--max_new_tokens", "20")
    assert out == "The answer.\n"


def test_conversation_keeps_the_history(models):
    """Two turns, a reset, one more: each answer is greedy generate on the template rendering of the conversation so
    far (the earlier answers included, none after ``/reset``)."""
    from lit_sft.chat import Chat, interactive, load_folder

    session = Chat(*load_folder(models["random"], torch.device("cpu")), system="Be brief.", max_new_tokens=6,
                   do_sample=False)
    lines = iter(["What is 6 * 7?", "And 6 * 8?", "/reset", "Hello", "/exit", "never read"])
    out = io.StringIO()
    interactive(session, stream=False, read=lambda _: next(lines), out=out)
    system = {"role": "system", "content": "Be brief."}
    first, _ = _reference(models["random"], [system, {"role": "user", "content": "What is 6 * 7?"}], 6)
    second, _ = _reference(models["random"], [system, {"role": "user", "content": "What is 6 * 7?"},
                                              {"role": "assistant", "content": first},
                                              {"role": "user", "content": "And 6 * 8?"}], 6)
    third, _ = _reference(models["random"], [system, {"role": "user", "content": "Hello"}], 6)
    assert out.getvalue().split("assistant> ")[1:] == [first + "\n", second + "\n", third + "\n"]
    assert next(lines) == "never read"


def test_no_model_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from lit_sft.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--prompt", "hi", "--run.output_dir", str(tmp_path / "none")])
    assert exit_info.value.code == 2
    assert re.search(r"^error: no model to chat with.*--model_dir", capsys.readouterr().err, re.M)
