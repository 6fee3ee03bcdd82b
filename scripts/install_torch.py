"""Install the pinned torch into the interpreter running this script, and say in one line what it is.

    python scripts/install_torch.py 2.13.0

- torch already importable (a GPU machine's own CUDA build, or an earlier set-up): kept untouched.
- no NVIDIA GPU (no `nvidia-smi`): the CPU wheel from PyTorch's CPU index, which has no CUDA
  libraries. When that index cannot be reached (a firewall, a mirror-only network), the default
  index is used instead; on Linux that is the CUDA build from PyPI (several GB) unless pip is
  configured with a local CPU wheel.
- an NVIDIA GPU: the default (CUDA) build from PyPI.

Used by `make setup`; a developer helper, not a dist-sae command.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def installed() -> str | None:
    """'2.13.0+cpu (CPU build)' for the torch this interpreter imports, or None."""
    probe = "import torch; print(torch.__version__, torch.version.cuda or '')"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    version, _, cuda = out.stdout.strip().partition(" ")
    return f"{version} ({f'CUDA {cuda} build' if cuda else 'CPU build'})"


def reachable(url: str, timeout: float = 5.0) -> bool:
    try:
        urllib.request.urlopen(f"{url}/torch/", timeout=timeout).close()
        return True
    except Exception:
        return False


def main(argv: list[str]) -> int:
    version = argv[0] if argv else "2.13.0"
    have = installed()
    if have is not None:
        print(f"torch {have} already installed: kept")
        return 0
    pip = [sys.executable, "-m", "pip", "install", "-q", f"torch=={version}"]
    if shutil.which("nvidia-smi"):
        where = "PyPI's default build (an NVIDIA GPU is present)"
    elif reachable(CPU_INDEX):
        pip += ["--index-url", CPU_INDEX]
        where = f"PyTorch's CPU index {CPU_INDEX}"
    else:
        where = f"the default index ({CPU_INDEX} could not be reached)"
    if subprocess.run(pip).returncode != 0:
        print(f"error: pip could not install torch=={version} from {where}", file=sys.stderr)
        return 1
    print(f"torch {installed()} installed from {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
