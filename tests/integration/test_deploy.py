"""deploy/ cannot drift from the daemon: every manifest, unit, script and image recipe is
checked against the Kubernetes API schemas and against snapshotd's own parsers.

- Kubernetes: every manifest validates offline (kubernetes-validate, strict: unknown
  fields are errors) for the oldest and newest API versions we claim; the kustomize
  base lists every manifest; the DaemonSet's command line parses with
  ``snapshotd_tools.cli.build_parser``; ports agree between the flags, containerPorts, probes,
  the Service, the Prometheus annotations and the spec; paths agree between the flags,
  volume mounts, the init script and the training Job; the memory limit follows the
  sizing formula; and the DaemonSet's own init script and command line start a real
  daemon whose gRPC health (the kubelet's probe), socket and metrics answer.
- systemd: the unit parses (and passes ``systemd-analyze verify`` where present), its
  hardening is there, and every variable of the environment file is one ``snapshotd
  serve`` reads, with a value its parser accepts.
- Slurm: the sbatch script parses (``bash -n``), its daemon and torchrun command lines
  parse with snapshotd's and torchrun's own parsers, its inline Python compiles.
- Docker: base images are pinned, ENTRYPOINT is the console script, CMD parses, EXPOSE
  matches the manifests, COPY sources exist, HEALTHCHECK compiles.
"""

from __future__ import annotations

import configparser
import glob
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
import uuid

import pytest
import yaml

from snapshotd_tools import cli
from snapshotd.wire import config as cfg
from snapshotd.core.spec import parse_spec
from snapshotd.node.spec_file import load_spec

try:
    import kubernetes_validate as kv
except ImportError:  # in the test extra; CI installs it, so there it is a failure
    if os.environ.get("CI"):
        raise
    pytest.skip("kubernetes-validate is not installed (pip install -e '.[test]')", allow_module_level=True)

from conftest import REPO
DEPLOY = os.path.join(REPO, "deploy")
K8S = os.path.join(DEPLOY, "kubernetes")
K8S_VERSIONS = ("1.27.0", kv.latest_version())  # grpc probes are GA from 1.27
GiB = 1 << 30
PROCESS_OVERHEAD = 3 * GiB // 2  # the daemon process beyond its segments (at least)


# -- helpers -------------------------------------------------------------------------------
def k8s_files() -> list[str]:
    return sorted(f for f in glob.glob(os.path.join(K8S, "**", "*.yaml"), recursive=True)
                  if os.path.basename(f) != "kustomization.yaml")


def k8s_docs() -> list[tuple[str, dict]]:
    out = []
    for f in k8s_files():
        with open(f) as fh:
            out += [(os.path.relpath(f, K8S), d) for d in yaml.safe_load_all(fh) if d]
    return out


def doc(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in k8s_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def serve_env_flags() -> dict[str, object]:
    """SNAPSHOTD_* variable -> the `serve` argparse action that reads it (from the help)."""
    serve = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices.items()
                 if a[0] == "serve")[1]
    out = {}
    for act in serve._actions:
        for name in re.findall(r"\[env (SNAPSHOTD_[A-Z0-9_]+)", act.help or ""):
            out[name] = act
    return out


def known_env() -> set[str]:
    """Every SNAPSHOTD_* name the daemon or the client reads."""
    names = set(serve_env_flags())
    names |= {v for k, v in vars(cfg).items() if k.startswith("ENV_")}
    for f in glob.glob(os.path.join(REPO, "snapshotd", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(REPO, "client", "**", "*.py"), recursive=True):
        src = open(f).read()
        names |= set(re.findall(r"""environ(?:\.get\(|\[)\s*["'](SNAPSHOTD_[A-Z0-9_]+)""", src))
        names |= set(re.findall(r"""_env\(\s*["'](SNAPSHOTD_[A-Z0-9_]+)""", src))
    return names


def parse_cli(argv: list[str]):
    """`snapshotd ARGV` through the daemon's own parser; a clear failure instead of exit 2.

    Flags must be spelled out: argparse would take an abbreviation (--instanc), which
    breaks as soon as another flag shares the prefix."""
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices.get(argv[0]) if argv else None
    assert sub is not None, f"{argv[:1]} is not a snapshotd subcommand"
    spelled = {o for act in sub._actions for o in act.option_strings}
    for tok in argv[1:]:
        if tok.startswith("--"):
            assert tok.split("=", 1)[0] in spelled, f"snapshotd {argv[0]} has no flag {tok} ({argv})"
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"snapshotd's parser rejects {argv}") from e


