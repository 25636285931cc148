"""Speculative decoding: draft tokens proposed cheaply, verified by the target model in one pass.

config.py holds the settings, ngram.py and draft_model.py the two proposers, controller.py the
per-request choice of how many tokens to propose, speculator.py ties them to the engine step;
the verification itself (greedy and rejection sampling) is executor/rejection_sampler.py.
"""

from tokenmill.spec.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
