"""User components for the tests: what ``diagnostics.callbacks`` loads by "module:ClassName"."""

from typing import Any

import torch

from altgrad.diagnostics.components import Component


class CountingDraws(Component):
    """Every 2 steps: how many steps it has seen and a draw from its own generator (state to checkpoint)."""

    interval = 2

    def __init__(self) -> None:
        self.steps_seen = 0
        self.generator = torch.Generator().manual_seed(7)

    def after_step(self, step: int) -> dict[str, float]:
        self.steps_seen += 1
        return {}

    def measure(self, step: int) -> dict[str, float]:
        if not self.due(step):
            return {}
        draw = float(torch.rand((), generator=self.generator))
        return {"toy/steps_seen": self.steps_seen, "toy/draw": draw}

    def state_dict(self) -> dict[str, Any]:
        return {"steps_seen": self.steps_seen, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_seen = state["steps_seen"]
        self.generator.set_state(state["generator"])


class NotAComponent:
    """Has the methods but not the base class: refused."""

    def measure(self, step: int) -> dict[str, float]:
        return {}
