"""Data: datasets map a global sample index to tokens; `DataPosition` shards and resumes them.

The package imports no torch itself (the datasets load it when first used): `phalanx data prepare`'s worker
processes import `phalanx.data.tokenizer`, and each would otherwise pay torch's seconds of import for nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Protocol

if TYPE_CHECKING:
    import torch

    from phalanx.data.memmap import MemmapTokens
    from phalanx.data.synthetic import SyntheticTokens


class TokenDataset(Protocol):
    def batch(self, indices: list[int], split: str = "train") -> torch.Tensor: ...


def build_dataset(cfg) -> TokenDataset:
    """The dataset named by `cfg.data.kind` (config validated)."""
    from phalanx.data.memmap import MemmapTokens
    from phalanx.data.synthetic import SyntheticTokens

    d = cfg.data
    if d.kind == "synthetic":
        return SyntheticTokens(cfg.model.vocab_size, d.seq_len, cfg.run.seed, d.noise)
    return MemmapTokens(d.path, d.seq_len, cfg.run.seed, d.val_fraction, cfg.model.vocab_size, d.dtype)


def validate_data(cfg) -> None:
    """The checks of `cfg.data` that read its files (`phalanx.parallel.validate` calls this before any process
    group): a memmap source whose vocabulary does not fit `model.vocab_size` is refused here, not at step 0."""
    if cfg.data.kind == "memmap":
        from phalanx.data.memmap import check_vocab

        check_vocab(cfg.data.path, cfg.model.vocab_size)


def __getattr__(name: str) -> Any:
    if name == "MemmapTokens":
        from phalanx.data.memmap import MemmapTokens

        return MemmapTokens
    if name == "SyntheticTokens":
        from phalanx.data.synthetic import SyntheticTokens

        return SyntheticTokens
    raise AttributeError(f"module 'phalanx.data' has no attribute {name!r}")


class DataPosition:
    """The sampler: which samples each rank reads, with the position as its whole state.

    Step s reads global samples [c, c + batch_size) where c counts samples consumed so far;
    data-parallel rank r takes the r-th contiguous slice and cuts it into micro-batches. The
    global batch is therefore the same for any dp degree, which is what parity tests rely on.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        assert batch_size % (micro_batch_size * dp_size) == 0, "validate() checks batch divisibility"
        self.dataset = dataset
        self.batch_size, self.micro, self.dp_rank, self.dp_size = batch_size, micro_batch_size, dp_rank, dp_size
        self.consumed = 0

    @property
    def accumulation(self) -> int:
        return self.batch_size // (self.micro * self.dp_size)

    def next_step(self) -> list[torch.Tensor]:
        """This rank's micro-batches for one optimizer step, each (micro, seq_len + 1)."""
        local = self.batch_size // self.dp_size
        first = self.consumed + self.dp_rank * local
        out = [self.dataset.batch(list(range(first + i, first + i + self.micro)))
               for i in range(0, local, self.micro)]
        self.consumed += self.batch_size
        return out

    def eval_batches(self, n: int) -> Iterator[torch.Tensor]:
        """The same `n` validation micro-batches at every eval, sharded over dp."""
        for b in range(n):
            first = (b * self.dp_size + self.dp_rank) * self.micro
            yield self.dataset.batch(list(range(first, first + self.micro)), split="val")

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])


__all__ = ["build_dataset", "validate_data", "DataPosition", "SyntheticTokens", "MemmapTokens"]
