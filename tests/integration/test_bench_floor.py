"""bench/floor.py: the minimum work per snapshot adds up and follows the route's bytes."""

import pytest

from bench.floor import snapshot_floor

MiB = 1 << 20


def test_parts_add_up_and_follow_the_code():
    fl = snapshot_floor(8 * MiB, 2, 2, block_bytes=1 * MiB, sample_bytes=4 * MiB, repeats=1)
    parts = fl["hash_data_s"] + fl["encode_s"] + fl["hash_parity_s"] + fl["network_copies_s"]
    assert fl["total_s"] == pytest.approx(parts)
    assert fl["sent_over_d"] == pytest.approx(1.5)  # (k+m-1)/k
    assert all(fl[k] > 0 for k in ("hash_data_s", "encode_s", "hash_parity_s", "network_copies_s"))
    assert fl["core_s_per_gb"] == pytest.approx(fl["total_s"] / (8 * MiB / 1e9))


def test_no_parity_means_no_encode_and_no_network():
    fl = snapshot_floor(4 * MiB, 1, 0, block_bytes=1 * MiB, sample_bytes=2 * MiB, repeats=1)
    assert fl["encode_s"] == fl["hash_parity_s"] == fl["network_copies_s"] == 0.0
    assert fl["total_s"] == fl["hash_data_s"] > 0


def test_bad_code_is_refused():
    with pytest.raises(ValueError):
        snapshot_floor(4 * MiB, 0, 1)
