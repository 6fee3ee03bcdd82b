"""dist_sae: distributed, out-of-core sparse autoencoders with the exact dataset-wide KL penalty."""

from dist_sae.version import __version__  # noqa: F401  (dist_sae.__version__)


def load(run_dir, **kwargs):
    """The trained torch module of a run directory; its config is `module.config`."""
    from dist_sae.api import load as _load

    return _load(run_dir, **kwargs)


def train(cfg, **kwargs):
    """Train as configured (see dist_sae.api.train)."""
    from dist_sae.api import train as _train

    return _train(cfg, **kwargs)
