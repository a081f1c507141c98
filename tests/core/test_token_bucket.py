"""core.pacing.TokenBucket: the pure rate decision, driven by a hand-set clock."""

import pytest

from snapshotd.core.pacing import TokenBucket

MIB = 1 << 20


def test_full_bucket_sends_at_once_then_waits_for_refill():
    b = TokenBucket(rate_bytes_s=10 * MIB, burst_bytes=4 * MIB, now=0.0)
    assert b.delay_s(4 * MIB, now=0.0) == 0.0
    assert b.delay_s(1 * MIB, now=0.0) == pytest.approx(0.1)  # 1 MiB at 10 MiB/s
    # the next one queues behind the first waiter, not beside it
    assert b.delay_s(1 * MIB, now=0.0) == pytest.approx(0.2)


def test_refill_is_capped_at_the_burst():
    b = TokenBucket(rate_bytes_s=MIB, burst_bytes=2 * MIB, now=0.0)
    b.delay_s(2 * MIB, now=0.0)
    assert b.tokens(now=100.0) == 2 * MIB  # a long quiet spell banks only the burst
    assert b.delay_s(2 * MIB, now=100.0) == 0.0
    assert b.delay_s(MIB, now=100.0) == pytest.approx(1.0)


def test_a_message_larger_than_the_bucket_goes_when_full_and_leaves_debt():
    b = TokenBucket(rate_bytes_s=MIB, burst_bytes=MIB, now=0.0)
    assert b.delay_s(3 * MIB, now=0.0) == 0.0  # full: let through, 2 MiB in debt
    assert b.tokens(now=0.0) == -2 * MIB
    assert b.delay_s(MIB, now=0.0) == pytest.approx(3.0)  # debt + its own MiB


@pytest.mark.parametrize("sizes", [[MIB] * 50, [MIB // 3] * 70, [5 * MIB, 100, 3 * MIB, MIB // 2] * 6])
def test_long_run_rate_holds_for_any_message_sizes(sizes):
    rate, burst = 8 * MIB, 2 * MIB
    b = TokenBucket(rate, burst, now=0.0)
    now = 0.0
    sent = 0
    for n in sizes:
        now += b.delay_s(n, now)  # a single sender that sleeps as told
        sent += n
        # every send time respects burst + rate * t (the bytes of this message included)
        assert sent <= burst + rate * now + max(n - burst, 0) + 1e-6
    assert now == pytest.approx(max(0.0, (sent - burst) / rate), rel=0.02, abs=0.02 * sent / rate)


@pytest.mark.parametrize("rate, burst", [(0, MIB), (-1, MIB), (MIB, 0)])
def test_bad_parameters_are_refused(rate, burst):
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, now=0.0)


def test_negative_size_is_refused_and_changes_nothing():
    b = TokenBucket(MIB, MIB, now=0.0)
    with pytest.raises(ValueError):
        b.delay_s(-1, now=0.0)
    assert b.tokens(now=0.0) == MIB
