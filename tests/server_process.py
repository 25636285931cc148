"""Start a real `tokenmill serve` on 127.0.0.1 in a subprocess, for the server tests."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

from tokenmill.bench.launch import LaunchedServer, free_port


class ServerProcess(LaunchedServer):
    """`with ServerProcess([...flags]) as server:` serves on a free port until the block ends."""

    def __init__(self, args: list[str], startup_timeout: float = 300):
        self.port = free_port()
        cmd = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--port", str(self.port),
               "--log-level", "warning", *args]
        super().__init__(cmd, f"http://127.0.0.1:{self.port}", "/health", startup_timeout)

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
        request = urllib.request.Request(self.url + path, data=body, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
