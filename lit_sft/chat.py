"""``lit_sft chat``: talk to a fine-tuned model with its chat template, the quickest check that it stops at its
end-of-turn token.

The model is an exported Hugging Face folder (``run.output_dir`` of a finished run, or ``--model_dir``), or a
checkpoint (``--ckpt_path``: the weights go into the architecture of the config's ``model:`` section through
:func:`lit_sft.export.checkpoint_state_dict`, the path ``lit_sft export`` takes; the tokenizer is ``data:``'s).
Each turn is rendered with ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` and generated with
transformers' ``generate``, which stops at the generation config's EOS (``<|im_end|>`` in a lit_sft export, see
:func:`lit_sft.export.prepare_generation_config`) or after ``max_new_tokens``. On a terminal the reply is streamed
token by token (transformers' ``TextStreamer``); ``--prompt`` answers once and exits.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Optional, TextIO

import torch
from transformers import TextStreamer

log = logging.getLogger(__name__)


class StreamTo(TextStreamer):
    """transformers' ``TextStreamer`` (the reply only, special tokens left out, text released at word boundaries)
    writing to ``out`` instead of ``print``; the reply ends with a newline."""

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU if there is one, else the CPU; otherwise ``torch.device(device)``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_folder(path: str, device: torch.device) -> tuple[Any, Any]:
    """Model and tokenizer of a Hugging Face folder (or hub id): the folder's dtype on a GPU, float32 on the CPU
    (bf16 matmuls are slow there).

    Raises:
        OSError: ``path`` holds no model (transformers' message).
    """
    from transformers import AutoModelForCausalLM

    from lit_sft.data.loading import load_tokenizer

    dtype = "auto" if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, load_tokenizer(path)


def load_checkpoint(ckpt_path: str, model_hparams: dict[str, Any], data_hparams: dict[str, Any]) -> tuple[Any, Any]:
    """Model (the config's architecture, the checkpoint's weights, loaded strictly) and the config's tokenizer.

    Raises:
        FileNotFoundError: no such checkpoint. RuntimeError: weights that do not fit the configured model.
    """
    from lit_sft.data.loading import load_tokenizer
    from lit_sft.export import checkpoint_state_dict
    from lit_sft.modeling import build_causal_lm

    state, step = checkpoint_state_dict(ckpt_path)
    hp = model_hparams
    model, _ = build_causal_lm(hp.get("model_name_or_path"), hp.get("model_revision"), hp.get("torch_dtype", "float32"),
                               "sdpa", hp.get("random_init", False), hp.get("model_config"))
    model.load_state_dict(state, strict=True)
    log.info("loaded %s (optimizer step %d)", ckpt_path, step)
    tokenizer = load_tokenizer(data_hparams["tokenizer_name_or_path"], data_hparams.get("tokenizer_revision"),
                               data_hparams.get("chat_template"), data_hparams.get("eos_token"))
    return model, tokenizer


class Chat:
    """A conversation with ``model``: each :meth:`reply` renders the history with the chat template and generates.

    Args:
        model: a transformers causal LM (moved to ``device``, in eval mode).
        tokenizer: its tokenizer, with a chat template.
        system: the system message, if any.
        max_new_tokens: the most tokens one reply may have.
        do_sample: sample instead of greedy decoding; ``None``: the generation config's choice.
        device: where the model runs.

    Raises:
        ValueError: the tokenizer has no chat template.
    """

    def __init__(self, model: Any, tokenizer: Any, system: Optional[str] = None, max_new_tokens: int = 512,
                 do_sample: Optional[bool] = None, device: torch.device = torch.device("cpu")) -> None:
        from lit_sft.export import prepare_generation_config

        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template: set data.chat_template, or chat with a folder whose "
                             "tokenizer_config.json / chat_template.jinja holds one")
        prepare_generation_config(model, tokenizer)  # EOS = the template's end of turn first, pad = the tokenizer's
        self.model, self.tokenizer, self.device = model.to(device).eval(), tokenizer, device
        self.max_new_tokens, self.do_sample = max_new_tokens, do_sample
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def generate(self, streamer: Any = None) -> list[int]:
        """Generate the assistant's next turn for :attr:`messages`; returns the new token ids (the EOS included when
        generation stopped at it)."""
        inputs = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True).to(self.device)
        kwargs = {} if self.do_sample is None else {"do_sample": self.do_sample}
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, streamer=streamer, **kwargs)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    def reply(self, text: str, stream: Optional[TextIO] = None) -> str:
        """Add the user's ``text``, generate the answer (streamed to ``stream`` if given) and add it to the history.

        Returns:
            The answer's text, special tokens (the EOS) left out.
        """
        self.messages.append({"role": "user", "content": text})
        ids = self.generate(StreamTo(self.tokenizer, stream) if stream is not None else None)
        answer = self.tokenizer.decode(ids, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": answer})
        if ids and ids[-1] not in self.eos_ids:
            log.warning("the reply hit max_new_tokens=%d before the end-of-turn token %r", self.max_new_tokens,
                        self.tokenizer.eos_token)
        return answer

    @property
    def eos_ids(self) -> list[int]:
        """The ids generation stops at (the generation config's EOS list)."""
        eos = self.model.generation_config.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])


def interactive(chat: Chat, stream: bool, read: Any = input, out: TextIO = sys.stdout) -> None:
    """A read-reply loop until end of input or ``/exit``; ``/reset`` forgets the conversation."""
    out.write("Chat with the model: /reset forgets the conversation, /exit (or Ctrl-D) quits.\n")
    while True:
        try:
            text = read("user> ")
        except EOFError:
            out.write("\n")
            return
        if text.strip() == "/exit":
            return
        if text.strip() == "/reset":
            chat.reset()
            continue
        out.write("assistant> ")
        out.flush()
        answer = chat.reply(text, out if stream else None)
        if not stream:
            out.write(answer + "\n")
        out.flush()


def default_model_dir(output_dir: Optional[str]) -> Optional[str]:
    """``output_dir`` if it holds an exported model (``config.json``), else ``None``."""
    if output_dir and os.path.isfile(os.path.join(output_dir, "config.json")):
        return output_dir
    return None
