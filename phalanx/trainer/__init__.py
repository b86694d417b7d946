"""Trainer: build -> loop -> hooks; optimizer and LR schedule; metrics; trackers."""

from phalanx.trainer.trainer import Trainer

__all__ = ["Trainer"]
