"""The durable tier against an S3-compatible endpoint the test starts (moto's server): a
real daemon flushes to s3://, stock DCP (FsspecReader) reads the checkpoint, a corrupted
object is detected and the older checkpoint restored, and a flush SIGKILLed halfway
never becomes complete or latest."""

from __future__ import annotations

import json
import signal

import pytest
import torch
import torch.distributed.checkpoint as dcp

from clusterkit import wait_for
from snapshotd.wire import durable_store as ds
from snapshotd_tools.localcluster import free_port
from snapshotd_client import Snapshotter

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

JOB = "s3job"
START_S = 120  # a daemon with --durable-url imports torch and DCP before it says ready
BUCKET = "ckpt"


@pytest.fixture
def s3(monkeypatch):
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "SNAPSHOTD_DURABLE_S3_ENDPOINT": endpoint}.items():
        monkeypatch.setenv(k, v)  # the daemons started below inherit them
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.mkdir(BUCKET)
    yield f"s3://{BUCKET}/run", fs, endpoint
    server.stop()


def _model(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    return m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)


def _steps(model, opt, snap, steps):
    for step in steps:
        model(torch.full((4, 8), float(step))).square().mean().backward()
        opt.step()
        opt.zero_grad()
        snap.save(step).result(30)


@pytest.mark.slow  # moto's server and two daemons: ~25 s idle, 60-90 s under load
def test_s3_flush_stock_read_corruption_and_killed_flush(daemon_factory, s3, monkeypatch):
    url, fs, endpoint = s3
    a = daemon_factory(extra_args=["--log-level", "INFO", "--durable-url", url, "--durable-every-versions", "2",
                                   "--durable-keep", "3"]).start(timeout_s=START_S)
    model, opt = _model()
    with Snapshotter(model, opt, job_id=JOB, socket_path=a.socket, durable_url=url) as snap:
        _steps(model, opt, snap, [1, 2])
        store = ds.open_store(url)
        wait_for(lambda: ds.complete_versions(store, JOB) == [2], 60, "v2 complete on S3")
        want2 = {k: v.clone() for k, v in model.state_dict().items()}
        _steps(model, opt, snap, [3, 4])
        wait_for(lambda: ds.complete_versions(store, JOB) == [2, 4], 60, "v4 complete on S3")
        # latest.json (a hint) moves after the index is written
        wait_for(lambda: json.loads(store.read_bytes(f"{JOB}/{ds.LATEST}"))["version"] == 4, 30,
                 "latest.json to name v4")
    a.kill()
    # stock DCP reads the objects (its fsspec reader), no snapshotd involved
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    got = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    dcp.load(got, storage_reader=FsspecReader(f"{url}/{JOB}/{ds.version_dir(4)}",
                                              client_kwargs={"endpoint_url": endpoint}))
    for k, v in model.state_dict().items():
        assert torch.equal(got["model"][k], v), k
    # corrupt v4's rank object: the index no longer verifies, v2 is restored
    key = f"{BUCKET}/run/{JOB}/{ds.version_dir(4)}/{ds.rank_file(0)}"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(key, bytes(data))
    with pytest.raises(Exception, match="corrupt"):
        ds.verify_version(store, JOB, 4)
    monkeypatch.setenv("SNAPSHOTD_DURABLE_TEST_STALL", "mid-file")
    b = daemon_factory(extra_args=["--durable-url", url, "--durable-every-versions", "3",
                                   "--durable-keep", "3"]).start(timeout_s=START_S)
    m2, o2 = _model(seed=1)
    with Snapshotter(m2, o2, job_id=JOB, socket_path=b.socket, durable_url=url) as snap2:
        assert snap2.restore() == 2 and snap2.restored_method == "durable"
        for k, v in m2.state_dict().items():
            assert torch.equal(v, want2[k]), k
        # windows of 3 counted from the newest complete version (v4): v6 is due, and its
        # flush stalls halfway through the rank file
        _steps(m2, o2, snap2, [3, 4, 5, 6])
        wait_for(lambda: store.size(f"{JOB}/{ds.version_dir(6)}.stalled") is not None, 60,
                 "v6's flush stalled")
    b.kill(signal.SIGKILL)
    assert ds.complete_versions(store, JOB) == [2, 4]
    assert store.listdir(f"{JOB}/{ds.version_dir(6)}") == []  # an unfinished upload shows nothing
    assert json.loads(store.read_bytes(f"{JOB}/{ds.LATEST}"))["version"] == 4  # (a hint only)
    v, _idx, skipped = ds.newest_verified(store, JOB)
    assert v == 2 and "corrupt" in skipped[0]
