"""The learning-rate multiplier: linear warmup, then cosine decay to min_lr_ratio, then flat."""

from __future__ import annotations

import math

import pytest

from actors.config import LearnerConfig
from learners.learner import lr_factor


def test_warmup_then_cosine_to_floor():
    cfg = LearnerConfig(warmup_steps=4, decay_steps=10, min_lr_ratio=0.1)
    # warmup: (step + 1) / 4 -> 0.25, 0.5, 0.75, 1.0 at steps 0..3
    assert [lr_factor(s, cfg=cfg) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # decay from step 4: progress = (s - 4) / 10; factor = 0.1 + 0.9 * (1 + cos(pi * progress)) / 2
    #   s = 4: 1.0;  s = 9: 0.1 + 0.9 * 0.5 = 0.55;  s = 14 and later: 0.1
    assert lr_factor(4, cfg=cfg) == pytest.approx(1.0)
    assert lr_factor(9, cfg=cfg) == pytest.approx(0.55)
    assert lr_factor(14, cfg=cfg) == pytest.approx(0.1)
    assert lr_factor(500, cfg=cfg) == pytest.approx(0.1)
    assert lr_factor(6, cfg=cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.2)))


def test_constant_without_decay():
    assert {lr_factor(s, cfg=LearnerConfig()) for s in range(50)} == {1.0}
