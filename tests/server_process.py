"""Start a real `tokenmill serve` on 127.0.0.1 in a subprocess, for the server tests."""

from __future__ import annotations

import json
import re
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

    def metric(self, name: str, labels: str = "", default: float | None = None) -> float:
        """One sample of the server's Prometheus metrics, e.g. metric("tokenmill_requests_total", 'status="abort"').

        The labels must be the sample's whole label set, in any order. A series that is not there
        raises (a renamed or dropped metric must fail its test, not read as 0) unless `default`
        is given: a labelled counter has no sample until its first count.
        """
        want = _labels(labels)
        for sample_labels, value in self.samples(name):
            if sample_labels == want:
                return value
        if default is None:
            raise KeyError(f"no sample {name}{{{labels}}} on /metrics")
        return default

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Every sample of one series on /metrics: (its labels, its value)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        found = []
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            sample, _, label_text = series.partition("{")
            if sample == name:
                found.append((_labels(label_text.rstrip("}")), float(value)))
        return found

    def get_json(self, path: str) -> dict:
        """A GET's JSON body, whatever its status."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read())

    def post(self, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
        """A raw POST (for bodies the openai client would refuse to send); returns (status, JSON body)."""
        request = urllib.request.Request(self.url + path, data=body, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def _labels(text: str) -> dict[str, str]:
    """'a="x",b="y"' -> {"a": "x", "b": "y"} (values may hold commas and escaped quotes)."""
    return dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', text))
