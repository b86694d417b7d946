"""phalanx: a PyTorch training framework with composable parallelism and one-step fault tolerance.

`import phalanx` loads torch and omegaconf only; ray, deepspeed and wandb are imported where used.
"""

__version__ = "0.1.0"
