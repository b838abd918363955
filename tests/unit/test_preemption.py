"""How often the training loop asks Ray Train for preemption notices, and what it does
with one: the cadence and the deadline arithmetic of ``PreemptionWatch``."""

import time

import ray.train
from forgeml.config import PreemptionConfig
from forgeml.train.preemption import PreemptionWatch


class _Rank:
    """What a rank's session answers: a notice once ``notice_after`` questions were asked."""

    def __init__(self, notice_after: int, deadline_s: float | None):
        self.asked = 0
        self.notice_after = notice_after
        self.deadline_s = deadline_s

    def preemption_info(self):
        self.asked += 1
        if self.asked <= self.notice_after:
            return None
        deadline = None if self.deadline_s is None else int((time.time() + self.deadline_s) * 1000)
        return ray.train.PreemptionInfo(deadline, {"node": [0]})

    def broadcast_from_rank_zero(self, value):
        return value


def test_short_epochs_still_ask_every_interval():
    """Steps of 0.1 s and a 0.5 s interval: every 5th step asks, counted over the run, so
    epochs of 3 steps ask too."""
    rank = _Rank(notice_after=10**6, deadline_s=None)
    watch = PreemptionWatch(rank, PreemptionConfig(check_interval_s=0.5))
    watch.pace(0.1)
    for _epoch in range(4):
        for _step in range(3):
            watch.ask(0.1)
    assert watch.every == 5 and rank.asked == 12 // 5


def test_a_notice_checkpoints_at_once_and_again_near_the_deadline():
    rank = _Rank(notice_after=0, deadline_s=3.0)
    watch = PreemptionWatch(rank, PreemptionConfig(check_interval_s=0))
    assert watch.ask(0.01) == "notice"
    assert watch.deadline is not None
    watch.took(0.2)
    assert watch.ask(0.01) is None  # 3 s away; a checkpoint, two steps and 1 s fit
    time.sleep(1.9)
    assert watch.ask(0.01) == "deadline"
    assert watch.ask(0.01) is None  # once


def test_no_questions_when_checkpoints_on_notice_are_off():
    rank = _Rank(notice_after=0, deadline_s=3.0)
    watch = PreemptionWatch(rank, PreemptionConfig(checkpoint_on_notice=False))
    assert [watch.ask(0.01) for _ in range(5)] == [None] * 5
    assert rank.asked == 0
