"""Sum state of a dataset accumulator: named float64 / int64 tensors, one all-reduce, checked loading.

:class:`SumState` is the part of :class:`calibops.DatasetCalibration` that knows nothing about calibration: it
holds the sums, moves them between devices, sums them over ``torch.distributed`` ranks in **one** collective
and checks a loaded state dict entry by entry. Every quantity a metric keeps (pooled statistics, per-image
error sums, histograms, per-group and fine-bin sums) is one entry, so a new protocol adds entries, not code.

The one all-reduce packs every entry into a float64 buffer: integer counters are exact there up to 2**53
(images, bins and voxels of any real data set), and are rounded back to int64 afterwards.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SumState", "dist_ready"]


def dist_ready(process_group: Any) -> bool:
    """Whether ``torch.distributed`` is initialised with more than one rank in ``process_group``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(process_group) > 1


class SumState:
    """Named sum tensors, all zeros at :meth:`reset`.

    ``spec``: name -> (shape, dtype) with dtype ``torch.float64`` (sums) or ``torch.int64`` (counters).
    ``nan_ok``: names whose value may be NaN (a quantity unknown since a checkpoint that lacked it was loaded).
    """

    def __init__(self, spec: dict[str, tuple[tuple[int, ...], torch.dtype]], nan_ok: tuple[str, ...] = ()) -> None:
        self.spec = dict(spec)
        self.nan_ok = tuple(nan_ok)
        self.device = torch.device("cpu")
        self.tensors: dict[str, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        """Every entry back to zeros (on the current device)."""
        self.tensors = {k: torch.zeros(shape, dtype=dt, device=self.device) for k, (shape, dt) in self.spec.items()}

    def to(self, device: torch.device | str) -> None:
        """Move every entry to ``device``."""
        self.device = torch.device(device)
        self.tensors = {k: v.to(self.device) for k, v in self.tensors.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def commit(self, deltas: dict[str, torch.Tensor], device: torch.device | None = None) -> None:
        """Add every delta in one step: ``deltas`` must hold exactly the spec's entries with their shapes (a batch's
        :class:`~calibops.metrics.contribution.Contribution`). Everything that can fail (names, shapes, the moves
        to the state's device) happens before the first entry changes. ``device``: follow the batch there first."""
        if set(deltas) != set(self.spec):
            raise ValueError(f"a commit must hold every state entry {sorted(self.spec)}, got {sorted(deltas)}")
        for k, v in deltas.items():
            if tuple(v.shape) != tuple(self.spec[k][0]):
                raise ValueError(f"delta {k!r} has shape {tuple(v.shape)}, expected {tuple(self.spec[k][0])}")
        target = self.device if device is None else torch.device(device)
        ready = {k: v.to(dtype=self.spec[k][1], device=target) for k, v in deltas.items()}
        if target != self.device:
            self.to(target)
        for k, v in ready.items():
            self.tensors[k] += v

    def synced(self, process_group: Any = None) -> dict[str, torch.Tensor]:
        """The entries summed over every rank (one all-reduce); the local state is left untouched."""
        state = self.tensors
        if not dist_ready(process_group):
            return dict(state)
        import torch.distributed as dist

        dev = self.device
        if dist.get_backend(process_group) == "nccl" and dev.type != "cuda":
            dev = torch.device("cuda", torch.cuda.current_device())
        buf = torch.cat([v.reshape(-1).to(device=dev, dtype=torch.float64) for v in state.values()])
        dist.all_reduce(buf, group=process_group)
        out: dict[str, torch.Tensor] = {}
        off = 0
        for k, v in state.items():
            part = buf[off : off + v.numel()].view(v.shape)
            if v.dtype == torch.int64:
                part = part.round()
            out[k] = part.to(device=self.device, dtype=v.dtype)
            off += v.numel()
        return out

    def checked(self, state_dict: dict[str, Any], defaults: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
        """The entries of ``state_dict`` checked against the spec (present, shape, real, finite, >= 0, whole
        numbers for int64 entries), as CPU tensors; a violation is a ``ValueError`` naming the key. ``defaults``:
        entries a state dict may lack (written by an older version), filled with that value."""
        new: dict[str, torch.Tensor] = {}
        for k, (shape, dt) in self.spec.items():
            if k not in state_dict:
                if defaults is not None and k in defaults:
                    new[k] = torch.full(shape, defaults[k], dtype=dt)
                    continue
                raise ValueError(f"state_dict lacks {k!r}")
            try:
                v = torch.as_tensor(state_dict[k]).detach().cpu()
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ValueError(f"state_dict[{k!r}] is not a tensor of numbers ({exc})") from None
            if tuple(v.shape) != tuple(shape):
                raise ValueError(f"state_dict[{k!r}] has shape {tuple(v.shape)}, expected {tuple(shape)}")
            if v.dtype == torch.bool or v.is_complex():
                raise ValueError(f"state_dict[{k!r}] must hold real numbers, got {v.dtype}")
            v64 = v.double()
            known = ~torch.isnan(v64) if k in self.nan_ok else torch.ones_like(v64, dtype=torch.bool)
            if not bool(torch.isfinite(v64[known]).all()) or bool((v64[known] < 0).any()):
                raise ValueError(f"state_dict[{k!r}] must be finite and >= 0 (a sum of counts and errors)")
            if dt == torch.int64 and not bool((v64 == v64.round()).all()):
                raise ValueError(f"state_dict[{k!r}] must hold whole numbers (it counts images or bins)")
            new[k] = v
        return new

    def load(self, checked: dict[str, torch.Tensor]) -> None:
        """Replace every entry by :meth:`checked` output."""
        self.tensors = {k: checked[k].to(device=self.device, dtype=dt).clone() for k, (_, dt) in self.spec.items()}
