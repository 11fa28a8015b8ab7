"""The Celery dispatcher batches the ids that arrive close together into one task."""

from __future__ import annotations

import threading
import time
from typing import Any

from integration.tasks import CeleryDispatcher


class _App:
    """Records ``send_task`` calls (the broker boundary)."""

    def __init__(self) -> None:
        self.sent: list[list[int]] = []
        self.event = threading.Event()

    def send_task(self, name: str, *, args: list[Any], queue: str, **_kw: Any) -> None:
        assert (name, queue) == ("careloop.process", "intake")
        self.sent.append(list(args[0]))
        self.event.set()


def test_ids_dispatched_together_share_a_task() -> None:
    app = _App()
    dispatcher = CeleryDispatcher(app, linger_s=0.2)  # type: ignore[arg-type]
    try:
        for i in range(5):
            dispatcher.dispatch([i * 2, i * 2 + 1])
        assert app.event.wait(5)
        time.sleep(0.3)
        assert app.sent == [list(range(10))]
    finally:
        dispatcher.stop()


def test_a_full_batch_goes_at_once_and_a_lone_id_after_the_linger() -> None:
    app = _App()
    dispatcher = CeleryDispatcher(app, linger_s=0.05)  # type: ignore[arg-type]
    try:
        dispatcher.dispatch(list(range(100)))
        dispatcher.dispatch([100])
        deadline = time.monotonic() + 5
        while sum(len(s) for s in app.sent) < 101 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.sent == [list(range(100)), [100]]
    finally:
        dispatcher.stop()
