"""The README, true as written: every command of its ```bash blocks (and its ```python block) runs.

Commands are read from the README itself, so a new code block is picked up automatically; each
one is matched, first match wins, against RULES, the one table below, which says how it is run:

    run      `dist-sae ...` in this process (cwd: a sandbox with small inputs), after the
             SUBSTITUTIONS (small data, few steps, `--local`) and the rule's own extra arguments
    ray      the same as a subprocess on a private local Ray: also checks that Ray prints no
             token-authentication warning when dist_sae chose the mode itself
    parse    a command for a cluster (paths such as /mnt/...): only dist-sae's argument parsing,
             and `--help` of the program that wraps it (ray job submit, scripts/submit.sh)
    help     `PROGRAM --help` exits 0 (cluster set-up, long benchmarks)
    covered  checked elsewhere, named in the rule (set-up: scripts/fresh_setup_check.sh and CI's
             `make test`; packaging: scripts/wheel_check.sh; cluster.yaml and job submission:
             tests/cluster/test_jobs.py)

A command no rule matches fails test_every_readme_command_has_a_rule: add a rule (or extend
SUBSTITUTIONS) when adding a README example.
"""

from __future__ import annotations

import gzip
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


@dataclass
class Rule:
    pattern: str  # regex searched in the command as written in the README
    how: str  # run | ray | parse | help | covered
    extra: list[str] = field(default_factory=list)  # arguments appended (run, ray); the program (help)
    why: str = ""  # covered: where it is checked
    before: str | None = None  # run: a sandbox step first (a key of BEFORE)


# Small stand-ins for the README's data, run names and step counts; applied to every run/ray command.
SUBSTITUTIONS = [
    (r"--rows 1e7", "--rows 2000"),
    (r"--from patches ", "--from patches --count 600 "),
    (r"optim\.steps=\d+", "optim.steps=12"),
    (r"\bRUN_DIR\b", "run"),
    (r"/new/mount/d\b", "moved/patches"),
    (r"data/patches", "patches"),
    (r"s3://my-bucket/photos-wds/train-\{000000\.\.000019\}\.tar", "shards/train-{000000..000001}.tar"),  # the sandbox's tars
    (r"\[--digits\] \[--out DIR\]", "--digits --out demo --steps 3"),
]

LOCAL = ["--local"]
FEW = ["--local", "optim.steps=5"]

RULES = [
    # set-up and packaging
    Rule(r"^make (demo|test)$", "covered", why="scripts/fresh_setup_check.sh (make setup on a fresh clone); CI runs `make test`"),
    Rule(r"^python -m build$", "covered", why="scripts/wheel_check.sh builds, twine-checks and installs the wheel"),
    Rule(r"^pip install dist/dist_sae-", "covered", why="scripts/wheel_check.sh installs the wheel into a fresh venv"),
    Rule(r"^pip install \"?ray\[default\]", "covered", why="installs Ray on the user's laptop"),
    # the cluster: its set-up and the Jobs API
    Rule(r"^ray get-auth-token", "help", ["ray", "get-auth-token"]),
    Rule(r"^ray up cluster\.yaml", "help", ["ray", "up"], why="cluster.yaml itself: tests/cluster/test_jobs.py"),
    Rule(r"^ray dashboard cluster\.yaml", "help", ["ray", "dashboard"]),
    Rule(r"scripts/submit\.sh", "parse", why="tests/cluster/test_jobs.py submits both ways to a local head"),
    Rule(r"^RAY_AUTH_MODE=token ray job submit", "parse"),
    Rule(r"^python scripts/bench\.py|^dist-sae bench", "help", why="minutes; scripts/wheel_check.sh runs `dist-sae bench --size tiny`"),
    Rule(r"/mnt/", "parse"),
    # object storage: parsed here; tests/unit/test_storage.py and tests/cluster/test_s3_cluster.py run
    # the same commands against a local S3 server
    Rule(r"^python scripts/make_image_shards\.py", "help", ["python", "scripts/make_image_shards.py"]),
    Rule(r"^dist-sae data build --from webdataset .*s3://my-bucket/photos-wds", "run"),  # on the sandbox's tars (SUBSTITUTIONS)
    Rule(r"s3://", "parse", why="tests/unit/test_storage.py, tests/cluster/test_s3_cluster.py (a local S3 server)"),
    Rule(r"^pip install -e \.\[s3\]", "covered", why="the [test] extra installs obstore; tests/unit/test_storage.py"),
    Rule(r"^python scripts/make_image_folder\.py", "covered", why="tests/cluster/test_build_cluster.py; scripts/bench_build.py makes its folder with it"),
    # dist-sae, run: the first training on a private local Ray, the rest in this process
    Rule(r"^dist-sae train --data patches --out run model\.hidden=\[25\]", "ray", ["optim.steps=5", "--quiet"]),
    Rule(r"^dist-sae train --data data/patches --out runs/patches", "run", FEW + ["--overwrite"]),
    Rule(r"^dist-sae train --resume RUN_DIR --data", "run", LOCAL, before="move_patches"),
    Rule(r"^dist-sae train --resume", "run", LOCAL),
    Rule(r"^dist-sae train ", "run", FEW),
    Rule(r"^dist-sae (report|evaluate|encode|reconstruct|demo) ", "run", LOCAL),
    Rule(r"^dist-sae compare ", "run", LOCAL + ["--set", "optim.steps=3"]),
    Rule(r"^dist-sae ", "run"),
]


