"""Start a server process and wait until it answers: for the serving benchmarks and the tests."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LaunchedServer:
    """`with LaunchedServer(cmd, url, ready_path) as s:` runs `cmd` until the block ends.

    Ready when GET url + ready_path answers 200; a process that dies first fails with its output.
    """

    def __init__(self, cmd: list[str], url: str, ready_path: str = "/health", startup_timeout: float = 300,
                 log_path: str | None = None):
        self.cmd, self.url, self.ready_path = cmd, url, ready_path
        self.startup_timeout = startup_timeout
        self.log_path = log_path

    def __enter__(self) -> "LaunchedServer":
        self._log = open(self.log_path, "w") if self.log_path else subprocess.PIPE
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = self.proc.stdout.read() if self.proc.stdout else f"(see {self.log_path})"
                raise RuntimeError(f"{self.cmd[0]} exited with {self.proc.returncode}:\n{output}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)  # still loading its model: ask again
        self.__exit__()
        raise RuntimeError(f"{self.cmd[0]} did not answer {self.ready_path} within {self.startup_timeout} s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.log_path:
            self._log.close()


def scrape_metric(url: str, name: str) -> float:
    """The value of an unlabelled series on the server's /metrics (KeyError if it has none)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    raise KeyError(name)
