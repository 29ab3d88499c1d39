"""Layer 6: the training loop (``train``), its metrics and plots. Configs live in ``gift_megatron.config``."""

from gift_megatron.trainer.loop import Trainer, train
from gift_megatron.trainer.metrics import MetricsLogger, plot_run, read_metrics

__all__ = ["MetricsLogger", "Trainer", "plot_run", "read_metrics", "train"]
