"""Scheduling policies: the order in which waiting sequences are admitted and running ones preempted.

A policy gives every sequence a sort key: the smallest key is admitted first, the largest
is preempted first. Other policies (priority, shortest-job-first, aging, fair share) are new
subclasses with another key.
"""

from __future__ import annotations

from tokenmill.sequence import Sequence


class Policy:
    name = "base"

    def key(self, seq: Sequence) -> tuple:
        raise NotImplementedError

    def next_to_admit(self, waiting: list[Sequence]) -> Sequence:
        return min(waiting, key=self.key)

    def preemption_order(self, running: list[Sequence]) -> list[Sequence]:
        """Running sequences, first to be served first, first to be preempted last."""
        return sorted(running, key=self.key)


class FCFSPolicy(Policy):
    """First come, first served: earliest arrival first; the newest running sequence is preempted."""

    name = "fcfs"

    def key(self, seq: Sequence) -> tuple:
        return (seq.arrival_time, seq.seq_id)


POLICIES: dict[str, type[Policy]] = {FCFSPolicy.name: FCFSPolicy}


def make_policy(name: str) -> Policy:
    if name not in POLICIES:
        from tokenmill.errors import InvalidParameterError
        raise InvalidParameterError("scheduling_policy", f"unknown policy {name!r}; known: {sorted(POLICIES)}")
    return POLICIES[name]()
