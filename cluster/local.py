#!/usr/bin/env python
"""A local Ray cluster (and optional moto S3 server) bound to 127.0.0.1 only.

    python cluster/local.py up     --state-dir DIR [--num-cpus N] [--object-store-memory BYTES] [--s3]
    python cluster/local.py status --state-dir DIR      # exit 0 if up, 3 if not
    python cluster/local.py down   --state-dir DIR

`up` picks free ports for everything, so several clusters (different state dirs) can run on one machine.
It writes DIR/cluster.json:

    {"ray_address": "127.0.0.1:PORT",            # GCS address (ray.init(address=...), --address of workers)
     "dashboard_url": "http://127.0.0.1:PORT",   # what `ray job submit --address` takes
     "s3_endpoint": "http://127.0.0.1:PORT" | null,
     "pids": {"ray": PID, "s3": PID | null},     # each the leader of its own session / process group
     "temp_dir": "/tmp/lr-<hash>",               # Ray's --temp-dir, unique to this cluster
     "ports": {...}, "num_cpus": N, "object_store_memory": BYTES, "state_dir": DIR, "started_at": ...,
     "env": {...}}                               # env vars every client must set

Never runs a bare `ray stop` (that would stop every Ray on the machine): `down` kills exactly the processes of
this cluster (its process sessions, plus anything whose command line names its temp dir).

Importable: `up(state_dir, ...) -> dict`, `down(state_dir) -> dict`, `status(state_dir) -> dict`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

HOST = "127.0.0.1"
STATE_FILE = "cluster.json"
LOCK_FILE = "lock"
DEFAULT_OBJECT_STORE_MEMORY = 300 * 1024 * 1024
WORKER_PORT_COUNT = 64

# Env every process of the cluster and every client must share.
CLUSTER_ENV = {
    # Ray 2.60 enforces token auth unless disabled; cluster and clients must agree.
    "RAY_AUTH_MODE": "disabled",
    # With this unset Ray 2.60 binds to the machine's network address even when told 127.0.0.1.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# Fake credentials for the moto S3 server.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


class ClusterError(RuntimeError):
    pass


class ClusterAlreadyRunning(ClusterError):
    pass


# --------------------------------------------------------------------------------------------------- helpers
def _python() -> str:
    return sys.executable


def _ray_cli() -> str:
    cand = Path(sys.executable).with_name("ray")
    if cand.exists():
        return str(cand)
    found = shutil.which("ray")
    if not found:
        raise ClusterError("the `ray` command was not found next to the Python interpreter nor on PATH")
    return found


def temp_dir_for(state_dir: Path) -> str:
    """Short per-cluster Ray temp dir (Ray's unix socket paths must stay under ~107 characters)."""
    digest = hashlib.sha1(str(Path(state_dir).resolve()).encode()).hexdigest()[:10]
    return f"/tmp/lr-{digest}"


def _port_free(port: int) -> bool:
    for host in (HOST, "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def _pick_ports(n: int, avoid: set[int]) -> list[int]:
    """n distinct free ports (kernel-chosen, free on every address), not in avoid. The sockets are held open
    until all n are chosen so the kernel hands out distinct ports."""
    socks, ports = [], []
    try:
        for _ in range(n * 20):
            if len(ports) >= n:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("0.0.0.0", 0))
            socks.append(s)
            p = s.getsockname()[1]
            if p not in avoid and p not in ports:
                ports.append(p)
    finally:
        for s in socks:
            s.close()
    if len(ports) < n:
        raise ClusterError("could not find enough free ports")
    return ports


def _pick_worker_range(count: int, avoid: set[int]) -> tuple[int, int]:
    """A contiguous free range for Ray workers, below the Linux ephemeral range (32768+)."""
    rng = random.Random()
    for _ in range(200):
        lo = rng.randrange(20000, 32000 - count)
        hi = lo + count - 1
        if any(p in avoid for p in range(lo, hi + 1)):
            continue
        if all(_port_free(p) for p in range(lo, hi + 1)):
            return lo, hi
    raise ClusterError("could not find a free range of worker ports")


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _tcp_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _proc_table() -> list[dict]:
    """All live processes: pid, ppid, pgid, sid, cmdline (psutil; zombies left out)."""
    out = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "status"]):
        info = proc.info
        if info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            pgid, sid = os.getpgid(info["pid"]), os.getsid(info["pid"])
        except OSError:  # exited since the listing
            continue
        out.append({"pid": info["pid"], "ppid": info["ppid"], "pgid": pgid, "sid": sid,
                    "cmd": " ".join(info["cmdline"] or [])})
    return out


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmdline(pid: int) -> str | None:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return None


