"""lit_sft: supervised fine-tuning of causal language models on PyTorch Lightning.

``SFTModule`` (the model and the loss) and ``SFTDataModule`` (the data pipeline) are the two public building blocks;
``lit_sft fit --config configs/qwen_zero3.yaml`` drives them through LightningCLI (``lit_sft/cli.py``).
"""

from lit_sft.console import quiet_known_noise

quiet_known_noise()  # before any Trainer exists: see lit_sft/console.py

from lit_sft.data.datamodule import SFTDataModule  # noqa: E402
from lit_sft.evaluation import SFTEvaluation  # noqa: E402
from lit_sft.module import SFTModule  # noqa: E402
from lit_sft.progress import SFTProgressBar  # noqa: E402
from lit_sft.strategy import SFTDeepSpeedStrategy  # noqa: E402

__all__ = ["SFTDataModule", "SFTEvaluation", "SFTModule", "SFTProgressBar", "SFTDeepSpeedStrategy"]
__version__ = "0.1.0"
