"""dist_sae: distributed, out-of-core sparse autoencoders with the exact dataset-wide KL penalty."""

from dist_sae.version import __version__  # noqa: F401  (dist_sae.__version__)


def load(run_dir, **kwargs):
    """The trained torch module of a run directory; its config is `module.config`."""
    from dist_sae.api import load as _load

    return _load(run_dir, **kwargs)


# Training is dist_sae.api.train: a `train` function here would be replaced by the dist_sae.train
# subpackage as soon as that is imported (Python binds a subpackage to its parent's attribute).