def _leaders(info: dict) -> set[int]:
    """The recorded session leaders, minus any whose pid now belongs to an unrelated process (pid reuse after
    the cluster died). A dead leader stays: Linux does not reuse a pid while it is still some process's
    session id, so its session's remaining processes are still ours."""
    pids = info.get("pids") or {}
    marks = {"ray": info.get("temp_dir") or "\0", "s3": "moto.server"}
    out = set()
    for kind, pid in pids.items():
        if not pid:
            continue
        cmd = _cmdline(pid)
        if cmd is None or not _pid_alive(pid) or marks.get(kind, "") in cmd:  # gone, zombie, or ours
            out.add(pid)
    return out


def cluster_processes(info: dict) -> list[dict]:
    """Processes that belong to the cluster: in the sessions we started, descendants of them, or naming the
    temp dir on their command line. (Ray workers rename themselves to `ray::...`, so session ids matter.)"""
    leaders = _leaders(info)
    temp_dir = info.get("temp_dir")
    table = _proc_table()
    me = os.getpid()
    chosen = {
        p["pid"]
        for p in table
        if p["pid"] != me
        and (p["sid"] in leaders or p["pgid"] in leaders or p["pid"] in leaders or (temp_dir and temp_dir in p["cmd"]))
    }
    for pid in list(chosen):  # add descendants (a child that called setsid itself)
        with contextlib.suppress(psutil.Error):
            chosen.update(c.pid for c in psutil.Process(pid).children(recursive=True) if c.pid != me)
    return [p for p in table if p["pid"] in chosen]


def processes_naming(text: str) -> list[dict]:
    return [p for p in _proc_table() if text in p["cmd"] and p["pid"] != os.getpid()]


