"""Start `python -m atomr_trio` as a real process on an ephemeral port, for server tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time


class Server:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "atomr_trio", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.log: list[str] = []
        self.url = ""
        deadline = time.monotonic() + 180
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            if m:
                self.url = m.group(1)
                break
            if time.monotonic() > deadline:
                self.proc.kill()
                break
        if not self.url:
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        # Keep reading its output so the server never blocks on a full pipe.
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout or []), daemon=True).start()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus series' samples whose labels include the given ones."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
