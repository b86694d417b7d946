"""Process start: one process, or each rank under torchrun (`dist.py`); clean stop on signals (`signals.py`)."""
