"""The progress lines long loops write to the run's log."""

from __future__ import annotations

import math

from distil.utils.progress import progress_line


def test_progress_line_gives_share_rate_and_time_left():
    line = progress_line("training", 50, 200, elapsed_s=150.0, extra={"train/loss": 0.5312})
    assert line == "training: 50/200 (25%), 3.00 s each, 7.5 min left, train/loss 0.5312"


def test_progress_line_without_a_known_total_or_any_item_done():
    assert progress_line("labelling a/train", 3, None, 6.0) == "labelling a/train: 3, 2.00 s each"
    assert progress_line("labelling a/train", 3, math.inf, 6.0) == "labelling a/train: 3, 2.00 s each"
    assert progress_line("training", 0, 200, 0.0) == "training: 0/200 (0%)"


def test_a_resumed_run_times_only_its_own_steps():
    line = progress_line("training", 150, 200, elapsed_s=100.0, done_before=100)
    assert line == "training: 150/200 (75%), 2.00 s each, 1.7 min left"