def _move_patches(sandbox: Path) -> None:
    """`--data /new/mount/d`: the same dataset, moved."""
    shutil.copytree(sandbox / "patches", sandbox / "moved" / "patches", dirs_exist_ok=True)


BEFORE = {"move_patches": _move_patches}


# ---- reading the README ----------------------------------------------------------------------


def readme_blocks(kinds: tuple[str, ...]) -> list[str]:
    text = README.read_text()
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if m.group(1) in kinds]


def readme_commands() -> list[str]:
    """Every command of the bash blocks, continuation lines joined, comments and a trailing `&` dropped."""
    commands = []
    for block in readme_blocks(("bash", "sh", "shell")):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[-1] == "&":
                words.pop()
            if words:
                commands.append(" ".join(shlex.quote(w) if not re.fullmatch(r"[\w./=:,\[\]@*-]+", w) else w for w in words))
    return commands


def rule_for(command: str) -> Rule | None:
    return next((r for r in RULES if re.search(r.pattern, command)), None)


def substituted(command: str, rule: Rule) -> list[str]:
    for pattern, replacement in SUBSTITUTIONS:
        command = re.sub(pattern, replacement, command)
    return shlex.split(command)[1:] + rule.extra


# ---- the sandbox: the inputs the README's commands name ---------------------------------------


def _write_idx(path: Path, images: np.ndarray) -> None:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", 0x00000803) + struct.pack(">III", *images.shape) + images.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("readme")
    rng = np.random.default_rng(0)
    np.save(root / "big.npy", rng.random((300, 64)))
    _write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 256, size=(64, 28, 28)))
    from producers import encoded_images, write_hf_parquet, write_tars  # made by webdataset's TarWriter and HF datasets

    images = encoded_images(24, seed=0, size=(40, 48))
    write_tars(root / "shards", images, 12)
    write_hf_parquet(root / "hf-parquet" / "train-00000.parquet", images)
    (root / "photos").mkdir()
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, size=(40, 48), dtype=np.uint8)).save(root / "photos" / f"p{k}.png")
    return root


# ---- the tests -------------------------------------------------------------------------------


def test_every_readme_command_has_a_rule():
    commands = readme_commands()
    assert len(commands) > 25 and any(c.startswith("dist-sae train") for c in commands)
    missing = [c for c in commands if rule_for(c) is None]
    assert not missing, f"README commands no rule in {__name__}.RULES covers: {missing}"


def _run_in_process(argv: list[str]) -> tuple[int, str]:
    from dist_sae.commands.main import main

    try:
        return main(argv), ""
    except SystemExit as exc:  # argparse
        return int(exc.code or 0), "argparse exit"


def _run_on_ray(argv: list[str], cwd: Path) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "dist_sae", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 0 and "Token authentication" in proc.stderr:
        return 1, "Ray warned about token authentication for the private Ray dist_sae started:\n" + proc.stderr[-2000:]
    return proc.returncode, proc.stderr[-2000:]


