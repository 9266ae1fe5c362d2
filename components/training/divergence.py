"""Finding where training went non-finite without a host sync per step: each phase's loss and
largest gradient stay on the device until the trainer checks them (at a log, sentinel or
checkpoint step), then one transfer tells whether and where the first NaN/Inf appeared."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Divergence:
    """The first non-finite value seen: at training step `step` (1-based), in phase `phase`."""

    step: int
    phase: str
    what: str  # "loss", "gradient" (the largest |gradient| of the phase's parameters) or tensor names
    value: float

    def __str__(self) -> str:
        if self.what in ("loss", "gradient"):
            return f"the {self.phase!r} {self.what} is {self.value} at step {self.step}"
        return f"non-finite values in {self.what} at step {self.step}"


class FiniteWatch:
    """The losses and gradient maxima of the phases trained since the last check, on the device."""

    def __init__(self) -> None:
        self._where: list[tuple[int, str]] = []
        self._values: list[torch.Tensor] = []  # (2,): loss, max |grad|

    def add(self, step: int, phase: str, loss: torch.Tensor, grads: list[torch.Tensor]) -> None:
        # inf-norm: a NaN or Inf anywhere shows, and large finite gradients cannot overflow as in a 2-norm
        grad_max = (torch.nn.utils.get_total_norm(grads, norm_type=float("inf")) if grads
                    else torch.zeros((), device=loss.device))
        self._where.append((step, phase))
        self._values.append(torch.stack((loss.detach().float(), grad_max.float())))

    def first_divergence(self) -> Divergence | None:
        """The first non-finite loss or gradient since the last call (one host sync), then forget them."""
        if not self._values:
            return None
        values = torch.stack(self._values).cpu()  # (phases, 2)
        where, self._where, self._values = self._where, [], []
        bad = ~torch.isfinite(values)
        if not bad.any():
            return None
        row = int(bad.any(dim=1).nonzero()[0])
        column = 0 if bad[row, 0] else 1
        step, phase = where[row]
        return Divergence(step, phase, ("loss", "gradient")[column], float(values[row, column]))

    def clear(self) -> None:
        self._where, self._values = [], []
