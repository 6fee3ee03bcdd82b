"""Starting or joining Ray, and turning Ray's errors into the library's own at the boundary.

Without an address, a private local Ray is started and bound to 127.0.0.1: nothing listens beyond
the loopback interface. With `auto` or HOST:PORT (or inside a Ray job, where Ray sets RAY_ADDRESS),
the running cluster is joined. Token authentication is Ray's own: a private local Ray started here
has it on (as Ray >= 2.59 does by default, but set here, so Ray prints no warning about choosing it;
RAY_AUTH_MODE=disabled in the environment is respected) and keeps the token in ~/.ray/auth_token;
a cluster started with RAY_AUTH_MODE=token is joined with the token from RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, and Ray's own messages about it are shown.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import ray
import ray.exceptions

from dist_sae.sections import WorkersConfig
from dist_sae.errors import ConfigError, DistSaeError, TrainingError

log = logging.getLogger(__name__)

T = TypeVar("T")
LOOPBACK = "127.0.0.1"
ACTOR_PREFIX = "dist_sae"  # actor names: dist_sae.ParameterServer, dist_sae.worker-N


@contextmanager
def loopback_only() -> Iterator[None]:
    """Within this block, Ray nodes started from this process bind every server to 127.0.0.1.

    Ray replaces a node IP of 127.0.0.1 by the machine's routable address unless multi-machine
    clusters are switched off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). With them off, the GCS,
    raylet, object manager, agents and (through the raylet's environment) every worker listen on
    127.0.0.1 only. Both the variable (for the processes started) and Ray's cached constant (for
    this one) are set, and restored on exit: a started node keeps its own environment. Nested
    within an outer block, the environment is not written again (see connect_while).
    """
    from ray._private import ray_constants

    previous = os.environ.get(_LOOPBACK_ENV)
    previous_constant = ray_constants.ENABLE_RAY_CLUSTER
    if previous != "0":
        os.environ[_LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_LOOPBACK_ENV, None)
        elif previous != "0":
            os.environ[_LOOPBACK_ENV] = previous
        ray_constants.ENABLE_RAY_CLUSTER = previous_constant


_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_local(num_cpus: int | None = None, dashboard: bool = True, **init_kwargs: Any) -> None:
    """Start a single-node Ray in this process, every server bound to 127.0.0.1.

    Args:
        num_cpus: CPUs the node advertises (default: the machine's).
        dashboard: run the dashboard (and with it the state API behind `ray list actors`), on 127.0.0.1.
        init_kwargs: passed on to ray.init (tests: _temp_dir, _system_config, ...).
    """
    init_kwargs.setdefault("log_to_driver", log.isEnabledFor(logging.INFO))
    init_kwargs.setdefault("logging_level", logging.WARNING)
    _choose_token_auth()
    token = token_home / "auth_token" if (token_home := private_token_home()) else None
    with loopback_only():
        ray.init(
            address="local",
            num_cpus=num_cpus,
            _node_ip_address=LOOPBACK,
            include_dashboard=dashboard,
            dashboard_host=LOOPBACK,
            **init_kwargs,
        )
    if token is not None and token.is_file():  # Ray writes a new token with the umask's mode (0644)
        token.chmod(0o600)


def _choose_token_auth() -> None:
    """Token auth for a private local Ray, chosen explicitly (RAY_AUTH_MODE=token) unless the user chose.

    With RAY_AUTH_MODE unset, Ray >= 2.59 turns token auth on for a new local cluster and warns
    that it did; setting the mode ourselves is the same choice without the warning. Ray's cached
    config is refreshed, as Ray does when it turns the mode on itself.
    """
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):  # a Ray without token auth ignores the variable
        pass


def private_token_home(home: Path | None = None) -> Path | None:
    """Make ~/.ray 0700 and ~/.ray/auth_token 0600 before a local Ray starts (Ray leaves 0755/0644).

    The token guards the dashboard and the job API: no other local user may read it. With the
    folder 0700 from the start, a token Ray writes into it is private from the moment it exists.

    Returns:
        The folder, or None when it cannot be made private (a warning says why).
    """
    folder = (home or Path.home()) / ".ray"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)
        token = folder / "auth_token"
        if token.is_file():
            token.chmod(0o600)
    except OSError as exc:
        log.warning("cannot make %s private (%s); other local users may read Ray's token", folder, exc)
        return None
    return folder


def stop_local(wait: bool = True, timeout_s: float = 1.0) -> None:
    """Shut down the Ray this process started (or, joined to a cluster, disconnect from it).

    wait=False (the process is about to exit within a SIGTERM grace period): a local Ray started
    here is stopped as ray.shutdown stops it (SIGTERM, then SIGKILL after up to timeout_s), but
    without ray.shutdown's 1 s wait for each process in turn (3-4 s on a loaded machine).
    """
    if not ray.is_initialized():
        return
    node = getattr(ray._private.worker, "_global_node", None)
    if wait or node is None:  # None: joined, not started here
        ray.shutdown()
        return
    ray._private.worker._global_node = None  # with no node to stop, ray.shutdown only disconnects
    ray.shutdown()
    # The raylet first (it ends its agents and workers, which needs the GCS up), then the rest together.
    raylet = [info.process for info in node.all_processes.get("raylet", [])]
    rest = [info.process for kind, infos in list(node.all_processes.items()) if kind != "raylet" for info in infos]
    # The GCS and the autoscaler monitor ignore SIGTERM while the raylet is gone: a short wait for those.
    for group, wait_s in ((raylet, timeout_s), (rest, min(timeout_s, 0.3))):
        for process in group:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + wait_s
        for process in group:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def connect(workers: WorkersConfig, dashboard: bool = True, num_cpus: int | None = None) -> str:
    """Make sure this process is connected to Ray.

    Args:
        workers: the config's workers section (address).
        dashboard: with a new local Ray, start the dashboard (bound to 127.0.0.1), which also
            serves `ray list actors`.
        num_cpus: CPUs a new local Ray advertises (default: the machine's).

    Returns:
        "started": a new local Ray was started here (the caller ends it with stop_local);
        "joined": this process connected to a running cluster (the caller disconnects);
        "existing": this process was already connected (left as it is).

    Raises:
        ConfigError: the address cannot be reached, or refuses this client's token.
    """
    if ray.is_initialized():
        return "existing"
    address = workers.address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            log.info("joining the Ray cluster at %s", address)
            ray.init(address=address, log_to_driver=log.isEnabledFor(logging.INFO), logging_level=logging.WARNING)
            return "joined"
        log.info("starting a local Ray bound to %s", LOOPBACK)
        start_local(num_cpus=num_cpus, dashboard=dashboard)
        return "started"
    except ConnectionError as exc:
        raise ConfigError(
            f"cannot join the Ray cluster at workers.address={address!r}: {exc}. Start it first (`ray start --head` "
            "or `ray up cluster.yaml`), or leave --address out to start a local Ray"
        ) from None
    except ray.exceptions.AuthenticationError as exc:
        raise ConfigError(
            f"the Ray cluster at {address!r} refused this client's token ({exc}); give the cluster's token in "
            "RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on the head prints it)"
        ) from None


def connect_run(workers: WorkersConfig, requested: int | None = None, dashboard: bool | None = None) -> str:
    """connect() as a run asks: a new local Ray with enough CPUs for the workers asked for.

    Args:
        workers: the run's workers section (address, num, pools, cpus_per_worker, dashboard).
        requested: workers placed by hand (default: workers.num, or none with workers.pools).
        dashboard: start the dashboard with a new local Ray (default: workers.dashboard).

    Returns: as connect().
    """
    if requested is None:
        requested = 0 if workers.pools else workers.num
    return connect(workers, dashboard=workers.dashboard if dashboard is None else dashboard,
                   num_cpus=local_cpus(requested, workers))


def connect_while(workers: WorkersConfig, work: Callable[[], T]) -> tuple[str, T]:
    """connect_run(workers) while work() runs on a thread: (connect's state, work's result).

    Why: a private Ray takes about 4 s to start, mostly waiting for its processes, and the CLI's
    first seconds go to importing torch (1 s) or building the demo's data; on a thread they run
    meanwhile (about 1 s less to the first step on a 2-core machine). An exception of work() is
    raised here, after Ray is connected; so is one in this thread (Ctrl-C), and a Ray connected
    here is then stopped: the caller owns the connection only once this returns.

    The variables a private Ray needs (token auth, loopback) are set before the thread starts, so
    this process's environment is not written while the thread runs (setenv racing a getenv in
    the thread's C code, e.g. torch loading, is undefined behaviour); Ray's own start is not
    covered by that.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = work()
        except BaseException as exc:  # raised in the caller
            box["error"] = exc

    private = not ray.is_initialized() and not (workers.address or os.environ.get("RAY_ADDRESS"))
    if private:
        _choose_token_auth()
    state = None
    with loopback_only() if private else nullcontext():
        thread = threading.Thread(target=run, name="dist-sae-while-ray-starts", daemon=True)
        thread.start()
        try:
            state = connect_run(workers)
            thread.join()
            if "error" in box:
                raise box["error"]
        except BaseException:
            if state in ("started", "joined"):
                stop_local(wait=False)
            raise
    return state, box["result"]


def local_cpus(requested: int, workers: WorkersConfig) -> int | None:
    """CPUs a new local Ray advertises: the machine's, or enough for the workers asked for."""
    if not requested:
        return None
    return max(os.cpu_count() or 1, math.ceil(requested * workers.cpus_per_worker))


def run_namespace() -> str:
    """A Ray namespace unique to one run, so two runs on one cluster do not clash over actor names."""
    return f"{ACTOR_PREFIX}-{uuid.uuid4().hex[:10]}"


def node_id() -> str:
    """The Ray node this process runs on (the driver's, in the driver)."""
    return ray.get_runtime_context().get_node_id()


def library_error(exc: BaseException, what: str) -> BaseException:
    """The library exception for a Ray error raised while `what` ran.

    A DistSaeError raised inside an actor comes back as itself (DataError stays DataError); an
    actor that died or could not start becomes TrainingError (or the ConfigError its constructor
    raised); anything else becomes TrainingError naming `what`.
    """
    cause: Any = exc
    for _ in range(8):  # unwrap RayTaskError / ActorDiedError(cause=RayTaskError) chains
        inner = getattr(cause, "cause", None)
        if isinstance(cause, ray.exceptions.RayError) and isinstance(inner, BaseException):
            cause = inner
        else:
            break
    if isinstance(cause, DistSaeError):
        return cause
    if isinstance(exc, ray.exceptions.RayActorError):
        return TrainingError(f"{what}: a Ray actor died ({last_line(cause)})")
    if isinstance(exc, ray.exceptions.GetTimeoutError):
        return TrainingError(f"{what}: timed out ({last_line(exc)}); raise workers.unit_timeout_s if units are that slow")
    return TrainingError(f"{what} failed: {type(cause).__name__}: {last_line(cause)}")


def last_line(exc: BaseException) -> str:
    """The last non-empty line of an error's text (Ray puts the cause last), for one-line messages."""
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def put(value: Any) -> Any:
    """ray.put: one object in the store (what an evaluation does once per θ); for callers outside this layer."""
    return ray.put(value)


def get(refs, what: str, timeout: float | None = None):
    """ray.get with Ray errors converted to the library's (see library_error)."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayError as exc:
        raise library_error(exc, what) from None
