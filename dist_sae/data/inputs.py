"""Inputs read in place: patterns naming many files (WebDataset tars, Parquet files), local or in
object storage, and a seekable reader over an object that never downloads it whole.

Object-store access goes through dist_sae.data.storage (its client, endpoint, credentials and
retries); only the reading pattern differs from `localize`, which copies whole objects first.
"""

from __future__ import annotations

import fnmatch
import io
import os
import re

from dist_sae.data.storage import _call, _store, is_url, join, listing, split_url
from dist_sae.errors import DataError
_BRACE = re.compile(r"\{([^{}]*)\}")
READ_BUFFER = 8 * 2**20  # bytes per ranged GET of an object read in place (one request per 8 MB streamed)


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's brace patterns: '{000..002}' counts (zero-padded as written), '{a,b}' lists; in order."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        lo, hi = numbers.groups()
        width = len(lo) if lo.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        options = body.split(",")
    return [name for option in options for name in expand_braces(head + option + tail)]


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _object_size(url: str) -> int | None:
    """The object's size (one HEAD), None if there is no such object."""
    import obstore

    store, key = _store(url)

    def head():
        try:
            return obstore.head(store, key)
        except FileNotFoundError:  # obstore's NotFoundError is one
            return None

    meta = _call(url, head)
    return None if meta is None else int(meta["size"])


def _glob_match(url: str, pattern: str) -> bool:
    """What glob.glob(pattern, recursive=True) finds on disk, over '/'-separated object names: each
    level matched by fnmatch (`*`, `?`, `[...]`, `[!...]`, as glob does); `**` as a whole level is
    zero or more levels; names starting with '.' are matched only by a level that starts with '.'."""
    return _levels_match(url.split("/"), pattern.split("/"))


def _levels_match(names: list[str], levels: list[str]) -> bool:
    if not levels:
        return not names
    level = levels[0]
    if level == "**":  # zero or more levels, none of them hidden
        return any(_levels_match(names[i:], levels[1:]) for i in range(len(names) + 1)
                   if not any(n.startswith(".") for n in names[:i]))
    if not names:
        return False
    hidden = names[0].startswith(".") and not level.startswith(".")
    return not hidden and fnmatch.fnmatchcase(names[0], level) and _levels_match(names[1:], levels[1:])


def expand_inputs(pattern: str, suffixes: tuple[str, ...], what: str) -> list[tuple[str, int]]:
    """(location, bytes) of every input file a pattern names, local or an object-store URL, sorted.

    The pattern is a file, a folder or prefix (every file under it ending in one of `suffixes`), a
    glob (`*`, `?`, `[...]`) or a brace pattern ('DIR/train-{000000..000099}.tar'). A pattern that
    matches nothing, or a brace pattern with names that do not exist, is a DataError naming it.
    """
    import glob

    pattern = str(pattern)
    names = expand_braces(pattern)
    found: dict[str, int] = {}
    missing = []
    if is_url(pattern):
        if len(names) == 1 and not _has_glob(pattern):  # an object, or a prefix: list it, not its parent
            name = pattern.rstrip("/")
            under = {join(name, rel): size for rel, size in listing(name).items()}
            hits = {u: s for u, s in under.items() if u.lower().endswith(suffixes)}
            if not hits:  # not a prefix with such files: the object itself
                size = _object_size(name)
                hits = {name: size} if size is not None else {}
            found.update(hits)
        else:
            # Braces and globs: list the folder above the first wildcard once, and match there.
            scheme, bucket, key = split_url(pattern)
            literal = key.split("{")[0]
            literal = next((literal[:i] for i, c in enumerate(literal) if c in "*?["), literal)
            base = f"{scheme}://{bucket}/{literal.rpartition('/')[0]}".rstrip("/")
            objects = {join(base, name): size for name, size in listing(base).items()}
            for name in names:
                if _has_glob(name):
                    hits = {u: s for u, s in objects.items() if _glob_match(u, name) and u.lower().endswith(suffixes)}
                elif name in objects:
                    hits = {name: objects[name]}
                else:  # a prefix, as a local name may be a folder: the files under it
                    under = name.rstrip("/") + "/"
                    hits = {u: s for u, s in objects.items() if u.startswith(under) and u.lower().endswith(suffixes)}
                missing += [name] if not hits else []
                found.update(hits)
    else:
        for name in names:
            if _has_glob(name):
                paths = [p for p in glob.glob(name, recursive=True) if os.path.isfile(p) and p.lower().endswith(suffixes)]
            elif os.path.isdir(name):
                paths = [os.path.join(root, f) for root, _, files in os.walk(name) for f in files if f.lower().endswith(suffixes)]
            else:
                paths = [name] if os.path.isfile(name) else []
            missing += [name] if not paths else []
            found.update({p: os.path.getsize(p) for p in paths})
    if not found:
        raise DataError(f"{pattern} matches no {what} files (looked for {', '.join(suffixes)})")
    if missing and len(names) > 1:
        raise DataError(f"{pattern}: {len(missing)} of the {len(names)} names it expands to do not exist (the first: {missing[0]})")
    return sorted(found.items())


class RangedReader(io.RawIOBase):
    """An object read in place as a seekable binary file: obstore's buffered reader (ranged GETs of
    READ_BUFFER bytes, each with the store's retries), returning `bytes` as tarfile and pyarrow expect."""

    def __init__(self, url: str, size: int | None = None, buffer_size: int = READ_BUFFER) -> None:
        import obstore

        super().__init__()
        self.url = url
        store, key = _store(url)
        self._file = _call(url, lambda: obstore.open_reader(store, key, buffer_size=buffer_size, size=size))
        self.size = self._file.size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        """Up to `size` bytes, fewer only at the end of the object: obstore's read stops at the end of
        its buffer, and readers of a stream (the tar reader) take a short read for the end."""
        if size is None or size < 0:
            return bytes(_call(self.url, self._file.read))
        parts, got = [], 0
        while got < size:
            part = _call(self.url, self._file.read, size - got)
            if not part:
                break
            parts.append(bytes(part))
            got += len(parts[-1])
        return b"".join(parts)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return _call(self.url, self._file.seek, offset, whence)

    def tell(self) -> int:
        return self._file.tell()


def open_input(location: str, size: int | None = None, buffer_size: int = READ_BUFFER):
    """A binary file object over a local file or an object (read in place, never downloaded whole)."""
    if is_url(location):
        return RangedReader(location, size, buffer_size)
    try:
        return open(location, "rb")
    except OSError as exc:
        raise DataError(f"{location} cannot be read ({exc.strerror})") from None
