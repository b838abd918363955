"""When to checkpoint because a node of the run is about to be reclaimed.

Clouds reclaim spot instances, and Kubernetes evicts pods, after a notice: the autoscaler
drains the node (``DRAIN_NODE_REASON_PREEMPTION``, with a deadline) and Ray Train hands
the notice to every worker (``ray.train.get_preemption_info``). Once the deadline passes
Ray Train ends the worker group and restarts it from the latest checkpoint, counting a
preemption rather than a failure. An end-of-epoch checkpoint alone would lose the epoch
in progress, so the loop asks every ``train.preemption.check_interval_s`` (a step count
that all ranks share) and checkpoints as soon as a notice comes (in case the deadline is
missed). From then on the ranks decide after every step, and checkpoint once more at
the last step boundary from which another step and a checkpoint might not fit before
the deadline: what is lost is the steps after that checkpoint, less than one and a
margin (half a checkpoint's time and ``SLACK_S``), plus the restart.
"""

from __future__ import annotations

import time

from forgeml.config import PreemptionConfig

#: Seconds kept in hand before the deadline besides a step, a checkpoint and half of one
#: again (checkpoint writes vary more than steps do).
SLACK_S = 0.1


class PreemptionWatch:
    """Asked by every rank after every step, in step: asking Ray Train is a collective,
    so it happens every ``every`` steps on all ranks alike (``pace`` sets it from the
    mean step time of the last epoch, which every rank has all-reduced), and every rank
    gets the same answer (rank 0's notice and rank 0's clock). Steps are counted over
    the whole run, not per epoch: an epoch shorter than ``every`` steps would otherwise
    never ask. Between a notice with a deadline and the checkpoint before it, every step
    asks rank 0's clock only."""

    def __init__(self, session, settings: PreemptionConfig):
        self.session = session
        self.enabled = settings.checkpoint_on_notice
        self.interval_s = settings.check_interval_s
        self.every = 1  # steps between questions; 1 until an epoch has been timed
        self.step_s = 0.0  # the mean step of the last timed epoch
        self.steps = 0  # taken by this run since it started or restarted
        self.deadline: float | None = None  # unix seconds; None: no notice or no deadline
        self.noticed = False
        self.saved_near_deadline = False
        self.checkpoint_s = 0.0

    def pace(self, step_s: float) -> None:
        """Ask about every ``check_interval_s`` from now on, given steps of ``step_s``."""
        self.step_s = step_s
        self.every = max(1, int(self.interval_s / max(step_s, 1e-6)))

    def ask(self, step_s: float) -> str | None:
        """After a step of ``step_s`` seconds: ``"notice"`` or ``"deadline"`` when a
        checkpoint should be written now."""
        self.steps += 1
        if not self.enabled:
            return None
        if self.noticed and self.deadline is not None and not self.saved_near_deadline:
            return self._before_deadline(max(step_s, self.step_s))
        if self.steps % self.every:
            return None
        notice = self.session.preemption_info()
        if notice is None:
            self.noticed = self.saved_near_deadline = False
            return None
        if not self.noticed:
            self.noticed = True
            self.deadline = notice.deadline_ms / 1000 if notice.deadline_ms else None
            return "notice"
        return None

    def margin(self, step_s: float) -> float:
        """Seconds before the deadline below which another step of ``step_s`` and a
        checkpoint might not fit."""
        return step_s + 1.5 * self.checkpoint_s + SLACK_S

    def _before_deadline(self, step_s: float) -> str | None:
        if self.session.broadcast_from_rank_zero(
            time.time() >= self.deadline - self.margin(step_s)
        ):
            self.saved_near_deadline = True
            return "deadline"
        return None

    def took(self, seconds: float) -> None:
        """How long the last checkpoint took to write and report."""
        self.checkpoint_s = max(self.checkpoint_s, seconds)
