"""What a snapshot copies and how: the source tensors and skeleton of the state (`SnapshotSources`, cached
while the state is updated in place) and the copies into a keeper slot's views (`SlotCopier`: CPU copies
on the snapshot thread, GPU copies on a side stream into page-locked memory)."""

from __future__ import annotations

import ctypes
import json
from typing import Any, Callable, Optional

import torch

from phalanx.checkpoint.flat import FlatLayout, encode_values, flatten_state_dict, local_chunk, mapping_json
from phalanx.errors import PhalanxError

StateFn = Callable[[], dict[str, Any]]


class SnapshotSources:
    """The tensors a snapshot copies and the skeleton it writes, from `state_fn()` or from a cache.

    The cache skips the full `state_fn()` per snapshot when it is safe: parameters and optimizer moments
    are updated in place, so the tensors a state dict points at are the same every step. Two calls must
    return the same storage for every tensor outside `light_fn()`'s keys, and `light_fn()` must cover
    every other value (step, schedule, data position, RNG, the optimizer's param_groups); back ends that
    hand out copies (ZeRO-3 gathers) keep the full call."""

    def __init__(self, state_fn: StateFn, light_fn: Optional[StateFn]):
        self.state_fn, self.light_fn = state_fn, light_fn
        self.layout: Optional[FlatLayout] = None
        self.cache: Optional[dict[str, Any]] = None
        self._snapshots = 0

    def reset(self, layout: FlatLayout, state: dict[str, Any]) -> None:
        """A new layout, measured from `state`: find the cacheable sources again."""
        self.layout = layout
        self.cache = self._cacheable(state)

    def state_replaced(self) -> None:
        """After a load: optimizers load into new tensors, so the cached sources are found again."""
        if self.light_fn is not None:
            self.cache = self._cacheable(self.state_fn())

    def release(self) -> None:
        """Let go of the trainer (the state functions reach the model and its process groups)."""
        self.state_fn = self.light_fn = None  # type: ignore[assignment]
        self.cache = None

    def _cacheable(self, state: dict[str, Any]) -> Optional[dict[str, Any]]:
        if self.light_fn is None:
            return None
        light, _ = flatten_state_dict(self.light_fn())
        flat, _ = flatten_state_dict(state)
        again, _ = flatten_state_dict(self.state_fn())
        if not set(light) <= set(flat):
            return None
        for fqn, value in flat.items():
            if fqn in light:
                continue
            if isinstance(value, torch.Tensor):
                mine, other = local_chunk(value)[0], local_chunk(again[fqn])[0]
                if mine.data_ptr() != other.data_ptr() or mine.shape != other.shape:
                    return None
            elif fqn not in again or encode_values({fqn: value}) != encode_values({fqn: again[fqn]}):
                return None
        if encode_values({k: v for k, v in light.items()}) != encode_values({k: flat[k] for k in light}):
            return None  # the light values must be the very ones the state dict holds
        index = {leaf.fqn: i for i, leaf in enumerate(self.layout.leaves)}
        return {"values": encode_values(flat), "sources": self.layout.tensors(state),
                "volatile": {fqn: index[fqn] for fqn, v in light.items() if isinstance(v, torch.Tensor)},
                "mapping": mapping_json(state)}

    def take(self, block: torch.Tensor, state: Optional[dict[str, Any]] = None
             ) -> tuple[list[torch.Tensor], Optional[Callable[[], None]]]:
        """(tensors to copy into `block`, the skeleton writer for the background worker, or None when the
        skeleton is already written). With cached sources the training thread only captures the
        changing values (`light_fn()`); encoding them is left to the worker."""
        self._snapshots += 1
        if self.cache is not None and self._snapshots % 100 == 0:  # re-check the in-place assumption
            self.cache = self._cacheable(self.state_fn())
        if self.cache is None:
            state = state if state is not None else self.state_fn()
            if not self.layout.matches(state):
                raise PhalanxError("the trainer state changed shape between steps; snapshots need a fixed layout "
                                   "(a strategy that adds state lazily must create it before the first step)")
            self.layout.write_skeleton(block, state)
            return self.layout.tensors(state), None
        cache, layout = self.cache, self.layout
        light, _ = flatten_state_dict(self.light_fn())
        sources = list(cache["sources"])
        for fqn, i in cache["volatile"].items():
            sources[i] = local_chunk(light[fqn])[0]

        def write_skeleton() -> None:
            values = {**cache["values"], **encode_values(light)}
            layout.write_skeleton_bytes(block, b'{"values":' + json.dumps(values, separators=(",", ":")).encode()
                                        + b',"mapping":' + cache["mapping"] + b"}")

        return sources, write_skeleton


class SlotCopier:
    """Copies source tensors into a slot's views: on a GPU on a side stream, after the point of the
    compute stream `ready_point()` marked; on a CPU serially on the calling thread."""

    def __init__(self, device: torch.device):
        self.device = device
        self._stream: Optional[Any] = None  # the side stream of device-to-host snapshot copies (GPU)
        self._copied_event: Optional[Any] = None

    def ready_point(self) -> Optional[Any]:
        """On a GPU: an event at this point of the compute stream (this step's update), else None."""
        if self.device.type != "cuda":
            return None
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        return ready

    def copy(self, views: list[torch.Tensor], sources: list[torch.Tensor], ready: Optional[Any]) -> None:
        """Copy `sources` into `views`; returns when the copies are done."""
        if ready is None:
            copy_serial(views, sources)
            return
        self._copy_from_device(views, sources, ready)
        self._copied_event.synchronize()  # a blocking-sync event: this thread sleeps, it does not spin

    def _copy_from_device(self, views: list[torch.Tensor], sources: list[torch.Tensor], ready: Any) -> None:
        """Queue the device-to-host copies on the snapshot stream, after `ready`. Launched here, off the
        training thread (a thousand launches cost it milliseconds a step); the next optimizer step waits
        for the copy all the same."""
        with torch.cuda.device(self.device):
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
                self._copied_event = torch.cuda.Event(blocking=True)
            self._stream.wait_event(ready)
            with torch.cuda.stream(self._stream), torch.no_grad():  # no detach(): fewer Python objects per step
                torch._foreach_copy_(views, sources, non_blocking=True)
                self._copied_event.record(self._stream)


def copy_serial(views: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """CPU copies on this one thread, outside the GIL: `Tensor.copy_` would start an intra-op thread team of
    its own beside the training thread's, and the two teams then fight over the cores every step."""
    for view, source in zip(views, sources):
        source = source.detach()
        if source.is_contiguous() and source.device.type == "cpu" and source.dtype == view.dtype:
            ctypes.memmove(view.data_ptr(), source.data_ptr(), view.numel() * view.element_size())
        else:
            view.copy_(source)
