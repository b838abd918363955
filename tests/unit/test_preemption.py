"""How often the training loop asks Ray Train for preemption notices, and what it does
with one: the cadence and the deadline arithmetic of ``PreemptionWatch``."""

import ray.train
from forgeml.config import PreemptionConfig
from forgeml.train import preemption
from forgeml.train.preemption import SLACK_S, PreemptionWatch


class _Clock:
    """Unix time that moves only when a test says so."""

    def __init__(self):
        self.now = 1_800_000_000.0

    def time(self) -> float:
        return self.now


class _Rank:
    """What a rank's session answers: a notice once ``notice_after`` questions were asked,
    with a deadline ``deadline_s`` after the first."""

    def __init__(self, clock: _Clock, notice_after: int, deadline_s: float | None):
        self.clock = clock
        self.asked = self.broadcasts = 0
        self.notice_after = notice_after
        self.deadline_s = deadline_s
        self.deadline_ms = None

    def preemption_info(self):
        self.asked += 1
        if self.asked <= self.notice_after:
            return None
        if self.deadline_s is not None and self.deadline_ms is None:
            self.deadline_ms = int((self.clock.now + self.deadline_s) * 1000)
        return ray.train.PreemptionInfo(self.deadline_ms, {"node": [0]})

    def broadcast_from_rank_zero(self, value):
        self.broadcasts += 1
        return value


def _watch(monkeypatch, notice_after: int, deadline_s: float | None, **settings):
    clock = _Clock()
    monkeypatch.setattr(preemption, "time", clock)
    rank = _Rank(clock, notice_after, deadline_s)
    return clock, rank, PreemptionWatch(rank, PreemptionConfig(**settings))


def test_short_epochs_still_ask_every_interval(monkeypatch):
    """Steps of 0.1 s and a 0.5 s interval: every 5th step asks, counted over the run, so
    epochs of 3 steps ask too."""
    _, rank, watch = _watch(monkeypatch, 10**6, None, check_interval_s=0.5)
    watch.pace(0.1)
    for _epoch in range(4):
        for _step in range(3):
            watch.ask(0.1)
    assert watch.every == 5 and rank.asked == 12 // 5


def test_the_last_checkpoint_leaves_less_than_a_step_and_the_margin(monkeypatch):
    """Steps of 0.25 s, questions every 4 steps, a 10 s deadline, checkpoints of 0.2 s:
    after the notice every step asks rank 0's clock (not Ray Train), and the checkpoint
    before the deadline starts at the last step boundary that leaves room for another
    step and the checkpoint with its margin."""
    clock, rank, watch = _watch(monkeypatch, 1, 10.0, check_interval_s=1.0)
    watch.pace(0.25)
    answers = []
    while not answers or answers[-1][1] != "deadline":
        clock.now += 0.25
        answers.append((clock.now, watch.ask(0.25)))
        if answers[-1][1]:
            clock.now += 0.2  # the checkpoint
            watch.took(0.2)
    notice_at = next(t for t, answer in answers if answer == "notice")
    saved_at = answers[-1][0]
    assert rank.asked == 2 and notice_at == answers[7][0]  # every 4th step asks
    assert rank.broadcasts == len(answers) - 8  # every step after the notice
    left = watch.deadline - saved_at
    checkpoint_and_margin = 1.5 * 0.2 + SLACK_S
    assert checkpoint_and_margin <= left < checkpoint_and_margin + 0.25
    clock.now += 0.25
    assert watch.ask(0.25) is None  # once


def test_a_slow_step_moves_the_last_checkpoint_earlier(monkeypatch):
    clock, _, watch = _watch(monkeypatch, 0, 3.0, check_interval_s=0)
    assert watch.ask(0.01) == "notice"
    watch.took(0.2)
    clock.now += 2.0
    assert watch.ask(0.01) is None  # 1 s left: a step, a checkpoint and the margin fit
    assert watch.ask(0.7) == "deadline"  # not after a step of 0.7 s


def test_no_questions_when_checkpoints_on_notice_are_off(monkeypatch):
    _, rank, watch = _watch(monkeypatch, 0, 3.0, checkpoint_on_notice=False)
    assert [watch.ask(0.01) for _ in range(5)] == [None] * 5
    assert rank.asked == 0
