"""The Prometheus endpoint of a real daemon: metrics move when snapshots happen.

A daemon process is started with ``--metrics-addr 127.0.0.1:0``; a trainer-side
Snapshotter saves and restores a small model; the HTTP endpoint is scraped before and
after and parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from snapshotd.node.metrics import lost_shards_per_stripe, parse_addr
from snapshotd.core.placement import place_group


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of the daemon's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(samples, name, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def mdaemon(daemon_factory):
    return daemon_factory(extra_args=["--metrics-addr", "127.0.0.1:0"]).start()


def test_metrics_move_with_a_snapshot_and_a_restore(mdaemon):
    from snapshotd_client import Snapshotter

    port = mdaemon.info["metrics_port"]
    assert port and port > 0
    before = scrape(port)
    assert get(before, "snapshotd_snapshot_seconds_count") == 0
    assert get(before, "snapshotd_held_bytes", kind="data") == 0
    assert get(before, "snapshotd_memory_budget_bytes") == 1 << 30
    assert get(before, "snapshotd_requests_refused_total", reason="NOT_FOUND") is None

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snap = Snapshotter(model, opt, socket_path=mdaemon.socket, job_id="mjob", rank=0, world_size=1,
                       on_daemon_unavailable="raise")
    try:
        for step in (1, 2, 3):
            snap.save(step)
            st = snap.wait(30)
            assert st.committed, st
        after = scrape(port)
        assert get(after, "snapshotd_snapshot_seconds_count") == 3
        assert 0 < get(after, "snapshotd_snapshot_seconds_sum") < 30
        assert get(after, "snapshotd_job_latest_committed_version", job="mjob") == 3
        assert get(after, "snapshotd_job_versions_held", job="mjob") >= 1
        data = get(after, "snapshotd_held_bytes", kind="data")
        assert data >= 64 * 64 * 4  # at least the weight matrix
        assert get(after, "snapshotd_held_bytes", kind="parity") == 0  # one node: no parity
        assert get(after, "snapshotd_reserved_bytes") >= data
        assert 0 <= get(after, "snapshotd_job_last_commit_age_seconds", job="mjob") < 60

        model2 = torch.nn.Linear(64, 64)
        snap2 = Snapshotter(model2, torch.optim.SGD(model2.parameters(), lr=0.1),
                            socket_path=mdaemon.socket, job_id="mjob", rank=0, world_size=1)
        try:
            assert snap2.restore() == 3
        finally:
            snap2.close()
        assert torch.equal(model2.weight, model.weight)
        restored = scrape(port)
        assert get(restored, "snapshotd_restore_seconds_count", op="open") == 1
    finally:
        snap.close()

    # A refused request is counted by its gRPC code.
    cl = mdaemon.client()
    try:
        with pytest.raises(Exception):
            cl.list_versions("no-such-job")
    finally:
        cl.close()
    refused = scrape(port)
    assert get(refused, "snapshotd_requests_refused_total", reason="NOT_FOUND") == 1
    assert get(refused, "snapshotd_checksum_failures_total", where="client_api") == 0

    # A bit flipped in the daemon's copy: the restore is refused (DATA_LOSS) and counted.
    from snapshotd.wire import errors
    from snapshotd.wire import shm

    cl = mdaemon.client()
    try:
        name = cl.open_shard("mjob", 0).segment_name
        seg = shm.open_segment(name, writable=True)
        try:
            seg.buf[0] ^= 0xFF
        finally:
            seg.close()
        with pytest.raises(errors.ChecksumMismatchError):
            cl.open_shard("mjob", 0)
    finally:
        cl.close()
    bad = scrape(port)
    assert get(bad, "snapshotd_checksum_failures_total", where="client_api") == 1
    assert get(bad, "snapshotd_requests_refused_total", reason="DATA_LOSS") == 1


def test_metrics_are_off_by_default(daemon):
    assert daemon.info.get("metrics_port") is None


def test_bad_metrics_address_is_a_clear_error(daemon_factory):
    d = daemon_factory(extra_args=["--metrics-addr", "localhost:http"])
    with pytest.raises(RuntimeError, match="metrics address"):
        d.start()
    with pytest.raises(ValueError):
        parse_addr("1.2.3.4:70000")
    assert parse_addr(":9464") == ("0.0.0.0", 9464)
    assert parse_addr("127.0.0.1:0") == ("127.0.0.1", 0)


def test_lost_shards_per_stripe_counts_real_blocks_only():
    # n=4, m=2: stripe s has parity on nodes s, s+1 and data on s+2, s+3 (mod 4).
    layout = place_group(4, 2, (2, 2, 2, 0))  # node 3 holds nothing: its data slots are virtual
    none = lost_shards_per_stripe(layout, frozenset())
    assert none == [0] * layout.num_stripes
    lost3 = lost_shards_per_stripe(layout, frozenset({3}))
    for s, x in enumerate(lost3):
        data_nodes, parity_nodes = layout.stripe_nodes(s)
        want = (3 in parity_nodes) + sum(1 for p, nd in enumerate(data_nodes)
                                         if nd == 3 and layout.data_block(s, p) is not None)
        assert x == want
    assert max(lost3) == 1
    two = lost_shards_per_stripe(layout, frozenset({0, 1}))
    assert max(two) == 2  # exactly m: still recoverable
    three = lost_shards_per_stripe(layout, frozenset({0, 1, 2}))
    assert max(three) == 3  # more than m somewhere
