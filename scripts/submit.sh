#!/usr/bin/env bash
# Submit a dist-sae training run to a Ray cluster through the Ray Jobs API.
#
#   scripts/submit.sh [--address URL] [--wheel WHEEL] [ray job submit options] -- [dist-sae train arguments]
#
#   ray dashboard cluster.yaml &        # forwards the head's job server to http://127.0.0.1:8265
#   python -m build --wheel             # dist/dist_sae-<version>-py3-none-any.whl
#   scripts/submit.sh --wheel dist/dist_sae-*.whl -- --data /mnt/data/patches --out /mnt/runs/run1 optim.steps=400
#
# What the job runs:
#   --wheel WHEEL   the package inside this built wheel, shipped as the job's `py_modules` (the
#                   wheel's dist_sae/ folder, unpacked: no checkout, no pip run on the cluster).
#                   The nodes need dist_sae's dependencies, which cluster.yaml installs (it
#                   installs the pinned dist_sae wheel itself). Runs from a temp folder, so
#                   nothing of the current folder is shipped.
#   (no --wheel)    the developer's path: this checkout shipped as the job's working directory.
# The run joins the cluster it was submitted to (`--address auto`). With token auth on, the client
# needs the cluster's token: RAY_AUTH_MODE=token and the token in ~/.ray/auth_token (or
# RAY_AUTH_TOKEN). Other options (--no-wait, --submission-id ID, --entrypoint-num-cpus N, ...) go
# to `ray job submit`. Paths in the train arguments are paths on the cluster.
set -euo pipefail

address="${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}"
wheel=""
submit_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --address) address="$2"; shift 2 ;;
        --address=*) address="${1#--address=}"; shift ;;
        --wheel) wheel="$2"; shift 2 ;;
        --wheel=*) wheel="${1#--wheel=}"; shift ;;
        --) shift; break ;;
        *) submit_args+=("$1"); shift ;;
    esac
done
entrypoint=(python -m dist_sae train --address auto "$@")

if [[ -n "$wheel" ]]; then
    [[ -f "$wheel" && "$wheel" == *.whl ]] || { echo "error: --wheel $wheel is not a .whl file (build one: python -m build --wheel)" >&2; exit 2; }
    stage="$(mktemp -d "${TMPDIR:-/tmp}/dist-sae-submit-XXXXXX")"
    trap 'rm -rf "$stage"' EXIT
    python3 -m zipfile -e "$wheel" "$stage/wheel"
    [[ -f "$stage/wheel/dist_sae/__init__.py" ]] || { echo "error: $wheel holds no dist_sae package" >&2; exit 2; }
    runtime_env="{\"py_modules\": [\"$stage/wheel/dist_sae\"]}"
    cd "$stage"
    ray job submit --address "$address" --runtime-env-json "$runtime_env" \
        ${submit_args[@]+"${submit_args[@]}"} -- "${entrypoint[@]}"
    exit $?
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# Not shipped: history, build leftovers, local data and run outputs (top-level /data, not dist_sae/data:
# the patterns are gitignore-style).
runtime_env='{"excludes": [".git", "**/__pycache__", "*.egg-info", "/.venv", "/build", "/dist", "/bench_out", "/runs", "/data", "*.h5"]}'

exec ray job submit --address "$address" --working-dir . --runtime-env-json "$runtime_env" \
    ${submit_args[@]+"${submit_args[@]}"} -- "${entrypoint[@]}"
