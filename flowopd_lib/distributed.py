"""Collectives that every rank calls alike, whatever its local data.

The one rule of distributed code here: every collective runs the same number of times, in the same
order, with the same shapes on every rank. A loop whose trip count depends on a rank's own data (the
tasks it happens to hold, the metrics it happened to compute, whether it ran a micro-batch at all)
around a collective pairs one rank's all-reduce with another rank's different one: a hang, or worse,
silently mixed values (a KL summed with a non-finite flag). So:

    iterate over GLOBAL lists (the config's tasks, `union` of every rank's metric names), never over
    what this rank holds; contribute zeros where this rank has nothing;
    reduce many values in ONE collective (`sum_named` stacks them) rather than one call per value.

`Collectives` wraps an accelerate `Accelerator` (any object with num_processes, process_index,
device, reduce and gather); with one process every call is the identity and nothing is sent.
Tested on real gloo ranks with uneven work (tests/test_ranks.py, tests/test_distributed.py).
"""
from __future__ import annotations

from typing import Iterable

import torch


class Collectives:
    """Sum, gather and name-union across the processes of an accelerate `Accelerator`."""

    def __init__(self, accelerator):
        self.acc = accelerator

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def device(self) -> torch.device:
        return self.acc.device

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce sum of a tensor of the same shape on every rank."""
        return self.acc.reduce(t.to(self.device), reduction="sum") if self.world > 1 else t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor concatenated along dim 0, in rank order (shapes must agree)."""
        return self.acc.gather(t.to(self.device)) if self.world > 1 else t

    def gather_objects(self, items: list) -> list:
        """Every rank's list of picklable items, concatenated in rank order (any lengths, even 0)."""
        if self.world == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def union(self, names: Iterable[str]) -> list[str]:
        """Sorted names that any rank has: the global list to iterate over (one collective)."""
        return sorted(set(self.gather_objects(sorted(set(names)))))

    def any(self, flag: bool) -> bool:
        """Whether any rank's flag is set (one collective)."""
        return bool(self.sum(torch.tensor(float(flag), device=self.device)) > 0)

    def sum_named(self, local: dict[str, torch.Tensor | float], names: list[str]) -> dict[str, torch.Tensor]:
        """{name: global sum} for every name of the GLOBAL list `names` (identical on every rank),
        each value a scalar; a name this rank lacks counts 0. One all-reduce of len(names) values."""
        values = [torch.as_tensor(local.get(n, 0.0), dtype=torch.float32, device=self.device).reshape(())
                  for n in names]
        if not values:
            return {}
        total = self.sum(torch.stack(values))
        return dict(zip(names, total.unbind()))

