"""cluster.yaml against Ray's own launcher schema (offline), and a training run submitted through
the Ray Jobs API to a head this test starts on 127.0.0.1 with token auth.

The head is private to the test: its own temp dir, free ports, a token of its own (never the
developer's ~/.ray/auth_token), and it is stopped by killing the process group the test started,
not with `ray stop` (which would stop every Ray on the machine).
"""

from __future__ import annotations

import copy
import json
import secrets
import subprocess
import sys
import time
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import dist_sae

from dist_sae.cluster.head import Head, start_head

REPO = Path(__file__).resolve().parents[2]


# ---- cluster.yaml ----------------------------------------------------------------------------


def load_cluster_yaml() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_is_a_valid_ray_launcher_config():
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load_cluster_yaml()
    validate_config(copy.deepcopy(cfg))  # as written (jsonschema against ray-schema.json)
    validate_config(prepare_config(copy.deepcopy(cfg)))  # with the provider's defaults filled in, as `ray up` does

    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["worker.gpu"]["instance"] = "g5.xlarge"  # not a schema key
    with pytest.raises(Exception, match="instance"):
        validate_config(broken)


def test_cluster_yaml_layout():
    cfg = load_cluster_yaml()
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0  # a CPU head
    cpu, gpu = types["worker.cpu"], types["worker.gpu"]
    cpu_setup, gpu_setup = " ".join(cpu["worker_setup_commands"]), " ".join(gpu["worker_setup_commands"])
    assert "download.pytorch.org/whl/cpu" in cpu_setup  # CPU torch on CPU nodes only
    assert "whl/cpu" not in gpu_setup and "torch==" in gpu_setup  # a CUDA torch on GPU nodes
    # Every node installs the pinned release from the wheels copied to it, the version this checkout builds.
    pinned = f'pip install "dist_sae[s3]=={dist_sae.__version__}" --find-links ~/dist_sae_wheels'
    assert all(pinned in s for s in (cpu_setup, gpu_setup, " ".join(cfg["head_setup_commands"])))
    assert cfg["file_mounts"]["~/dist_sae_wheels"] == "./dist" and "~/dist_sae" not in cfg["file_mounts"]
    assert f"dist_sae-{dist_sae.__version__}-py3-none-any.whl" in (REPO / "cluster.yaml").read_text()
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])


# ---- a job on a private head -----------------------------------------------------------------


@pytest.fixture(scope="module")
def head():
    """`ray start --head` on 127.0.0.1 with token auth; yields (dashboard URL, env with the token)."""
    try:
        head = start_head(num_cpus=2, prefix="dsae-job-")
    except FileNotFoundError:
        pytest.skip("the ray CLI is not installed")
    try:
        _wait_for_job_server(head.dashboard_url, head.env["RAY_AUTH_TOKEN"], head)
        yield head.dashboard_url, head.env
    finally:
        head.stop()


def _client(url: str, token: str):
    from ray.job_submission import JobSubmissionClient

    # An explicit header: works whether or not this process has Ray's token auth turned on.
    return JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})


