#!/usr/bin/env bash
# The README's set-up on a fresh clone with a Debian-style "externally managed" interpreter (PEP 668):
# clone this repository's committed HEAD to a temp folder, `make setup PYTHON=/usr/bin/python3`,
# then `.venv/bin/dist-sae --help`. Prints what it ran and how long it took.
#
#   scripts/fresh_setup_check.sh            # PYTHON=/usr/bin/python3 by default; KEEP=1 keeps the clone
set -euo pipefail

PYTHON="${PYTHON:-/usr/bin/python3}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { echo "fresh_setup_check: $*"; }

[[ -x "$PYTHON" ]] || { say "error: $PYTHON does not exist; give PYTHON=/path/to/python3"; exit 2; }
marker="$("$PYTHON" -c 'import sysconfig, os; print(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))')"
if [[ -f "$marker" ]]; then
    say "$PYTHON is externally managed ($marker): pip install into it is refused, as on Debian/Ubuntu"
else
    say "note: $PYTHON is not externally managed here; the check still runs"
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/dist-sae-fresh-XXXXXX")"
[[ "${KEEP:-0}" == 1 ]] || trap 'rm -rf "$work"' EXIT
unset PYTHONPATH VIRTUAL_ENV CONDA_PREFIX  # a stock shell: no checkout on the path, no active env
git clone -q "$repo" "$work/clone"
cd "$work/clone"
say "\$ make setup PYTHON=$PYTHON   (in a fresh clone of $(git rev-parse --short HEAD))"
make setup PYTHON="$PYTHON"
say "\$ .venv/bin/dist-sae --help"
.venv/bin/dist-sae --help
say "OK in ${SECONDS}s: .venv/bin/python is $(.venv/bin/python -c 'import sys; print(sys.version.split()[0])'), $(.venv/bin/dist-sae --version)"
