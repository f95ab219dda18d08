"""Remote tasks Redis acknowledged, watched until a worker has taken them, so that a
Redis that forgets its data (a restart without persistence, a failover to an empty
replica) never loses them without a word.

Redis answering "yes" to a hand-off is not yet safety: what it holds only in memory
is gone if it restarts without persistence. So trio_bg keeps a marker of its own in
Redis, a key without expiry holding a random token; every hand-off carries the token
it was made under (its `Receipt`). A marker gone, or holding another token, means
Redis lost its data since; a stream entry at or before the consumer group's
last-delivered id means a worker has taken it. `RedisGuard` holds the receipts not yet
taken and sorts them on each look: taken (done with), lost (sent again from the
journal, or, without one, counted and reported), or still waiting.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from dataclasses import dataclass
from typing import final

LOOK_EVERY = 1.0
"""Seconds between two looks at Redis while receipts wait for a worker."""


@dataclass(frozen=True, slots=True)
class Receipt:
    """Where Redis put a remote task: the marker token it was sent under and its
    stream entry id (``"<ms>-<seq>"``)."""

    token: str
    entry: str

    def encode(self) -> str:
        """The receipt as the journal keeps it (a row's ``sent``)."""
        return f"{self.token} {self.entry}"

    @classmethod
    def decode(cls, text: str) -> Receipt:
        """The receipt `encode` made ``text`` of (`ValueError` if it is not one)."""
        token, entry = text.split(" ")
        entry_order(entry)
        return cls(token, entry)


def entry_order(entry: str) -> tuple[int, int]:
    """A stream entry id as a pair that sorts as Redis orders entries."""
    milliseconds, _, sequence = entry.partition("-")
    return int(milliseconds), int(sequence or 0)


@dataclass(frozen=True, slots=True)
class Sorted:
    """What one look at Redis found among the receipts (journal ids, or None for a
    task kept in memory only)."""

    taken: list[int | None]
    lost: list[int | None]


@final
class RedisGuard:
    """The receipts of remote tasks no worker has taken yet, oldest entry first."""

    def __init__(self) -> None:
        self._waiting: list[tuple[tuple[int, int], int, Receipt, int | None]] = []
        self._order = itertools.count()  # (ties: never compare receipts)
        self._tokens: Counter[str] = Counter()  # the markers they were sent under

    def __len__(self) -> int:
        return len(self._waiting)

    def watch(self, receipt: Receipt, journal_id: int | None) -> None:
        """Watch the task Redis acknowledged with ``receipt`` (its journal row, if any)."""
        item = (entry_order(receipt.entry), next(self._order), receipt, journal_id)
        heapq.heappush(self._waiting, item)
        self._tokens[receipt.token] += 1

    def sort(self, marker: str, delivered: str | None) -> Sorted:
        """Take out the receipts that Redis, whose marker now holds ``marker`` and
        whose consumer group has delivered up to entry ``delivered`` (None: nothing
        yet), no longer needs watched: those a worker took, and those Redis lost."""
        lost: list[int | None] = []
        if self._tokens.keys() - {marker}:
            lost = [item[3] for item in self._waiting if item[2].token != marker]
            self._waiting = [item for item in self._waiting if item[2].token == marker]
            heapq.heapify(self._waiting)
            self._tokens = Counter({marker: len(self._waiting)} if self._waiting else {})
        taken: list[int | None] = []
        if delivered is not None:
            last = entry_order(delivered)
            while self._waiting and self._waiting[0][0] <= last:
                taken.append(heapq.heappop(self._waiting)[3])
                self._tokens[marker] -= 1
        return Sorted(taken, lost)