def env_to_argv(env: dict[str, str]) -> list[str]:
    """`serve` flags equivalent to SNAPSHOTD_* variables (so the parser checks the values)."""
    flags = serve_env_flags()
    argv = []
    for k, v in env.items():
        act = flags.get(k)
        if act is None or v == "":
            continue
        if act.nargs == 0:  # store_true
            argv.append(act.option_strings[-1])
        else:
            argv += [act.option_strings[-1], v]
    return argv


def port_of(addr: str) -> int:
    host, _, port = addr.rpartition(":")
    assert host and port.isdigit(), f"{addr!r} is not HOST:PORT"
    return int(port)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def expand_k8s(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of container args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def daemonset_parts():
    ds = doc("DaemonSet", "snapshotd")
    pod = ds["spec"]["template"]["spec"]
    ctr = next(c for c in pod["containers"] if c["name"] == "snapshotd")
    return ds, pod, ctr


def configmap_spec(peer_key: str = "test-key"):
    text = doc("ConfigMap", "snapshotd-spec")["data"]["spec.yaml"]
    return text, parse_spec(text + f'peer_key: "{peer_key}"\n')


def daemon_argv(node_index: int = 0) -> tuple[list[str], object]:
    """The DaemonSet's command line as the container would run it on spec node N."""
    _, pod, ctr = daemonset_parts()
    _, spec = configmap_spec()
    node = spec.nodes[node_index]
    env = {"NODE_NAME": node.id, "POD_IP": node.host}
    for e in ctr.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
    entry = dockerfile_entrypoint()
    argv = expand_k8s(ctr.get("command", []) + ctr["args"], env)
    if not ctr.get("command"):
        argv = entry[1:] + argv  # the image's ENTRYPOINT is the command
    return argv, parse_cli(argv)


def mounts_to_host(pod: dict, container: dict) -> dict[str, str]:
    """mountPath -> host path, for the container's hostPath mounts."""
    vols = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: vols[m["name"]]["hostPath"]["path"]
            for m in container.get("volumeMounts", []) if "hostPath" in vols[m["name"]]}


def host_path(pod: dict, container: dict, path: str) -> str:
    for mp, hp in sorted(mounts_to_host(pod, container).items(), key=lambda x: -len(x[0])):
        if path == mp or path.startswith(mp.rstrip("/") + "/"):
            return hp + path[len(mp):]
    raise AssertionError(f"{path} is not on a hostPath volume of container {container['name']}")


