#!/usr/bin/env bash
# The package as a user installs it: build the sdist and wheel, check them, install the wheel into a
# fresh virtualenv (no system site packages; the pinned torch, CPU build without a GPU) and run the
# commands from a folder that is not the checkout. Run by CI after the tests.
#
#   scripts/wheel_check.sh            # PYTHON=python3 by default; KEEP=1 keeps the temp folder
set -euo pipefail

PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-2.13.0}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/dist-sae-wheel-XXXXXX")"
[[ "${KEEP:-0}" == 1 ]] || trap 'rm -rf "$work"' EXIT
unset PYTHONPATH VIRTUAL_ENV  # nothing of the checkout may leak into the installed package's runs
say() { echo "wheel_check: $*"; }

# 1. Build tools in a venv of their own; sdist + wheel from a copy of the files git tracks or
#    would track (no build leftovers, no .venv), so what is built is what a clone holds.
"$PYTHON" -m venv "$work/tools"
"$work/tools/bin/python" -m pip install -q build twine "setuptools>=69"
mkdir -p "$work/src"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf -) | tar -x -C "$work/src"
# --no-isolation: the tools venv has the build backend, so no second venv per build step.
"$work/tools/bin/python" -m build -q --no-isolation --outdir "$work/dist" "$work/src" >/dev/null
"$work/tools/bin/python" -m twine check --strict "$work/dist"/*
wheel="$(ls "$work/dist"/dist_sae-*.whl)"
files="$("$PYTHON" -m zipfile -l "$wheel" | tail -n +2 | wc -l)"
say "built and checked in ${SECONDS}s: $(basename "$wheel"), $(du -k "$wheel" | cut -f1) KiB, $files files; sdist $(basename "$(ls "$work/dist"/*.tar.gz)")"

# 2. A fresh venv: the pinned torch first (scripts/install_torch.py: CPU build without a GPU), then the wheel.
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/python" "$repo/scripts/install_torch.py" "$TORCH"
"$work/venv/bin/python" -m pip install -q "$wheel"
say "installed into a fresh venv by ${SECONDS}s"

# 3. The commands, from a folder that is not the checkout.
mkdir -p "$work/run" && cd "$work/run"
bin="$work/venv/bin"
where="$("$bin/python" -c 'import dist_sae, os; print(os.path.dirname(dist_sae.__file__))')"
[[ "$where" == "$work/venv/"* ]] || { say "error: dist_sae imported from $where, not the venv"; exit 1; }
run() { say "\$ dist-sae $*"; "$bin/dist-sae" "$@"; }
run --version
run data build --from digits --out digits
run train --data digits --out run --local optim.steps=3 model.hidden=[16]
run report run --local
if "$bin/python" -c "import dist_sae.bench.suite" 2>/dev/null; then
    run bench --size tiny --out bench_out
else
    say "skipped: dist-sae bench --size tiny (this build has no dist_sae.bench.suite yet)"
fi
say "OK in ${SECONDS}s: every command ran from the installed wheel ($where)"
