"""The package version, written here only (pyproject.toml reads it; semantic versioning).

Recorded in every run's run.json and checkpoint, so a resumed run can say which version wrote it.
"""

__version__ = "0.2.0"