def mount_of(container: dict, path: str) -> dict:
    best = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if (path == mp or path.startswith(mp + "/")) and (best is None or len(mp) > len(best["mountPath"])):
            best = m
    assert best is not None, f"{path} is on no volume of container {container['name']}"
    return best


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) per Dockerfile instruction, continuations joined."""
    text = open(os.path.join(DEPLOY, "docker", "Dockerfile")).read()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ins, _, rest = line.partition(" ")
            out.append((ins.upper(), rest.strip()))
    return out


def dockerfile_entrypoint() -> list[str]:
    [entry] = [json.loads(r) for i, r in dockerfile() if i == "ENTRYPOINT"]
    return entry


# -- Kubernetes: schemas ---------------------------------------------------------------------
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_kubernetes_manifest_validates_against_the_api_schema(version):
    docs = k8s_docs()
    kinds = {d["kind"] for _, d in docs}
    assert {"DaemonSet", "Service", "ConfigMap", "Secret", "Job"} <= kinds, kinds
    for name, d in docs:
        try:
            kv.validate(d, version, strict=True)
        except kv.ValidationError as e:
            raise AssertionError(f"{name} ({d['kind']} {d['metadata']['name']}), "
                                 f"Kubernetes {version}: {e.message} at {list(e.path)}") from None


def test_the_schema_check_catches_a_broken_manifest():
    ds = doc("DaemonSet", "snapshotd")
    ds["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpcPort"] = 7000
    with pytest.raises(kv.ValidationError):
        kv.validate(ds, K8S_VERSIONS[0], strict=True)
    ds = doc("DaemonSet", "snapshotd")
    ds["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "7000"
    with pytest.raises(kv.ValidationError):
        kv.validate(ds, K8S_VERSIONS[0], strict=True)


def test_the_kustomize_base_lists_every_base_manifest_and_renders():
    with open(os.path.join(K8S, "kustomization.yaml")) as f:
        kust = yaml.safe_load(f)
    base = sorted(os.path.basename(f) for f in glob.glob(os.path.join(K8S, "*.yaml"))
                  if os.path.basename(f) != "kustomization.yaml")
    assert sorted(kust["resources"]) == base
    images = {i["name"] for i in kust.get("images", [])}
    for _, d in k8s_docs():
        spec = d.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            name = c["image"].split(":")[0]
            assert name in images or ":" in c["image"], f"{c['name']}: image {c['image']} is not pinned"
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return  # rendering needs kubectl (its built-in kustomize); the rest is checked above
    out = subprocess.run([kubectl, "kustomize", K8S], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(rendered) == len(kust["resources"])
    for d in rendered:
        kv.validate(d, K8S_VERSIONS[-1], strict=True)
        if d["kind"] not in ("Namespace", "PriorityClass"):
            assert d["metadata"]["namespace"] == kust["namespace"]


# -- Kubernetes: the DaemonSet against the daemon ---------------------------------------------
def test_daemonset_command_line_is_one_the_daemon_accepts():
    argv, a = daemon_argv()
    _, pod, ctr = daemonset_parts()
    _, spec = configmap_spec()
    assert a.command == "serve"
    assert a.node_id == spec.nodes[0].id
    env_names = {e["name"] for e in ctr.get("env", [])}
    assert {n for n in env_names if n.startswith("SNAPSHOTD_")} <= known_env()
    assert cfg.parse_size(a.memory_budget_bytes) > 0
    assert a.tcp and (a.token or a.token_file), "a TCP listener needs a token"
    # $(NODE_NAME) is the node's name, as in the spec
    node_env = next(e for e in ctr["env"] if e["name"] == "NODE_NAME")
    assert node_env["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "$(NODE_NAME)" in ctr["args"][ctr["args"].index("--node-id") + 1]
    assert pod["hostNetwork"] is True  # the spec's hosts are the nodes' addresses


def test_daemonset_ports_agree_with_probes_service_annotations_and_spec():
    _, a = daemon_argv()
    ds, pod, ctr = daemonset_parts()
    _, spec = configmap_spec()
    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    grpc_port, metrics_port = port_of(a.tcp), port_of(a.metrics_addr)
    assert ports["grpc"] == grpc_port
    assert ports["metrics"] == metrics_port
    assert {n.port for n in spec.nodes} == {grpc_port}, "spec port != the daemon's gRPC port"
    assert {n.peer_port for n in spec.nodes} == {ports["peer"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = ctr[probe]
        assert "grpc" in p, f"{probe} is not a grpc.health.v1 probe"
        assert p["grpc"]["port"] == grpc_port, f"{probe} probes {p['grpc']['port']}, not the TCP listener"
        assert p["grpc"].get("service", "") == ""  # the daemon reports overall health on ""
    ann = ds["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == metrics_port
    svc = doc("Service", "snapshotd-peers")
    assert svc["spec"]["clusterIP"] == "None", "the Service must be headless"
    assert svc["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    for sp in svc["spec"]["ports"]:
        target = sp.get("targetPort", sp["port"])
        target = ports[target] if isinstance(target, str) else target
        assert sp["port"] == target == ports[sp["name"]], sp
    assert int(svc["metadata"]["annotations"]["prometheus.io/port"]) == metrics_port


def test_daemonset_paths_are_on_the_volumes_the_daemon_and_init_script_need():
    _, a = daemon_argv()
    ds, pod, ctr = daemonset_parts()
    vols = {v["name"]: v for v in pod["volumes"]}
    # socket and state on host paths (they outlive the container); /dev/shm is the host's
    host_socket = host_path(pod, ctr, a.socket)
    assert host_path(pod, ctr, a.state_dir).startswith("/var/lib/")
    assert host_path(pod, ctr, "/dev/shm") == "/dev/shm"
    # the token comes from the Secret, which has that key
    tok = mount_of(ctr, a.token_file)
    secret = doc("Secret", vols[tok["name"]]["secret"]["secretName"])
    assert os.path.basename(a.token_file) in secret["stringData"]
    # the spec: written by the init container into the volume the daemon reads it from
    init = next(c for c in pod["initContainers"] if c["name"] == "prepare")
    spec_mount = mount_of(ctr, a.spec)
    assert spec_mount["name"] in {m["name"] for m in init["volumeMounts"]}
    init_spec_dir = next(m["mountPath"] for m in init["volumeMounts"] if m["name"] == spec_mount["name"])
    script = init["command"][-1]
    assert os.path.join(init_spec_dir, os.path.relpath(a.spec, spec_mount["mountPath"])) in script
    cm_mount = next(m for m in init["volumeMounts"] if "configMap" in vols[m["name"]])
    cm = doc("ConfigMap", vols[cm_mount["name"]]["configMap"]["name"])
    for key in cm["data"]:
        assert os.path.join(cm_mount["mountPath"], key) in script
    # the init container prepares the host directories the daemon writes
    for d in (os.path.dirname(a.socket), a.state_dir):
        assert d in script, f"the init script does not prepare {d}"
    assert host_socket == "/run/snapshotd/snapshotd.sock"


def test_daemonset_memory_follows_the_sizing_formula():
    ds, pod, ctr = daemonset_parts()
    _, a = daemon_argv()
    _, spec = configmap_spec()
    data = cfg.parse_size(ds["metadata"]["annotations"]["snapshotd.io/data-per-node"])
    need = 2 * data * (1 + spec.m / spec.k)  # own data + m/k parity, twice: committed + in flight
    budget = cfg.parse_size(a.memory_budget_bytes)
    assert need <= budget <= need * 1.1, (budget / GiB, need / GiB)
    res = ctr["resources"]
    limit = cfg.parse_size(res["limits"]["memory"].replace("Gi", "GiB").replace("Mi", "MiB"))
    assert res["requests"]["memory"] == res["limits"]["memory"], "memory request != limit"
    assert limit >= budget + PROCESS_OVERHEAD, (limit / GiB, budget / GiB)
    assert limit <= budget + 4 * GiB, "limit far above the formula: the formula and the limit drifted"
    assert res["requests"]["cpu"] == res["limits"]["cpu"]  # Guaranteed QoS


def test_configmap_spec_is_valid_and_survives_its_failure_domains():
    text, spec = configmap_spec()
    assert "peer_key" not in text, "the peer key belongs in the Secret"
    assert spec.domain_warnings() == []
    assert spec.m >= 1
    ds = doc("DaemonSet", "snapshotd")
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] <= spec.m


def _run_init_script(tmp_path, peer_key: str) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """The DaemonSet's init script, run for real with its paths moved under tmp_path."""
    _, pod, _ = daemonset_parts()
    init = next(c for c in pod["initContainers"] if c["name"] == "prepare")
    vols = {v["name"]: v for v in pod["volumes"]}
    script = init["command"][-1]
    moved = {}
    for m in sorted(init["volumeMounts"], key=lambda m: -len(m["mountPath"])):
        d = str(tmp_path / m["name"])
        os.makedirs(d, exist_ok=True)
        moved[m["mountPath"]] = d
        v = vols[m["name"]]
        if "secret" in v:
            sec = doc("Secret", v["secret"]["secretName"])["stringData"]
            for k in sec:
                with open(os.path.join(d, k), "w") as f:
                    f.write(peer_key if k == "peer-key" else "tok")
        if "configMap" in v:
            for k, val in doc("ConfigMap", v["configMap"]["name"])["data"].items():
                with open(os.path.join(d, k), "w") as f:
                    f.write(val)
    for old in sorted(moved, key=len, reverse=True):
        script = script.replace(old, moved[old])
    script = script.replace("10001:10001", f"{os.getuid()}:{os.getgid()}")
    return subprocess.run(init["command"][:-1] + [script], capture_output=True, text=True,
                          timeout=30), moved


