"""A layout: the parallel degrees and the choices that change memory, time and traffic.

The planner enumerates `Layout`s, costs them and writes the chosen one back as a config's
`parallel` section (plus `train.micro_batch_size`, which sets the micro-batches).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Layout:
    dp: int
    sp: int = 1
    ep: int = 1
    pp: int = 1
    dp_backend: str = "ddp"  # ddp | fsdp | zero
    zero_stage: int = 1
    pp_schedule: str = "1f1b"
    pp_virtual_stages: int = 2
    microbatches: Any = "auto"  # pipeline micro-batches per schedule run
    micro_batch_size: int = 1  # sequences per rank per forward
    activation_checkpointing: bool = False  # modelled only: recompute each block's forward in backward

    @property
    def world(self) -> int:
        return self.dp * self.sp * self.pp

    @property
    def virtual(self) -> int:
        return self.pp_virtual_stages if self.pp > 1 and self.pp_schedule == "interleaved" else 1

    def accumulation(self, batch_size: int) -> int:
        """Micro-batches per rank per optimizer step."""
        return batch_size // (self.micro_batch_size * self.dp)

    def pipeline_microbatches(self, batch_size: int) -> int:
        """Micro-batches per schedule run (as `phalanx.parallel.pipeline.pipeline_microbatches`)."""
        return self.accumulation(batch_size) if self.microbatches == "auto" else int(self.microbatches)

    def name(self) -> str:
        parts = [f"dp{self.dp}"] + [f"{k}{getattr(self, k)}" for k in ("sp", "ep", "pp") if getattr(self, k) > 1]
        backend = self.dp_backend + (str(self.zero_stage) if self.dp_backend == "zero" else "")
        extra = [backend] if self.dp * self.sp > 1 else []
        if self.pp > 1:
            extra.append(self.pp_schedule + (f"x{self.pp_virtual_stages}" if self.virtual > 1 else ""))
        extra.append(f"mb{self.micro_batch_size}")
        if self.activation_checkpointing:
            extra.append("ac")
        return " ".join(["x".join(parts), *extra])

    @staticmethod
    def from_config(cfg: Any) -> "Layout":
        """The layout a validated config describes (parallel.dp resolved)."""
        p = cfg.parallel
        return Layout(dp=int(p.dp), sp=p.sp, ep=p.ep, pp=p.pp, dp_backend=p.dp_backend, zero_stage=p.zero_stage,
                      pp_schedule=p.pp_schedule, pp_virtual_stages=p.pp_virtual_stages, microbatches=p.microbatches,
                      micro_batch_size=cfg.train.micro_batch_size)

    def apply(self, cfg: Any) -> Any:
        """A copy of `cfg` running this layout."""
        out = copy.deepcopy(cfg)
        p = out.parallel
        p.dp, p.sp, p.ep, p.pp = self.dp, self.sp, self.ep, self.pp
        p.dp_backend, p.zero_stage, p.pp_schedule = self.dp_backend, self.zero_stage, self.pp_schedule
        p.pp_virtual_stages, p.microbatches = self.pp_virtual_stages, self.microbatches
        out.train.micro_batch_size = self.micro_batch_size
        return out

    def overrides(self) -> list[str]:
        """`section.key=value` overrides that select this layout on top of any config."""
        return [f"parallel.dp={self.dp}", f"parallel.sp={self.sp}", f"parallel.ep={self.ep}", f"parallel.pp={self.pp}",
                f"parallel.dp_backend={self.dp_backend}", f"parallel.zero_stage={self.zero_stage}",
                f"parallel.pp_schedule={self.pp_schedule}", f"parallel.pp_virtual_stages={self.pp_virtual_stages}",
                f"parallel.microbatches={self.microbatches}", f"train.micro_batch_size={self.micro_batch_size}"]

    def with_(self, **changes: Any) -> "Layout":
        return replace(self, **changes)
