"""core.membership.alive: the liveness rule, clock given by hand."""

from snapshotd.core.membership import alive


def test_alive_within_the_timeout_only():
    seen = {"n1": 100.0, "n2": 98.6, "n3": 98.4}
    assert alive(seen, 100.0, 1500) == {"n1", "n2"}


def test_boundary_is_alive():
    assert alive({"n1": 10.0}, 11.5, 1500) == {"n1"}
    assert alive({"n1": 10.0}, 11.5001, 1500) == set()


def test_never_seen_is_not_alive():
    assert alive({}, 5.0, 1000) == set()


def test_zero_timeout_needs_same_instant():
    assert alive({"a": 3.0, "b": 2.9}, 3.0, 0) == {"a"}
