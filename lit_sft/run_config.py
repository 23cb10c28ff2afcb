"""The run's ``logs/config.yaml``, written when training starts (after a checkpoint was restored)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import SaveConfigCallback


class RunConfigCallback(SaveConfigCallback):
    """LightningCLI's :class:`~lightning.pytorch.cli.SaveConfigCallback`, moved from ``setup`` to ``on_train_start``.

    Lightning writes the config in ``setup``, before the checkpoint is restored: a rerun refused on resume (a
    checkpoint of another shape or adapter) overwrote the run's config with the refused settings, and the recovery
    command ``lit_sft export --config <run>/logs/config.yaml`` failed afterwards. Written here, the file holds the
    settings of the last run that trained. :attr:`training_started` tells ``lit_sft.cli.main`` whether an error came
    before training (input to fix: one line) or during it (a traceback).
    """

    training_started = False

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Nothing yet: see :meth:`on_train_start`."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        RunConfigCallback.training_started = True
        super().setup(trainer, pl_module, "fit")
