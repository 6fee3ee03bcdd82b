"""Input patterns on object storage mean what they mean on disk: the object-name glob against
glob.glob(recursive=True) over the same names as files (the independent reference)."""

from __future__ import annotations

import glob
import os
import warnings

import pytest

from dist_sae.data.inputs import _glob_match

NAMES = ["a.tar", "b.tar", "^.tar", "x.tar", "sub/b.tar", "sub/deep/c.tar", "x/sub/d.tar", "[x].tar", "ab/c.tar", "a!.tar",
         "q]/e.tar", ".cache/h.tar", "sub/.ckpt/g.tar", ".hid.tar", "a+b(1).tar"]
PATTERNS = ["**/*.tar", "*.tar", "*/*.tar", "**", "sub/**", "sub/**/*.tar", "*/sub/**", "[ab]*.tar", "[!a]*.tar",
            "?.tar", "**/c.tar", "a*/**/*.tar", "[]x]*", "q]/*", "[x", "sub/*", "*/*/*.tar", "[^a].tar", "[^]x].tar",
            "[b-a].tar", "[[]x].tar", "[a-c].tar", ".*", ".cache/*", "sub/.ckpt/*", "**/.*/*", "a+b(?).tar", "a.tar"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    for name in NAMES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    return root


@pytest.mark.parametrize("pattern", PATTERNS)
def test_an_object_glob_matches_what_glob_finds_on_disk(tree, pattern):
    on_disk = sorted(os.path.relpath(p, tree) for p in glob.glob(os.path.join(tree, pattern), recursive=True) if os.path.isfile(p))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FutureWarning from a regex built by hand
        in_bucket = sorted(n for n in NAMES if _glob_match(f"s3://bucket/{n}", f"s3://bucket/{pattern}"))
    assert in_bucket == on_disk


def test_the_table_is_no_table_of_empty_matches(tree):
    found = [p for p in PATTERNS if any(os.path.isfile(f) for f in glob.glob(os.path.join(tree, p), recursive=True))]
    assert len(found) >= len(PATTERNS) - 6, found