def test_init_script_renders_a_spec_the_daemon_loads_and_refuses_the_placeholder_key(tmp_path):
    r, moved = _run_init_script(tmp_path / "a", "CHANGE-ME-peer-key")
    assert r.returncode != 0 and "set peer-key" in r.stderr
    assert not os.path.exists(os.path.join(moved["/run/snapshotd-spec"], "spec.yaml"))
    r, moved = _run_init_script(tmp_path / "b", "0123abcd" * 8)
    assert r.returncode == 0, r.stderr
    spec = load_spec(os.path.join(moved["/run/snapshotd-spec"], "spec.yaml"))
    assert spec.peer_key == "0123abcd" * 8
    assert oct(os.stat(moved["/run/snapshotd"]).st_mode & 0o777) == "0o750"


def test_daemonset_command_line_starts_a_daemon_whose_probe_socket_and_metrics_answer(tmp_path):
    """The real thing, on one machine: the init script renders the spec, the DaemonSet's
    argv (paths under tmp_path, spec hosts on 127.0.0.1 with free ports) starts
    `snapshotd serve`, and the kubelet's probe (grpc.health.v1 on the TCP port, no
    token), the socket (0600) and the Prometheus endpoint answer."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    r, moved = _run_init_script(tmp_path, "0123abcd" * 8)
    assert r.returncode == 0, r.stderr
    spec_file = os.path.join(moved["/run/snapshotd-spec"], "spec.yaml")
    with open(spec_file) as f:
        raw = yaml.safe_load(f)
    ports = free_ports(2 * len(raw["nodes"]) + 1)
    for i, n in enumerate(raw["nodes"]):
        n["host"], n["port"], n["peer_port"] = "127.0.0.1", ports[2 * i], ports[2 * i + 1]
    os.chmod(spec_file, 0o600)
    with open(spec_file, "w") as f:
        yaml.safe_dump(raw, f)
    argv, _ = daemon_argv()
    me = raw["nodes"][0]
    metrics_port = ports[-1]
    subst = {"/run/snapshotd-spec": moved["/run/snapshotd-spec"], "/run/snapshotd": moved["/run/snapshotd"],
             "/var/lib/snapshotd": moved["/var/lib/snapshotd"], "/etc/snapshotd/secret": moved["/etc/snapshotd/secret"]}
    real = []
    for x in argv:
        for old in sorted(subst, key=len, reverse=True):
            if x == old or x.startswith(old + "/"):
                x = subst[old] + x[len(old):]
                break
        real.append(x)
    real[real.index("--tcp") + 1] = f"127.0.0.1:{me['port']}"
    real[real.index("--metrics-addr") + 1] = f"127.0.0.1:{metrics_port}"
    real[real.index("--memory-budget-bytes") + 1] = "64MiB"
    ready = tmp_path / "ready.json"
    real += ["--instance", "dep" + uuid.uuid4().hex[:8], "--log-level", "WARNING",
             "--ready-file", str(ready)]
    sock = real[real.index("--socket") + 1]
    proc = subprocess.Popen([sys.executable, "-m", "snapshotd_tools.cli", *real], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Wait on the daemon's own signal (its ready file, with its pid), not on a port
        # answering: another process could hold the port (a probe answered SERVING once
        # while this daemon's metrics port refused). Once ready, every promise holds at once.
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, f"daemon exited {proc.returncode}: {proc.stdout.read()}"
            assert time.monotonic() < deadline, "no ready file in 60 s"
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert info["pid"] == proc.pid and info["tcp_port"] == me["port"]
        assert info["metrics_port"] == metrics_port
        with grpc.insecure_channel(f"127.0.0.1:{me['port']}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        from snapshotd_tools.cli import main as snapshotd_cli

        assert snapshotd_cli(["health", "--quiet", "--target", f"127.0.0.1:{me['port']}"]) == 0
        assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert "snapshotd_" in body
        # the token from the Secret file guards the API on TCP
        from snapshotd.wire.errors import SnapshotdError
        from snapshotd_client.transport import DaemonClient

        with pytest.raises(SnapshotdError):
            DaemonClient(f"127.0.0.1:{me['port']}", token="wrong", timeout_s=5).stats()
        st = DaemonClient(f"127.0.0.1:{me['port']}", token="tok", timeout_s=5).stats()
        assert st.node_id == me["id"]
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_training_job_reaches_its_nodes_daemon():
    _, pod, ctr = daemonset_parts()
    _, a = daemon_argv()
    job = doc("Job")
    jpod = job["spec"]["template"]["spec"]
    [trainer] = jpod["containers"]
    env = {e["name"]: e for e in trainer["env"]}
    assert {n for n in env if n.startswith("SNAPSHOTD_")} <= known_env()
    # the same host socket and the same host /dev/shm as the daemon
    assert host_path(jpod, trainer, env["SNAPSHOTD_SOCKET"]["value"]) == host_path(pod, ctr, a.socket)
    assert host_path(jpod, trainer, "/dev/shm") == host_path(pod, ctr, "/dev/shm")
    # the socket and segments are 0600: the trainer runs as the daemon's user
    assert jpod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsUser"]
    # the daemon asks every client for its token: the trainer reads it from the same Secret
    ref = env["SNAPSHOTD_TOKEN"]["valueFrom"]["secretKeyRef"]
    vols = {v["name"]: v for v in pod["volumes"]}
    tok_vol = vols[mount_of(ctr, a.token_file)["name"]]
    assert ref["name"] == tok_vol["secret"]["secretName"] and ref["key"] == os.path.basename(a.token_file)
    assert env["SNAPSHOTD_JOB_ID"]["value"], "a job id that is stable across retries"
    assert jpod["nodeSelector"].items() <= pod["nodeSelector"].items()
    # torchrun's own parser accepts the command; the script is the one the image ships
    from torch.distributed.run import get_args_parser

    assert trainer["command"][0] == "torchrun"
    targs = get_args_parser().parse_args(trainer["command"][1:])
    copied = [r.split() for i, r in dockerfile() if i == "COPY" and "deploy/examples" in r]
    assert copied, "the image does not ship deploy/examples"
    src, dst = copied[0][-2:]
    assert targs.training_script.startswith(dst.rstrip("/") + "/")
    local = os.path.join(REPO, src, os.path.relpath(targs.training_script, dst))
    assert os.path.exists(local), local
    train_parser().parse_args(targs.training_script_args)


def train_parser():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_ddp", os.path.join(DEPLOY, "examples", "train_ddp.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_parser()


def test_make_spec_writes_the_configmap_spec_from_kubectl_nodes(tmp_path):
    nodes = {"kind": "List", "items": [
        {"metadata": {"name": f"gpu-node-{i}", "labels": {"topology.kubernetes.io/zone": f"z{i % 2}"}},
         "status": {"addresses": [{"type": "Hostname", "address": f"gpu-node-{i}"},
                                  {"type": "InternalIP", "address": f"10.1.0.{i}"}]}}
        for i in range(4)]}
    script = os.path.join(K8S, "make-spec.py")
    r = subprocess.run([sys.executable, script, "--group-size", "4", "--parity", "2"],
                       input=json.dumps(nodes), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    spec = parse_spec(r.stdout + 'peer_key: "k"\n')
    assert [(n.id, n.host, n.failure_domain) for n in spec.nodes] == \
        [(f"gpu-node-{i}", f"10.1.0.{i}", f"z{i % 2}") for i in range(4)]
    _, cm = configmap_spec()
    assert {n.port for n in spec.nodes} == {n.port for n in cm.nodes}
    assert {n.peer_port for n in spec.nodes} == {n.peer_port for n in cm.nodes}
    assert r.stderr == ""
    # two of four in a zone with m = 1: the warning names the risk
    r = subprocess.run([sys.executable, script, "--group-size", "4", "--parity", "1"],
                       input=json.dumps(nodes), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0 and "would lose more than m nodes" in r.stderr
    r = subprocess.run([sys.executable, script, "--group-size", "3", "--parity", "1"],
                       input=json.dumps(nodes), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2 and "cannot form groups of 3" in r.stderr


# -- systemd ----------------------------------------------------------------------------------
def read_unit(path: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # keys are case-sensitive
    cp.read(path)
    return cp


def read_env_file(path: str) -> dict[str, str]:
    out = {}
    for ln, line in enumerate(open(path), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", line)
        assert m, f"{path}:{ln}: not KEY=VALUE: {line!r}"
        out[m.group(1)] = m.group(2).strip('"')
    return out


def test_systemd_unit_is_hardened_and_its_command_and_environment_parse():
    unit = read_unit(os.path.join(DEPLOY, "systemd", "snapshotd.service"))
    svc = unit["Service"]
    assert svc["Restart"] == "on-failure"
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["ProtectSystem"] == "strict"
    assert svc["User"] not in ("", "root", "0")
    rw = svc["ReadWritePaths"].split()
    env = read_env_file(os.path.join(DEPLOY, "systemd", "snapshotd.env"))
    assert svc["EnvironmentFile"].lstrip("-").endswith(os.path.basename("snapshotd.env"))
    # every variable is one the daemon reads, with a value its parser takes
    unknown = set(env) - set(serve_env_flags()) - {cfg.ENV_NODE_ID, cfg.ENV_STATE_DIR, cfg.ENV_SOCKET}
    assert not unknown, f"snapshotd serve does not read {sorted(unknown)}"
    exec_argv = shlex.split(svc["ExecStart"])
    assert os.path.basename(exec_argv[0]) == dockerfile_entrypoint()[0]
    a = parse_cli(exec_argv[1:] + env_to_argv(env))
    assert a.command == "serve"
    # the paths the daemon writes are the ones systemd makes and lets it write
    run_dir = "/run/" + svc["RuntimeDirectory"]
    state_dir = "/var/lib/" + svc["StateDirectory"]
    assert os.path.dirname(env[cfg.ENV_SOCKET]) == run_dir
    assert env[cfg.ENV_STATE_DIR] == state_dir
    for p in ("/dev/shm", run_dir, state_dir):
        assert p in rw, f"{p} is not in ReadWritePaths"
    # same ports as the Kubernetes manifests
    _, k8s = daemon_argv()
    assert port_of(env["SNAPSHOTD_TCP"]) == port_of(k8s.tcp)
    assert port_of(env["SNAPSHOTD_METRICS_ADDR"]) == port_of(k8s.metrics_addr)
    assert cfg.parse_size(env[cfg.ENV_MEMORY_BUDGET]) == cfg.parse_size(k8s.memory_budget_bytes)


def test_systemd_analyze_verifies_the_unit(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (the unit is still parsed above)")
    src = open(os.path.join(DEPLOY, "systemd", "snapshotd.service")).read()
    exe = shlex.split(re.search(r"^ExecStart=(.*)$", src, re.M).group(1))[0]
    path = tmp_path / "snapshotd.service"
    path.write_text(src.replace(exe, shutil.which("true")))  # the binary is not installed here
    r = subprocess.run([tool, "verify", str(path)], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if str(path) in ln or "snapshotd.service" in ln]
    assert r.returncode == 0 and not lines, "\n".join(lines)


# -- Slurm ------------------------------------------------------------------------------------
SBATCH = os.path.join(DEPLOY, "slurm", "snapshotd.sbatch")


def _expand(word: str, values: dict[str, str]) -> str:
    word = re.sub(r"\$\(\((.*?)\)\)", "29501", word)
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: values.get(m.group(1), "X"), word)


def test_sbatch_script_parses_and_its_command_lines_are_accepted(tmp_path):
    r = subprocess.run(["bash", "-n", SBATCH], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = open(SBATCH).read()
    assert text.startswith("#!/bin/bash") and "#SBATCH --nodes" in text
    assert set(re.findall(r"\bSNAPSHOTD_[A-Z0-9_]+", text)) <= known_env()
    # with --tcp the daemon needs a token: the script exports SNAPSHOTD_TOKEN for it
    assert "export SNAPSHOTD_TOKEN" in text
    # The spec the script builds, run by bash for 2 nodes (n = 2, m = 1)
    block = re.search(r'(SNAP_SPEC_YAML="group_size.*?)export SNAP_SPEC_YAML\n', text, re.S).group(1)
    r = subprocess.run(["bash", "-c", 'GROUP=2 PARITY=1 GRPC_PORT=7000 PEER_PORT=7100 PEER_KEY=k; '
                        'NODES=(node0 node1); ' + block + 'printf "%s" "$SNAP_SPEC_YAML"'],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    spec_yaml = r.stdout
    assert [n.id for n in parse_spec(spec_yaml).nodes] == ["node0", "node1"]
    # The per-node daemon command, run by bash for real with `snapshotd` replaced by a shim
    # that prints its argv: the real quoting and expansion, then snapshotd's parser.
    body = re.search(r"--label bash -c '([^']*)' &", text).group(1)
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "snapshotd").write_text(f"#!/bin/sh\nexec {sys.executable} -c "
                                    "'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\"\n")
    os.chmod(shim / "snapshotd", 0o755)
    env = dict(os.environ, PATH=f"{shim}{os.pathsep}{os.environ['PATH']}",
               SNAP_RUN_DIR=str(tmp_path / "run"), SNAP_SPEC_YAML=spec_yaml, SLURMD_NODENAME="node1",
               SNAP_TCP="0.0.0.0:7000", SNAP_INSTANCE="slurm1")
    r = subprocess.run(["bash", "-c", body], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    a = parse_cli(json.loads(r.stdout))
    assert a.command == "serve" and a.node_id == "node1" and a.instance == "slurm1"
    spec = load_spec(a.spec)  # the file the body wrote
    assert spec.node(a.node_id).port == port_of(a.tcp)
    assert os.path.dirname(a.socket) == str(tmp_path / "run")
    assert re.search(r'export SNAPSHOTD_SOCKET="\$SNAP_RUN_DIR/snapshotd.sock"', text), \
        "the trainers' socket is not the daemon's"
    assert a.socket == str(tmp_path / "run" / "snapshotd.sock")
    assert 'SNAP_TCP="0.0.0.0:$GRPC_PORT"' in text
    # torchrun: its own parser takes the launch line
    from torch.distributed.run import get_args_parser

    flat = re.sub(r"\\\n\s*", " ", text)
    values = {"NNODES": "2", "NPROC": "2", "HEAD": "node0", "RDZV_PORT": "29500", "attempt": "1",
              "SLURM_JOB_ID": "1", "SNAP_RUN_DIR": "/tmp/r"}
    tr = re.search(r"torchrun ([^;\n]*)\"\$\{TRAIN\[@\]\}\"", flat).group(1)
    targs = get_args_parser().parse_args([_expand(w, values) for w in shlex.split(tr)] + ["train.py"])
    assert targs.rdzv_backend == "c10d" and targs.nnodes == "2" and targs.nproc_per_node == "2"
    # the default training script exists, and the health check is `snapshotd health`
    default = re.search(r'SNAP_TRAIN:-([^}]+)\}', text).group(1)
    assert os.path.exists(os.path.join(REPO, default))
    assert "<<'PY'" not in text and "grpc_health" not in text, "an inline Python probe is back"
    health = re.search(r"snapshotd (health [^\n]*?)\s*\\?\n", text).group(1)
    h = parse_cli([_expand(w, {**values, "node": "node1", "GRPC_PORT": "7000"})
                   for w in shlex.split(health.replace('"$1"', "60"))])
    assert h.command == "health" and h.target == "node1:7000" and h.wait == 60
    # the stats call at the end is a real subcommand with the daemon's socket
    stats = re.search(r"snapshotd (stats [^\n]*)", flat).group(1)
    s = parse_cli([_expand(w, values) for w in shlex.split(stats)])
    assert s.command == "stats" and s.socket == "/tmp/r/snapshotd.sock"


def test_setup_and_ci_scripts_parse():
    for f in ("scripts/setup-slurm", ".ci/run", "scripts/setup"):
        path = os.path.join(REPO, f)
        assert os.access(path, os.X_OK), f"{f} is not executable"
        r = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
        assert r.returncode == 0, (f, r.stderr)
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    assert "./scripts/setup && .venv/bin/python -m pytest" in ci
    assert ci.index("setup-slurm") < ci.index("./scripts/setup &&")


# -- Docker -----------------------------------------------------------------------------------
def test_dockerfile_lints():
    ins = dockerfile()
    froms = [r.split()[0] for i, r in ins if i == "FROM"]
    assert froms and all(":" in f and not f.endswith(":latest") for f in froms), froms
    entry = dockerfile_entrypoint()
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert entry[0] in scripts, f"ENTRYPOINT {entry} is not a console script of the package"
    [cmd] = [json.loads(r) for i, r in ins if i == "CMD"]
    a = parse_cli(entry[1:] + cmd)
    assert a.command == "serve"
    exposed = {int(p.split("/")[0]) for i, r in ins if i == "EXPOSE" for p in r.split()}
    _, _, ctr = daemonset_parts()
    assert exposed == {p["containerPort"] for p in ctr["ports"]}
    for i, r in ins:
        if i == "COPY" and "--from" not in r:
            for src in r.split()[:-1]:
                assert os.path.exists(os.path.join(REPO, src)), f"COPY {src}: not in the repository"
    # `pip install .` in the image needs every package folder pyproject names.
    copied = {os.path.normpath(src) for i, r in ins if i == "COPY" and "--from" not in r
              for src in r.split()[:-1]}
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        package_dirs = tomllib.load(f)["tool"]["setuptools"]["package-dir"].values()
    for d in package_dirs:
        top = os.path.normpath(d).split(os.sep)[0]
        assert top in copied, f"the image builds from pyproject, which needs {d}/, but no COPY brings {top}"
    users = [r for i, r in ins if i == "USER"]
    _, pod, _ = daemonset_parts()
    assert users and users[-1].split(":")[0] == str(pod["securityContext"]["runAsUser"])
    envs = set(re.findall(r"\b(SNAPSHOTD_[A-Z0-9_]+)=", " ".join(r for i, r in ins if i == "ENV")))
    assert envs <= known_env()
    [hc] = [r for i, r in ins if i == "HEALTHCHECK"]
    hc_cmd = json.loads(hc[hc.index("CMD") + 3:].strip())
    assert hc_cmd[0] == entry[0], "the health check is the package's own `snapshotd health`"
    h = parse_cli(hc_cmd[1:])
    assert h.command == "health" and h.socket == a.socket