def _parse_only(command: str) -> tuple[int, str]:
    """The dist-sae part of a cluster command parses; the wrapping program takes its own options."""
    from dist_sae.commands.main import build_parser, parse

    words = shlex.split(command)
    while words and re.fullmatch(r"\w+=.*", words[0]):  # VAR=value prefixes
        words.pop(0)
    tail = words[words.index("--") + 1:] if "--" in words else words
    if tail[:3] == ["python", "-m", "dist_sae"]:
        argv = tail[3:]
    elif words[0].endswith("submit.sh"):
        argv = ["train", "--address", "auto", *tail]
    else:
        argv = tail[1:]
    try:
        args = parse(build_parser(), argv)
    except SystemExit as exc:
        return int(exc.code or 0), f"dist-sae {' '.join(argv)}: argument error"
    if words[0] == "ray":
        return _help(["ray", *words[1:3]])
    if words[0].endswith("submit.sh"):
        text = (REPO / "scripts" / "submit.sh").read_text()
        ok = all(opt in text for opt in re.findall(r"--\w+", " ".join(words[1:words.index("--")])))
        return (0, "") if ok and args.command == "train" else (1, "scripts/submit.sh does not take these options")
    return 0, ""


def _help(program: list[str]) -> tuple[int, str]:
    """`PROGRAM --help` exits 0: dist-sae and the ray CLI in this process (no interpreter start-up each)."""
    if program[0] == "dist-sae":
        return _run_in_process([*program[1:], "--help"])
    if program[0] == "ray":
        try:
            from click.testing import CliRunner
            from ray.scripts.scripts import cli
        except ImportError:
            return 0, "the ray CLI is not installed"
        result = CliRunner().invoke(cli, [*program[1:], "--help"])
        return result.exit_code, result.output[-1000:]
    if program[0] == "python":
        program = [sys.executable, *program[1:]]
    proc = subprocess.run([*program, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr[-1000:]


@pytest.mark.slow
def test_readme_commands_run(sandbox, monkeypatch):
    """Each command, in README order, in one sandbox (later commands use what earlier ones made)."""
    monkeypatch.chdir(sandbox)
    failures, ran = [], []
    t0 = time.perf_counter()
    for command in readme_commands():
        rule = rule_for(command)
        if rule is None or rule.how == "covered":
            continue
        if rule.how in ("run", "ray"):
            if rule.before:
                BEFORE[rule.before](sandbox)
            argv = substituted(command, rule)
            code, detail = _run_in_process(argv) if rule.how == "run" else _run_on_ray(argv, sandbox)
            ran.append(" ".join(argv))
        elif rule.how == "parse":
            code, detail = _parse_only(command)
        else:
            code, detail = _help(rule.extra or shlex.split(command)[:2])
        print(f"[{time.perf_counter() - t0:6.1f}s] {rule.how}: {command}")
        if code != 0:
            failures.append(f"{command}\n    -> exit {code}: {detail}")
    assert not failures, "README commands that failed:\n" + "\n".join(failures)
    assert len(ran) >= 20
    # What the commands left is what the README says they make.
    assert (sandbox / "grid.png").is_file() and (sandbox / "run" / "report" / "report.html").is_file()
    assert (sandbox / "grad.safetensors").is_file() and (sandbox / "cmp" / "compare.md").is_file()


def test_readme_python_block_runs(sandbox, monkeypatch):
    """The README's Python example, with a config file and rows of its own (`my.yaml`, `x`)."""
    (block,) = readme_blocks(("python",))
    monkeypatch.chdir(sandbox)
    if not (sandbox / "patches").is_dir():
        from dist_sae.data import build as prep

        prep.build_patches(sandbox / "patches", count=600)
    (sandbox / "my.yaml").write_text("model: {hidden: [8]}\noptim: {steps: 3}\nworkers: {engine: local}\nrun: {report: false}\n")
    code = block.replace('"run.out=run"', '"run.out=run_py"').replace('dist_sae.load("run")', 'dist_sae.load("run_py")')
    scope = {"x": np.random.default_rng(0).random((5, 64))}
    exec(compile(code, "README.md (python block)", "exec"), scope)
    assert scope["codes"].shape == (5, 8) and scope["x_hat"].shape == (5, 64)
