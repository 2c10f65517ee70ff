"""``helpers.run_on_gloo_ranks``: a failing or hung rank fails the parent, with that rank's own report."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
from helpers import START_DELAY_ENV, run_on_gloo_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def _disagree_on_rank_1(rank: int) -> None:
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)  # the group works: 1 + 2
    assert total.item() == 3.0, total
    assert rank != 1, f"rank 1 alone disagrees (sum {total.item()})"


def _sum_on_every_rank(rank: int) -> None:
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    assert total.item() == 3.0, total


def _fail_on_every_rank(rank: int) -> None:
    raise RuntimeError(f"rank {rank} fails on its own")


def _hang_on_rank_1(rank: int) -> None:
    if rank == 1:
        time.sleep(3600)


def _die_on_rank_0_hang_on_rank_1(rank: int) -> None:
    if rank == 0:
        os._exit(3)
    time.sleep(3600)


def _unnamed_signal_on_rank_0(rank: int) -> None:
    if rank == 0:
        os.kill(os.getpid(), signal.SIGRTMIN + 6)  # a real-time signal: terminates, and Python has no name for it


def test_error_on_one_rank_reaches_the_parent_with_its_traceback():
    with pytest.raises(AssertionError) as failure:
        run_on_gloo_ranks(_disagree_on_rank_1, 2)
    message = str(failure.value)
    first = message.split("\n", 1)[1]  # after the count line: the first error raised
    assert first.startswith("rank 1:\nTraceback"), message
    assert "AssertionError: rank 1 alone disagrees (sum 3.0)" in message, message
    assert "in _disagree_on_rank_1" in message, message  # the rank's traceback, not just its message


def test_every_rank_error_reaches_the_parent():
    with pytest.raises(AssertionError) as failure:
        run_on_gloo_ranks(_fail_on_every_rank, 2)
    message = str(failure.value)
    assert message.startswith("2 failure(s) on 2 gloo ranks"), message
    for rank in (0, 1):
        assert f"rank {rank}:\nTraceback" in message and f"RuntimeError: rank {rank} fails on its own" in message


@pytest.mark.parametrize(("fn", "timeout_s", "exit_line"), [
    # rank 0 waits for rank 1 in the barrier and may time out first (its timer starts earlier): rank 1 still gets to
    # its own timer and report, instead of being terminated when rank 0 exits
    (_hang_on_rank_1, 8, "rank 1 exited with status 1"),
    # rank 0 dies at once: rank 1 must still dump its own stack at its timer instead of being killed by the parent as
    # soon as rank 0's exit is seen (that lost rank 1's report whenever rank 0's timer fired first)
    (_die_on_rank_0_hang_on_rank_1, 5, "rank 0 exited with status 3"),
], ids=["hung_rank_1", "rank_0_dies_rank_1_hangs"])
def test_hung_rank_fails_with_its_stack_instead_of_hanging(fn, timeout_s, exit_line):
    with pytest.raises(AssertionError) as failure:
        run_on_gloo_ranks(fn, 2, timeout_s=timeout_s)
    message = str(failure.value)
    assert exit_line in message, message
    assert f"rank 1 ran past timeout_s={timeout_s} s" in message and f"in {fn.__name__}" in message, message
    assert "still running" not in message, message  # stopped by the ranks' own timers, not the parent's kill


def test_a_rank_that_starts_late_does_not_time_out_the_others(monkeypatch):
    # timeout_s counts from the moment every rank has started: rank 1 starts 6 s after rank 0 here (on a loaded machine
    # a rank's spawn and imports can take that much longer than another's). Rank 0's timer used to start at its own
    # start and fire in init_process_group, still waiting for rank 1 ("rank 0 ran past timeout_s=3 s")
    monkeypatch.setenv(START_DELAY_ENV, "1:6")
    run_on_gloo_ranks(_sum_on_every_rank, 2, timeout_s=3)


def test_bad_arguments_are_refused_before_starting():
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        run_on_gloo_ranks(_disagree_on_rank_1, 0)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        run_on_gloo_ranks(_disagree_on_rank_1, 2, timeout_s=0)


def test_a_rank_killed_by_a_signal_python_does_not_name_is_reported():
    # signal.Signals(40) raises ValueError: the helper raised that instead of its report of the ranks
    with pytest.raises(AssertionError) as failure:
        run_on_gloo_ranks(_unnamed_signal_on_rank_0, 2, timeout_s=60)
    message = str(failure.value)
    assert f"rank 0 exited with signal {int(signal.SIGRTMIN) + 6} without raising" in message, message
