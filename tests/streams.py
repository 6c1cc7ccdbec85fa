"""A server stream read on a thread, for tests that watch one while they act."""
from __future__ import annotations

import threading
from collections.abc import Callable


class Collected:
    """The messages of ``stream`` (iterable, with ``cancel()``), read on a thread until
    ``close()``; ``error`` is what ended it early."""

    def __init__(self, stream, on_close: Callable[[], None] = lambda: None) -> None:
        self.stream = stream
        self.messages: list = []
        self.error: Exception | None = None
        self._on_close = on_close
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for message in self.stream:
                self.messages.append(message)
        except Exception as e:  # noqa: BLE001 - the test reads it
            self.error = e

    def close(self) -> None:
        self.stream.cancel()
        self._thread.join(timeout=10)
        self._on_close()
