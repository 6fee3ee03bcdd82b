"""A private Ray head on 127.0.0.1, started with the `ray` CLI and stopped by signalling its session.

    head = start_head(num_cpus=2)        # `ray start --head --block` in a new session, token auth
    ... `dist-sae train --address head.address` with env=head.env ...
    head.stop()                          # SIGTERM, then SIGKILL, to that session only

What a cluster user has running before they submit (the benchmark's `--address` case, and the
Jobs API tests). The head is private: its own --temp-dir, free loopback ports, and a token of its
own in RAY_AUTH_TOKEN (RAY_AUTH_MODE=token) whatever ~/.ray/auth_token holds; a client given
`head.env` joins it with that token. It is never stopped with `ray stop`, which stops every Ray
on the machine: the GCS, raylet, dashboard and workers are all in the session `ray start` leads.
No `import ray` here: the CLI runs in its own process.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

READY_LINE = "Ray runtime started"  # what `ray start` prints once the head's GCS and raylet are up


def ray_cli() -> str | None:
    """The `ray` command of this interpreter's environment (a venv's bin/, not on PATH), else PATH's; None if neither."""
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which("ray")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_session_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to every process of the session `proc` leads (started with start_new_session).

    E.g. `ray start --head`: the GCS, raylet, dashboard and every worker are in its session, so
    this ends exactly the processes that were started with it.
    """
    def members() -> list[int]:
        pids = []
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
            try:
                if os.getsid(pid) == proc.pid:
                    pids.append(pid)
            except OSError:
                pass
        return pids

    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        for pid in members():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, so it does not linger as a zombie
            if not members():
                return
            time.sleep(0.1)


@dataclass
class Head:
    """A running private head: `address` (GCS, HOST:PORT) to join, `env` with its token for clients."""

    proc: subprocess.Popen
    address: str
    dashboard_url: str | None
    env: dict[str, str]
    temp_dir: Path
    log_path: Path
    _log: object = field(repr=False, default=None)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text()[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """End every process of the head's session, then remove its temp dir."""
        stop_session_group(self.proc)
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def head_env(token: str) -> dict[str, str]:
    """This process's environment with token auth on and `token` as the token, for the head and its clients."""
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,  # this head's own token, whatever ~/.ray/auth_token holds
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep 127.0.0.1 as the node IP: bind loopback only
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    return env


def start_head(num_cpus: int = 2, dashboard: bool = True, timeout_s: float = 90.0, prefix: str = "dsae-head-") -> Head:
    """`ray start --head --block` on 127.0.0.1 in a new session; returns once `ray start` says it is up.

    Args:
        num_cpus: CPUs the head advertises.
        dashboard: run the dashboard (and the Jobs API with it) on 127.0.0.1.
        timeout_s: how long to wait for the head before giving up (it is stopped then).

    Raises:
        FileNotFoundError: the `ray` CLI is not installed.
        RuntimeError: `ray start` exited, or did not come up in time (with its log's tail).
    """
    ray_bin = ray_cli()
    if ray_bin is None:
        raise FileNotFoundError("the ray CLI is not installed")
    temp_dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = head_env(secrets.token_hex(32))
    gcs_port, dashboard_port = free_port(), free_port()
    cmd = [ray_bin, "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs_port), "--ray-client-server-port", str(free_port()),
           "--dashboard-agent-listen-port", str(free_port()), "--num-cpus", str(num_cpus), "--temp-dir", str(temp_dir)]
    cmd += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port)] if dashboard else ["--include-dashboard=false"]
    log_path = temp_dir / "ray-start.log"
    log = open(log_path, "w")
    # Started outside any checkout, as a cluster's head is: a job without a working dir runs there.
    proc = subprocess.Popen(cmd, env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(proc, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}" if dashboard else None, env, temp_dir, log_path, log)
    deadline = time.monotonic() + timeout_s
    while READY_LINE not in head.log_tail(100_000):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = head.log_tail()
            head.stop()
            state = f"exited with {proc.returncode}" if proc.returncode is not None else f"was not up in {timeout_s:.0f}s"
            raise RuntimeError(f"ray start {state}:\n{tail}")
        time.sleep(0.2)
    return head
