"""A test-only kill switch: a run that SIGKILLs itself in the middle of an experience.

``CLBENCH_TEST_SIGKILL_AT=E:N`` in the environment of ``clbench run`` makes the process
send itself SIGKILL after the N-th training iteration of experience E (0-based index),
exactly as ``kill -9`` would: no handler, no ``finally``, no flush. The resume tests
(tests/test_resume_every_strategy.py) use it to kill a run at a chosen point inside an
experience instead of racing a timer against the training loop. It is not a user option:
nothing documents it outside the tests, and without the variable the run loop adds no
plugin at all.
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING, Any

from avalanche.core import SupervisedPlugin

from clbench.errors import UsageError

if TYPE_CHECKING:
    from clbench.strategy import CLStrategy

KILL_SWITCH_VARIABLE = "CLBENCH_TEST_SIGKILL_AT"


class SigkillInExperience(SupervisedPlugin):
    """SIGKILL the own process after ``iterations`` training iterations of ``experience``."""

    def __init__(self, experience: int, iterations: int) -> None:
        super().__init__()
        self.experience = experience
        self.iterations = iterations
        self._done = 0

    def before_training_exp(self, strategy: CLStrategy, *args: Any, **kwargs: Any) -> None:
        self._done = 0

    def after_training_iteration(self, strategy: CLStrategy, *args: Any, **kwargs: Any) -> None:
        if int(strategy.experience.current_experience) != self.experience:
            return
        self._done += 1
        if self._done >= self.iterations:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_switch_plugins() -> list[SigkillInExperience]:
    """The kill switch the environment asks for, as a plugin list ([] without the variable)."""
    value = os.environ.get(KILL_SWITCH_VARIABLE)
    if not value:
        return []
    experience, _, iterations = value.partition(":")
    try:
        return [SigkillInExperience(int(experience), int(iterations))]
    except ValueError:
        raise UsageError(
            f"{KILL_SWITCH_VARIABLE}={value!r}: expected EXPERIENCE:ITERATIONS, e.g. 1:3"
        ) from None
