#!/usr/bin/env bash
# Submit a dist-sae training run to a Ray cluster through the Ray Jobs API.
#
#   scripts/submit.sh [--address URL] [ray job submit options] -- [dist-sae train arguments]
#
#   ray dashboard cluster.yaml &        # forwards the head's job server to http://127.0.0.1:8265
#   scripts/submit.sh -- --data /mnt/data/patches --out /mnt/runs/run1 optim.steps=400
#
# The repo is shipped as the job's working directory (so the cluster runs this checkout's code)
# and the run joins the cluster it was submitted to (`--address auto`). With token auth on, the
# client needs the cluster's token: RAY_AUTH_MODE=token and the token in ~/.ray/auth_token (or
# RAY_AUTH_TOKEN). Other options (--no-wait, --submission-id ID, --entrypoint-num-cpus N, ...)
# go to `ray job submit`. Paths in the train arguments are paths on the cluster.
set -euo pipefail

address="${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}"
submit_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --address) address="$2"; shift 2 ;;
        --address=*) address="${1#--address=}"; shift ;;
        --) shift; break ;;
        *) submit_args+=("$1"); shift ;;
    esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# Not shipped: history, build leftovers, local data and run outputs (top-level /data, not dist_sae/data:
# the patterns are gitignore-style).
runtime_env='{"excludes": [".git", "**/__pycache__", "*.egg-info", "/bench_out", "/runs", "/data", "*.h5"]}'

exec ray job submit --address "$address" --working-dir . --runtime-env-json "$runtime_env" \
    ${submit_args[@]+"${submit_args[@]}"} -- python -m dist_sae train --address auto "$@"
