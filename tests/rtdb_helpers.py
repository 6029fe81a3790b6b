"""Helpers for the RTDB tests: a raw SSE reader (to see frames exactly as sent) and polling."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import requests


class RawStream:
    """Reads one SSE response in a thread and keeps every (event, data) frame as text."""

    def __init__(self, url: str, params: dict | None = None, headers: dict | None = None):
        self.frames: list[tuple[str, str]] = []
        self.status: int | None = None
        self.body: str | None = None
        self.ended = threading.Event()
        self._response = requests.get(url, params=params, stream=True, timeout=(10, 60),
                                      headers={"Accept": "text/event-stream", **(headers or {})})
        self.status = self._response.status_code
        if self.status != 200:
            self.body = self._response.text
            self.ended.set()
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        event, data = None, []
        try:
            for chunk in self._response.iter_content(chunk_size=None):
                buffer += chunk
                while b"\n" in buffer:
                    raw, buffer = buffer.split(b"\n", 1)
                    line = raw.decode()
                    if not line:
                        self.frames.append((event, "\n".join(data)))
                        event, data = None, []
                    elif line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        data.append(line[6:])
                    else:
                        self.frames.append(("<unexpected line>", line))
        except (requests.RequestException, OSError, AttributeError):
            pass  # closed by close(); urllib3 then reads from a released connection (AttributeError)
        finally:
            self.ended.set()

    def events(self, name: str | None = None) -> list:
        """Decoded put/patch payloads (or frames of one event name)."""
        if name is not None:
            return [d for e, d in self.frames if e == name]
        return [(e, json.loads(d)) for e, d in list(self.frames) if e in ("put", "patch")]

    def close(self) -> None:
        self._response.close()


def wait_for(condition: Callable[[], bool], timeout: float = 15.0, interval: float = 0.02) -> bool:
    """Poll until ``condition()`` holds; returns its final truth (tests assert on it, not on time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()
