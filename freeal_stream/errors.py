"""The errors freeal-stream raises on purpose: one root, one kind for problems the user can fix.

`UserError` messages name the problem and the fix, so the CLI prints them without a traceback; anything
else that escapes is a bug and keeps its traceback. Internal signals (a malformed HTTP answer, an open
circuit) derive from `FreealError` but never reach the user as such.
"""

from __future__ import annotations


class FreealError(Exception):
    """Root of every error this package raises on purpose."""


class UserError(FreealError):
    """A problem the user can fix (a job field, a data file, an endpoint, the state directory...); the message
    says what is wrong and how to fix it."""


class ActorsDied(UserError):
    """Worker actors of one kind died more often than `ray.max_restarts` allows: the run stops; everything
    committed so far is stored, so a rerun resumes."""

    def __init__(self, kind: str, deaths: int, max_restarts: int):
        self.kind, self.deaths, self.max_restarts = kind, deaths, max_restarts
        super().__init__(
            f"{kind} actors died {deaths} times (ray.max_restarts = {max_restarts}); everything "
            "finished so far is stored. Fix: check the Ray logs (/tmp/ray/session_latest/logs; out of "
            "memory?) and rerun to resume"
        )
