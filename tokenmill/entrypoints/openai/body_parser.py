"""Request bodies, parsed and checked off the event loop, and off the server's process when large.

A worker thread parses a small body. A large one goes to a child process: pydantic's parser
holds the GIL for the whole parse (about 150 ms for a 10 MB list of token ids), and the event
loop, /health and every stream with it, would wait that long. The child starts on the first
large body, imports only the request models (not torch), and returns the checked model or
pydantic's errors, so the server never holds a huge parsed body either: token ids that fill
the context are refused in the child (see CompletionRequest._prompt_shape).
"""

from __future__ import annotations

import importlib
import json
import pickle
import subprocess
import sys
import threading

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

CHILD_PARSE_BYTES = 1 << 20  # a thread parses a body below this: at most about 15 ms of GIL


class BodyParser:
    """`parse` blocks (call it in a worker thread); bodies for the child queue up behind one lock."""

    def __init__(self, max_model_len: int):
        self.context = {"max_model_len": max_model_len}
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def parse(self, model: type[BaseModel], raw: bytes) -> BaseModel:
        """The checked model, or RequestValidationError with pydantic's errors."""
        name = f"{model.__module__}:{model.__qualname__}"  # what the child imports
        if len(raw) < CHILD_PARSE_BYTES:
            outcome = _checked(name, raw, self.context)
        else:
            with self._lock:
                outcome = self._in_child(name, raw)
        if isinstance(outcome, BaseModel):
            return outcome
        raise RequestValidationError(outcome)

    def close(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child.wait()
            self._child = None

    def _in_child(self, model_name: str, raw: bytes) -> BaseModel | list[dict]:
        if self._child is None or self._child.poll() is not None:  # first use, or it died (e.g. out of memory)
            self._child = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE)
        try:
            pickle.dump((model_name, raw, self.context), self._child.stdin)
            self._child.stdin.flush()
            return pickle.load(self._child.stdout)
        except (OSError, EOFError, pickle.UnpicklingError) as e:
            self.close()
            raise RuntimeError(f"the body parser process failed: {e!r}") from e


def _checked(model_name: str, raw: bytes, context: dict) -> BaseModel | list[dict]:
    """The model, or the errors a 400 lists (plain data: they cross the process boundary)."""
    module, _, name = model_name.partition(":")
    model = getattr(importlib.import_module(module), name)
    try:
        return model.model_validate_json(raw, context=context)
    except ValidationError as e:
        if e.errors()[0]["type"] != "json_invalid":
            return e.errors(include_url=False, include_input=False)
        invalid = e
    try:  # pydantic's parser refuses lone surrogates, which JSON allows: the checks after it name them
        data = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's parser goes
        return invalid.errors(include_url=False, include_input=False)
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        return e.errors(include_url=False, include_input=False)


def _serve() -> None:
    """The child: (model name, body, context) in on stdin, the outcome out on stdout, until EOF."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the answers
    while True:
        try:
            model_name, raw, context = pickle.load(stdin)
        except EOFError:
            return
        pickle.dump(_checked(model_name, raw, context), stdout)
        stdout.flush()


if __name__ == "__main__":
    _serve()