def listening_sockets(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of the TCP listening sockets owned by pids (IPv4 and IPv6)."""
    out = set()
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        out.update((c.laddr.ip, c.laddr.port, pid) for c in conns if c.status == psutil.CONN_LISTEN)
    return sorted(out, key=lambda t: (t[1], t[0]))


def _signal_and_wait(info: dict, pick, grace: float) -> None:
    """SIGTERM the cluster processes chosen by pick(proc), wait up to grace seconds, SIGKILL the rest."""
    targets = {p["pid"] for p in cluster_processes(info) if pick(p)}
    if not targets:
        return
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline:
        time.sleep(0.2)
        if not any(_pid_alive(pid) for pid in targets):
            return
    for pid in targets:
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _kill_all(info: dict, grace: float = 10.0) -> list[int]:
    """Stop exactly this cluster's processes, in `ray stop`'s order (raylet, then the other Ray processes,
    then gcs_server, then the `ray start --block` leader and the S3 server), each step SIGTERM then SIGKILL
    after its share of grace; finally SIGKILL whatever is left. Returns pids that survived all that."""
    leaders = _leaders(info)
    step = max(grace / 4, 0.5)

    def is_raylet(p):
        return "/raylet/raylet " in p["cmd"] + " "

    def is_gcs(p):
        return "/gcs/gcs_server " in p["cmd"] + " "

    _signal_and_wait(info, is_raylet, step)
    _signal_and_wait(info, lambda p: p["pid"] not in leaders and not is_gcs(p), step)
    _signal_and_wait(info, is_gcs, step)
    _signal_and_wait(info, lambda p: True, step)
    procs = cluster_processes(info)
    for _ in range(5):
        if not procs:
            break
        for p in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p["pid"], signal.SIGKILL)
        time.sleep(0.3)
        procs = cluster_processes(info)
    # reap our own children (only when `up` ran in this very process)
    for pid in leaders:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
    return [p["pid"] for p in procs]


def read_state(state_dir: str | os.PathLike) -> dict | None:
    f = Path(state_dir) / STATE_FILE
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _alive(info: dict) -> dict:
    pids = info.get("pids") or {}
    leaders = _leaders(info)
    out = {"ray": pids.get("ray") in leaders and _pid_alive(pids.get("ray"))}
    if pids.get("s3"):
        out["s3"] = pids.get("s3") in leaders and _pid_alive(pids.get("s3"))
    return out


@contextlib.contextmanager
def _lock(state_dir: Path):
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ClusterAlreadyRunning(
                f"another `up`/`down` is in progress for state dir {state_dir} (lock {state_dir / LOCK_FILE})"
            ) from None
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------- S3
def _start_s3(state_dir: Path, env: dict, avoid: set[int]) -> tuple[subprocess.Popen, int]:
    last = ""
    for _ in range(3):
        (port,) = _pick_ports(1, avoid)
        log = open(state_dir / "s3.log", "ab")
        proc = subprocess.Popen(
            [_python(), "-m", "moto.server", "-H", HOST, "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        log.close()
        deadline = time.time() + 60
        while time.time() < deadline:
            if proc.poll() is not None:
                break
            if _http_ok(f"http://{HOST}:{port}/moto-api/data.json", timeout=1):
                return proc, port
            time.sleep(0.2)
        last = (state_dir / "s3.log").read_text(errors="replace")[-2000:]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        avoid.add(port)
    raise ClusterError(f"moto S3 server did not come up; log tail:\n{last}")


# --------------------------------------------------------------------------------------------------- API
def up(
    state_dir: str | os.PathLike,
    num_cpus: int | None = None,
    object_store_memory: int = DEFAULT_OBJECT_STORE_MEMORY,
    s3: bool = False,
    timeout: float = 180.0,
    num_gpus: int = 0,
) -> dict:
    """Start the cluster, write and return cluster.json. Raises ClusterAlreadyRunning if this state dir
    already has a live cluster."""
    state_dir = Path(state_dir).resolve()
    with _lock(state_dir):
        old = read_state(state_dir)
        if old is not None:
            alive = _alive(old)
            if any(alive.values()):
                raise ClusterAlreadyRunning(
                    f"a cluster is already running for state dir {state_dir}: ray_address={old.get('ray_address')} "
                    f"dashboard={old.get('dashboard_url')} pids={old.get('pids')} (run `down` first)"
                )
            _kill_all(old, grace=2)  # stale state: clean leftovers
            (state_dir / STATE_FILE).unlink(missing_ok=True)

        num_cpus = int(num_cpus or os.cpu_count() or 1)
        temp_dir = temp_dir_for(state_dir)
        if processes_naming(temp_dir):
            raise ClusterAlreadyRunning(f"processes using Ray temp dir {temp_dir} are still running")
        shutil.rmtree(temp_dir, ignore_errors=True)

        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)
        env.update(CLUSTER_ENV)
        # job entrypoints run `python ...`: make that the interpreter (venv) the cluster runs on
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        env.pop("PYTHONHOME", None)
        client_env = dict(CLUSTER_ENV)

        info: dict = {"state_dir": str(state_dir), "temp_dir": temp_dir, "pids": {"ray": None, "s3": None}}
        s3_proc = None
        try:
            avoid: set[int] = set()
            s3_endpoint = None
            if s3:
                s3_env = dict(env)
                s3_env.update(S3_ENV)
                s3_proc, s3_port = _start_s3(state_dir, s3_env, avoid)
                avoid.add(s3_port)
                info["pids"]["s3"] = s3_proc.pid
                s3_endpoint = f"http://{HOST}:{s3_port}"
                client_env.update(S3_ENV)
                client_env["AWS_ENDPOINT_URL"] = s3_endpoint
                client_env["AWS_ENDPOINT_URL_S3"] = s3_endpoint

            last_log = ""
            for _attempt in range(3):  # a port picked here may be taken by someone else before Ray binds it
                names = [
                    "gcs",
                    "dashboard",
                    "node_manager",
                    "object_manager",
                    "ray_client_server",
                    "dashboard_agent_listen",
                    "dashboard_agent_grpc",
                    "metrics_export",
                    "runtime_env_agent",
                    "autoscaler_metrics",
                    "dashboard_metrics",
                ]
                ports = dict(zip(names, _pick_ports(len(names), avoid)))
                # these two have no `ray start` flag; their defaults (44217, 44227) would clash between clusters
                env["AUTOSCALER_METRIC_PORT"] = str(ports["autoscaler_metrics"])
                env["DASHBOARD_METRIC_PORT"] = str(ports["dashboard_metrics"])
                wlo, whi = _pick_worker_range(WORKER_PORT_COUNT, avoid | set(ports.values()))
                ports["min_worker"], ports["max_worker"] = wlo, whi
                cmd = [
                    _ray_cli(),
                    "start",
                    "--head",
                    "--block",
                    f"--node-ip-address={HOST}",
                    f"--dashboard-host={HOST}",
                    "--include-dashboard=true",
                    f"--port={ports['gcs']}",
                    f"--dashboard-port={ports['dashboard']}",
                    f"--node-manager-port={ports['node_manager']}",
                    f"--object-manager-port={ports['object_manager']}",
                    f"--ray-client-server-port={ports['ray_client_server']}",
                    f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
                    f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
                    f"--metrics-export-port={ports['metrics_export']}",
                    f"--runtime-env-agent-port={ports['runtime_env_agent']}",
                    f"--min-worker-port={wlo}",
                    f"--max-worker-port={whi}",
                    f"--num-cpus={num_cpus}",
                    f"--num-gpus={int(num_gpus)}",
                    f"--object-store-memory={int(object_store_memory)}",
                    f"--temp-dir={temp_dir}",
                    "--disable-usage-stats",
                ]
                log_path = state_dir / "ray.log"
                log = open(log_path, "ab")
                log.write(("\n$ " + " ".join(cmd) + "\n").encode())
                log.flush()
                ray_proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
                )
                log.close()
                info["pids"]["ray"] = ray_proc.pid
                dashboard_url = f"http://{HOST}:{ports['dashboard']}"
                deadline = time.time() + timeout
                ok = False
                while time.time() < deadline:
                    if ray_proc.poll() is not None:
                        break
                    # ready = job API answers and the raylet and its agents accept connections
                    if _http_ok(f"{dashboard_url}/api/version") and all(
                        _tcp_open(ports[k])
                        for k in ("gcs", "node_manager", "dashboard_agent_listen", "runtime_env_agent")
                    ):
                        ok = True
                        break
                    time.sleep(0.5)
                if ok:
                    break
                last_log = log_path.read_text(errors="replace")[-4000:]
                _kill_all({"pids": {"ray": ray_proc.pid}, "temp_dir": temp_dir}, grace=5)
                with contextlib.suppress(ChildProcessError, OSError):
                    ray_proc.wait(timeout=1)
                info["pids"]["ray"] = None
                shutil.rmtree(temp_dir, ignore_errors=True)
                avoid |= set(ports.values())
                if time.time() >= deadline:
                    raise ClusterError(f"Ray dashboard did not answer within {timeout}s; log tail:\n{last_log}")
            else:
                raise ClusterError(f"ray start failed 3 times; log tail:\n{last_log}")

            info.update(
                {
                    "ray_address": f"{HOST}:{ports['gcs']}",
                    "dashboard_url": dashboard_url,
                    "s3_endpoint": s3_endpoint,
                    "ports": ports,
                    "num_cpus": num_cpus,
                    "num_gpus": int(num_gpus),
                    "object_store_memory": int(object_store_memory),
                    "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "env": client_env,
                    "logs": {"ray": str(state_dir / "ray.log"), "s3": str(state_dir / "s3.log") if s3 else None},
                }
            )
            tmp = state_dir / (STATE_FILE + ".tmp")
            tmp.write_text(json.dumps(info, indent=2) + "\n")
            tmp.replace(state_dir / STATE_FILE)
            return info
        except BaseException:
            _kill_all(info, grace=5)
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise


def down(state_dir: str | os.PathLike, grace: float = 10.0) -> dict:
    """Stop this state dir's cluster (only its own processes), remove its temp dir and state.
    Returns {"stopped": bool, "survivors": [pids]}."""
    state_dir = Path(state_dir).resolve()
    info = read_state(state_dir)
    if info is None:
        # nothing recorded; still clean anything using this state dir's temp dir
        temp_dir = temp_dir_for(state_dir)
        left = processes_naming(temp_dir)
        for p in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p["pid"], signal.SIGKILL)
        return {"stopped": False, "survivors": []}
    survivors = _kill_all(info, grace=grace)
    if not survivors and info.get("temp_dir", "").startswith("/tmp/lr-"):
        shutil.rmtree(info["temp_dir"], ignore_errors=True)
    if not survivors:
        (state_dir / STATE_FILE).unlink(missing_ok=True)
    else:
        raise ClusterError(f"processes of cluster {state_dir} survived SIGKILL: {survivors}")
    return {"stopped": True, "survivors": survivors}


def status(state_dir: str | os.PathLike) -> dict:
    """cluster.json (or {}) plus "alive": {ray, s3}, "dashboard_ok" and "up" (bool)."""
    info = read_state(state_dir)
    if info is None:
        return {"up": False, "state_dir": str(Path(state_dir).resolve()), "error": "no cluster.json"}
    out = dict(info)
    out["alive"] = _alive(info)
    out["dashboard_ok"] = bool(out["alive"].get("ray")) and _http_ok(f"{info['dashboard_url']}/api/version")
    out["up"] = all(out["alive"].values()) and out["dashboard_ok"]
    return out


# --------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cluster/local.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["up", "down", "status"])
    ap.add_argument("--state-dir", required=True, help="where cluster.json and logs live (one cluster per dir)")
    ap.add_argument("--num-cpus", type=int, default=None, help="default: os.cpu_count()")
    ap.add_argument("--num-gpus", type=int, default=0)
    ap.add_argument("--object-store-memory", type=int, default=DEFAULT_OBJECT_STORE_MEMORY, help="bytes")
    ap.add_argument("--s3", action="store_true", help="also start a moto S3 server on 127.0.0.1")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the dashboard")
    a = ap.parse_args(argv)
    try:
        if a.command == "up":
            info = up(a.state_dir, a.num_cpus, a.object_store_memory, a.s3, a.timeout, a.num_gpus)
            print(json.dumps(info, indent=2))
            return 0
        if a.command == "down":
            print(json.dumps(down(a.state_dir)))
            return 0
        st = status(a.state_dir)
        print(json.dumps(st, indent=2))
        return 0 if st["up"] else 3
    except ClusterAlreadyRunning as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
