"""What speculative decoding to do: `SpeculativeConfig`, declared with the engine's other options in tokenmill.config."""

from __future__ import annotations

from tokenmill.config import SPECULATIVE_METHODS as METHODS, SpeculativeConfig

__all__ = ["METHODS", "SpeculativeConfig"]
