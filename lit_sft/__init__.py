"""lit_sft: supervised fine-tuning of causal language models on PyTorch Lightning.

``SFTModule`` (the model and the loss) and ``SFTDataModule`` (the data pipeline) are the two public building blocks;
``lit_sft fit --config configs/qwen_zero3.yaml`` drives them through LightningCLI (``lit_sft/cli.py``).
"""

from lit_sft.data.datamodule import SFTDataModule
from lit_sft.module import SFTModule
from lit_sft.strategy import SFTDeepSpeedStrategy

__all__ = ["SFTDataModule", "SFTModule", "SFTDeepSpeedStrategy"]
__version__ = "0.1.0"
