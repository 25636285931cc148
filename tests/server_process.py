"""Start a real `tokenmill serve` on 127.0.0.1 in a subprocess, for the server tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`with ServerProcess([...flags]) as server:` runs the server until the block ends.

    Waits until /health answers (or the process dies, which fails with its log)."""

    def __init__(self, args: list[str], startup_timeout: float = 300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args
        self.startup_timeout = startup_timeout

    def __enter__(self) -> "ServerProcess":
        cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--port", str(self.port),
               "--log-level", "warning", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tokenmill serve exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)  # the server is still loading its model: ask again
        self.__exit__()
        raise RuntimeError(f"tokenmill serve did not answer /health within {self.startup_timeout} s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of the server's Prometheus metrics, e.g. metric("tokenmill_requests_total", 'status="abort"')."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0

    def post(self, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
        """A raw POST (for bodies the openai client would refuse to send); returns (status, JSON body)."""
        import json

        request = urllib.request.Request(self.url + path, data=body, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
