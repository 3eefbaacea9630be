"""Crash points for the fault-injection suite (scripts/faults), off unless set in the environment.

FLOCK_FAULT_CRASH_AFTER_CONSUME=N   SIGKILL this process when it has consumed N records, before
                                    their replies exist (consume -> reply window).
FLOCK_FAULT_CRASH_BEFORE_COMMIT=N   SIGKILL when N replies are acked and an offset commit is
                                    about to be sent (reply -> commit window).
A real SIGKILL, not an exception: nothing gets to clean up, as with kill -9 or a power cut.
"""

from __future__ import annotations

import os
import signal


def _die() -> None:
    # In a worker group the whole group goes, as a one-process worker would: the engine process
    # first (its edges die with it), then this one.
    group = int(os.environ.get("FLOCK_GROUP_PID", "0") or 0)
    if group and group != os.getpid():
        os.kill(group, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


class CrashPoints:
    def __init__(self, after_consume: int = 0, before_commit: int = 0):
        self.after_consume = after_consume
        self.before_commit = before_commit
        self.consumed = 0
        self.acked = 0

    @classmethod
    def from_env(cls) -> "CrashPoints":
        return cls(int(os.environ.get("FLOCK_FAULT_CRASH_AFTER_CONSUME", "0") or 0),
                   int(os.environ.get("FLOCK_FAULT_CRASH_BEFORE_COMMIT", "0") or 0))

    def on_consumed(self) -> None:
        self.consumed += 1
        if self.after_consume and self.consumed >= self.after_consume:
            _die()

    def on_acked(self, n: int = 1) -> None:
        self.acked += n

    def before_commit_hook(self) -> None:
        if self.before_commit and self.acked >= self.before_commit:
            _die()