def _wait_for_job_server(url: str, token: str, head: Head, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            pytest.fail(f"ray start exited with {head.proc.returncode}:\n{head.log_tail()}")
        try:
            _client(url, token).list_jobs()
            return
        except Exception:
            time.sleep(1.0)
    pytest.fail(f"the job server at {url} did not come up in {timeout:.0f}s:\n{head.log_tail()}")


def _submit(url: str, env: dict, extra: list[str], train_args: list[str]) -> str:
    """scripts/submit.sh with --no-wait; waits for the job to end and returns its logs (asserting success)."""
    from ray.job_submission import JobStatus

    submission_id = f"dist-sae-test-{secrets.token_hex(4)}"
    subprocess.run(
        [str(REPO / "scripts" / "submit.sh"), "--address", url, *extra, "--no-wait", "--submission-id", submission_id, "--", *train_args],
        env=env, check=True, capture_output=True, text=True, timeout=120,
    )
    client = _client(url, env["RAY_AUTH_TOKEN"])
    deadline = time.monotonic() + 150
    status = client.get_job_status(submission_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.monotonic() < deadline:
        time.sleep(1.0)
        status = client.get_job_status(submission_id)
    logs = client.get_job_logs(submission_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    return logs


def _built_wheel(folder: Path) -> Path:
    """The wheel of this checkout (no build isolation: no index needed), built from a copy so that
    no build/ or egg-info is left in the checkout."""
    src = folder / "src"
    shutil.copytree(REPO / "dist_sae", src / "dist_sae", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(folder), str(src)],
                   check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = folder.glob("dist_sae-*.whl")
    return wheel


@pytest.mark.ray
@pytest.mark.slow
def test_training_job_through_the_jobs_api(head, tmp_path):
    """The two documented paths: the checkout as the job's working dir, and the built wheel as its
    py_modules (no checkout on the cluster). Both train to the same θ, bit for bit."""
    from safetensors.numpy import load_file

    from util import make_dataset, smooth_patches

    url, env = head
    data = tmp_path / "data"
    make_dataset(data, smooth_patches(600, seed=2), shard_rows=250)
    settings = ["--quiet", "optim.steps=3", "workers.num=2", "model.hidden=[5]", "data.block_rows=100", "run.report=false"]
    runs = {}
    for path, extra in (("checkout", []), ("wheel", ["--wheel", str(_built_wheel(tmp_path / "wheel"))])):
        out = tmp_path / path
        logs = _submit(url, env, extra, ["--data", str(data), "--out", str(out), *settings])
        assert "trained 3 steps" in logs
        # Outputs land on the head's disk (here: this machine), where the driver and server ran.
        for name in ("model.safetensors", "config.json", "metrics.jsonl", "run.json"):
            assert (out / name).is_file(), name
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
        runs[path] = json.loads((out / "run.json").read_text()), load_file(out / "model.safetensors")
    (checkout, theta_checkout), (wheel, theta_wheel) = runs["checkout"], runs["wheel"]
    # The wheel job imported dist_sae from its py_modules copy, not from any checkout on the node.
    assert not Path(wheel["package"]).is_relative_to(REPO) and "runtime_resources" in wheel["package"], wheel["package"]
    assert checkout["version"] == wheel["version"] == dist_sae.__version__
    assert theta_checkout.keys() == theta_wheel.keys()
    for name in theta_checkout:
        np.testing.assert_array_equal(theta_checkout[name], theta_wheel[name])


def test_a_client_without_the_token_is_refused(head):
    url, _ = head
    with pytest.raises(Exception):
        _client(url, "not-the-token").list_jobs()


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_stop_mid_run_checkpoints_and_the_run_resumes_exactly(head, tmp_path, capsys):
    """Stopping a job (`ray job stop`) sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s): the run
    checkpoints in time, the job ends STOPPED, and --resume reaches the θ of the uninterrupted run."""
    from ray.job_submission import JobStatus

    from dist_sae.commands.main import main
    from dist_sae.sae.model import load_model
    from dist_sae.train.checkpoint import latest_checkpoint
    from util import make_dataset, smooth_patches

    url, env = head
    data, out = tmp_path / "data", tmp_path / "run"
    # Shards of whole units: the local engine (resume, reference) then sums the same units in the same order as Ray.
    make_dataset(data, smooth_patches(600, seed=2), shard_rows=200, chunk_rows=100)
    steps = 500  # far more than it gets to: `ray job stop` comes mid-run
    args = ["--quiet", "model.hidden=[5]", "workers.num=2", "data.block_rows=100", "run.report=false", "compute.threads=1",
            "run.checkpoint_every=7", "optim.tolerance_change=0", "optim.tolerance_grad=0"]
    submission_id = f"dist-sae-stop-{secrets.token_hex(4)}"
    subprocess.run(
        [str(REPO / "scripts" / "submit.sh"), "--address", url, "--no-wait", "--submission-id", submission_id, "--",
         "--data", str(data), "--out", str(out), *args, f"optim.steps={steps}"],
        env=env, check=True, capture_output=True, text=True, timeout=120,
    )
    client = _client(url, env["RAY_AUTH_TOKEN"])
    deadline = time.monotonic() + 150
    metrics = out / "metrics.jsonl"
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < 9:  # past the first checkpoint (7)
        assert client.get_job_status(submission_id) in {JobStatus.PENDING, JobStatus.RUNNING}, client.get_job_logs(submission_id)[-3000:]
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.2)
    # What `ray job stop` does (the CLI calls this), without the CLI's seconds of start-up: the run
    # is stopped while it is short, so that the uninterrupted reference below stays cheap.
    client.stop_job(submission_id)
    while client.get_job_status(submission_id) not in {JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED}:
        assert time.monotonic() < deadline + 60, "the job did not stop"
        time.sleep(0.2)
    assert client.get_job_status(submission_id) == JobStatus.STOPPED
    logs = client.get_job_logs(submission_id)
    assert "stopped on SIGTERM" in logs and "Traceback" not in logs, logs[-3000:]
    done = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.endswith("}")][-1]
    assert latest_checkpoint(out)[0]["meta"]["step"] == done < steps  # the last completed step, checkpointed in the grace period
    # Resume to a few steps past the stop, and compare with an uninterrupted run of as many steps.
    assert main(["train", "--resume", str(out), "--local", f"optim.steps={done + 3}"]) == 0, capsys.readouterr().err
    assert main(["train", "--local", "--data", str(data), "--out", str(tmp_path / "ref"), *args, f"optim.steps={done + 3}"]) == 0
    reference = load_model(tmp_path / "ref")[0].theta.detach().numpy()
    theta = load_model(out)[0].theta.detach().numpy()
    assert np.linalg.norm(theta - reference) <= 1e-10 * np.linalg.norm(reference)
