"""Work done per Trio task step, counted instead of timed (machine-proof)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio


class WorkPerStep(trio.abc.Instrument):
    """Counts what a patched method reports, per task step and in all."""

    def __init__(self) -> None:
        self.largest = self.total = self._step = 0

    def count(self, amount: int) -> None:
        self._step += amount
        self.total += amount

    def patch(
        self,
        monkeypatch: pytest.MonkeyPatch,
        owner: type,
        name: str,
        amount: Callable[[Any, tuple[Any, ...]], int],
    ) -> None:
        """Count ``amount(result, args)`` for each call of ``owner.name``."""
        original = getattr(owner, name)

        def counted(*args: Any) -> Any:
            result = original(*args)
            self.count(amount(result, args))
            return result

        monkeypatch.setattr(owner, name, counted)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._step = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.largest = max(self.largest, self._step)
