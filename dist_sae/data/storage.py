"""Object storage (s3://, gs://, az://) for datasets and sources, and the node-local shard cache.

The client is obstore (Rust object_store): measured fastest of obstore, s3fs and pyarrow.fs on
shard-sized objects from a local S3 server (dist_sae.bench.storage), no dependencies of its own,
and gs:// / az:// for free. Credentials: the standard AWS chain through boto3 where it is installed
(environment, ~/.aws, instance profile), else obstore's own (environment, instance profile).
`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` points s3:// at an S3-compatible store (MinIO, Ceph).

A dataset on object storage is mirrored in a local folder of the cache: dataset.json and the small
side files when it is opened, each shard when a reader first needs it, downloaded whole (hashed
on the way) and checked against the size and SHA-256 that dataset.json records before use.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from dist_sae.errors import DataError, StorageError

log = logging.getLogger(__name__)

_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://([^/]+)/?(.*)$")
CHUNK = 8 * 2**20  # download/hash/write granularity
SIDE_FILE_MAX = 64 * 2**20  # non-shard files of a dataset (transform.safetensors, ...) mirrored on open
FETCH_ATTEMPTS = 3  # whole-shard downloads tried before the shard counts as unreadable
BACKOFF_S = 0.5  # first wait between those attempts; doubles each time
# Request-level retries inside obstore (5xx, timeouts, dropped connections), with exponential back-off.
RETRY = {"max_retries": 4, "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=4), "base": 2},
         "retry_timeout": timedelta(seconds=30)}


def is_url(path: object) -> bool:
    """True for an object-store URL (scheme://bucket/...); plain paths and file:// are local."""
    m = _URL.match(str(path))
    return bool(m) and m.group(1) != "file"


def split_url(url: str) -> tuple[str, str, str]:
    """'s3://bucket/a/b/' -> ('s3', 'bucket', 'a/b')."""
    m = _URL.match(str(url))
    if not m or m.group(1) == "file":
        raise DataError(f"{url} is not an object-store URL (write s3://bucket/prefix)")
    return m.group(1), m.group(2), m.group(3).strip("/")


def join(url: str, name: str) -> str:
    return str(url).rstrip("/") + "/" + name


def endpoint() -> str | None:
    """The S3-compatible endpoint the environment names, as the AWS tools read it."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.lru_cache(maxsize=32)
def _bucket_store(scheme: str, bucket: str, endpoint_url: str | None):
    try:
        import obstore.store
    except ImportError:
        raise DataError(f"{scheme}://{bucket}: object storage needs the obstore package: pip install 'dist_sae[s3]'") from None
    options = {"connect_timeout": "5s", "timeout": "300s"}
    kwargs: dict = {}
    if scheme in ("s3", "s3a"):
        if endpoint_url:
            kwargs["endpoint"] = endpoint_url
            options["allow_http"] = endpoint_url.startswith("http://")
        try:  # boto3's chain reads ~/.aws (profiles, SSO) too; obstore's own reads env + instance profile
            import boto3
            from obstore.auth.boto3 import Boto3CredentialProvider

            session = boto3.Session()
            if session.get_credentials() is not None:
                kwargs["credential_provider"] = Boto3CredentialProvider(session)
            kwargs["region"] = session.region_name or os.environ.get("AWS_REGION") or "us-east-1"
        except ImportError:
            pass
    return obstore.store.from_url(f"{scheme}://{bucket}", client_options=options, retry_config=RETRY, **kwargs)


def _store(url: str):
    scheme, bucket, key = split_url(url)
    return _bucket_store(scheme, bucket, endpoint() if scheme in ("s3", "s3a") else None), key


def describe_error(exc: BaseException, url: str) -> str:
    """One line naming the URL, what went wrong and what to do."""
    scheme, bucket, _ = split_url(url)
    text = str(exc)
    where = f" at {endpoint()}" if scheme in ("s3", "s3a") and endpoint() else ""
    if "NoSuchBucket" in text:
        return f"{url}: bucket {bucket!r} does not exist{where}; check the URL (and AWS_ENDPOINT_URL for an S3-compatible store)"
    if isinstance(exc, FileNotFoundError) or "NoSuchKey" in text or "404" in text:
        return f"{url} does not exist; check the URL"
    kind = type(exc).__name__
    if kind in ("PermissionDeniedError", "UnauthenticatedError") or any(s in text for s in ("AccessDenied", "403 Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch")):
        code = next((c for c in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") if c in text), "403")
        return (f"{url}: access denied ({code}); check the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE / ~/.aws, or the "
                "instance profile) and that they may read (and, for --out, write) this bucket")
    if "error sending request" in text or "connect" in text.lower() or "dns" in text.lower():
        return f"{url}: cannot reach the object store{where or ''} ({kind}); check AWS_ENDPOINT_URL and the network"
    line = next((s for s in text.splitlines() if s.strip()), kind)
    return f"{url}: {kind}: {line[:300]}"


def _call(url: str, fn: Callable, *args, **kwargs):
    """Run an obstore call, turning its errors into a StorageError that says what to do."""
    try:
        return fn(*args, **kwargs)
    except DataError:
        raise
    except Exception as exc:
        raise StorageError(describe_error(exc, url)) from None


def read_bytes(url: str) -> bytes:
    import obstore

    store, key = _store(url)
    return bytes(_call(url, lambda: obstore.get(store, key).bytes()))


def listing(url: str) -> dict[str, int]:
    """Object names directly and recursively under the prefix `url`, relative to it, with their sizes."""
    import obstore

    store, key = _store(url)
    prefix = key + "/" if key else ""

    def run() -> dict[str, int]:
        out = {}
        for batch in obstore.list(store, prefix or None):
            for meta in batch:
                out[meta["path"][len(prefix):]] = int(meta["size"])
        return out

    return _call(url, run)


def put_file(path: Path, url: str) -> None:
    """Upload a local file (multipart for large ones)."""
    import obstore

    store, key = _store(url)
    _call(url, lambda: obstore.put(store, key, Path(path)))


def delete(url: str) -> None:
    import obstore

    store, key = _store(url)
    _call(url, lambda: obstore.delete(store, key))


def put_bytes(url: str, data: bytes) -> None:
    import obstore

    store, key = _store(url)
    _call(url, lambda: obstore.put(store, key, data))


def copy(src: str, dst: str) -> None:
    """Server-side copy of one object to another key of the same store (no data through this process)."""
    import obstore

    store, key = _store(src)
    _, dst_key = _store(dst)
    _call(src, lambda: obstore.copy(store, key, dst_key))


def object_sha256(url: str) -> tuple[int, str]:
    """(bytes, SHA-256 hex) of an object, streamed through the hash (nothing kept)."""
    import obstore

    store, key = _store(url)
    h, size = hashlib.sha256(), 0

    def run() -> None:
        nonlocal size
        for chunk in obstore.get(store, key).stream(min_chunk_size=CHUNK):
            h.update(chunk)
            size += len(chunk)
    _call(url, run)
    return size, h.hexdigest()


def upload_folder(folder: Path, url: str, last: str) -> None:
    """Upload every file of a folder under prefix `url`; the file named `last` goes last (it marks completion)."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name != last)
    for p in files + [Path(folder) / last]:
        put_file(p, join(url, p.name))


def download(url: str, dest: Path) -> tuple[int, str]:
    """Stream an object to `dest` (a temporary name, replaced at the end); returns (bytes, sha256 hex)."""
    import obstore

    store, key = _store(url)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    h, size = hashlib.sha256(), 0

    def run() -> None:
        nonlocal size
        with open(tmp, "wb") as out:
            for chunk in obstore.get(store, key).stream(min_chunk_size=CHUNK):
                h.update(chunk)
                out.write(chunk)
                size += len(chunk)
    try:
        _call(url, run)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return size, h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def default_cache_root() -> Path:
    """$DIST_SAE_CACHE, else $XDG_CACHE_HOME/dist_sae, else ~/.cache/dist_sae."""
    if os.environ.get("DIST_SAE_CACHE"):
        return Path(os.environ["DIST_SAE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dist_sae"


class ShardCache:
    """Node-local copies of object-store files, verified before use, least recently used evicted.

    Layout: <root>/<scheme>/<bucket>/<key>. Next to each verified file, `<file>.ok` records its
    size, mtime and SHA-256; its mtime is the file's last use (the LRU order). Processes on one
    node share the cache: a download is serialised per file (flock) and lands by rename.

    Args:
        root: the cache folder (node-local disk).
        max_bytes: bound on the cached files' total size (None: unbounded).
        verify: "stamp" trusts a file whose size and mtime still match the stamp written when its
            SHA-256 was last checked; "hash" re-hashes every cached file once per process.
        read_ahead: files `prefetch` may download at once on a background thread (0: none), so the
            next shard arrives while this one is computed.
    """

    def __init__(self, root: str | Path | None = None, max_bytes: int | None = None, verify: str = "stamp", read_ahead: int = 0) -> None:
        self.root = Path(root) if root else default_cache_root()
        self.max_bytes = max_bytes
        if verify not in ("stamp", "hash"):
            raise ValueError(f"verify must be 'stamp' or 'hash', got {verify!r}")
        self.verify = verify
        self._hashed: set[tuple] = set()  # (path, size, mtime_ns, inode) hashed in this process
        self.downloads = 0  # objects downloaded by this instance (for logs and tests)
        self.read_ahead = read_ahead
        self._ahead: dict[str, Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dist-sae-fetch-ahead") if read_ahead > 0 else None

    def prefetch(self, url: str, size: int | None, sha256: str | None, check: Callable[[Path], bool] | None = None) -> None:
        """Start fetching `url` in the background (at most read_ahead at once); errors surface in fetch()."""
        if self._pool is None or url in self._ahead:
            return
        self._ahead = {u: f for u, f in self._ahead.items() if not f.done()}
        if len(self._ahead) >= self.read_ahead:
            return
        dest = self.local_path(url)
        if dest.is_file() and dest.stat().st_size == size and _stamp(dest).is_file():
            return  # cached (fetch still verifies it before use)

        def run() -> None:
            try:
                self.fetch(url, size, sha256, check)
            except Exception as exc:  # the reader's own fetch() retries and reports
                log.debug("read-ahead of %s failed: %s", url, exc)
        self._ahead[url] = self._pool.submit(run)

    def local_path(self, url: str) -> Path:
        scheme, bucket, key = split_url(url)
        return self.root / scheme / bucket / key

    @contextmanager
    def _locked(self, dest: Path):
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest.with_name(dest.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def fetch(self, url: str, size: int | None, sha256: str | None, check: Callable[[Path], bool] | None = None) -> Path:
        """The local path of `url`, downloaded unless a verified copy is cached.

        size, sha256: what dataset.json records of the file; `check(path)` verifies a file when
        no SHA-256 is recorded. A cached copy that fails is fetched again; a download that keeps
        failing (FETCH_ATTEMPTS, with back-off) raises StorageError naming the URL.
        """
        dest = self.local_path(url)
        with self._locked(dest):
            if dest.is_file():
                if self._valid(dest, size, sha256, check):
                    _touch(_stamp(dest))
                    return dest
                log.warning("cached %s does not match dataset.json (size or sha256); fetching %s again", dest, url)
            self._evict(size or 0, keep=dest)
            problem = ""
            for attempt in range(FETCH_ATTEMPTS):
                if attempt:
                    time.sleep(BACKOFF_S * 2 ** (attempt - 1))
                try:
                    got_size, got_sha = download(url, dest)
                except StorageError as exc:
                    if "does not exist" in str(exc) or "access denied" in str(exc):
                        raise  # permanent: retrying cannot help
                    problem = str(exc)
                    continue
                self.downloads += 1
                if (size is None or got_size == size) and (sha256 is None or got_sha == sha256) and (sha256 or check is None or check(dest)):
                    self._write_stamp(dest, got_sha)
                    return dest
                problem = f"{url}: got {got_size} bytes with sha256 {got_sha[:12]}…, dataset.json records {size} bytes, sha256 {str(sha256)[:12]}…"
                dest.unlink(missing_ok=True)
            raise StorageError(f"{problem} (after {FETCH_ATTEMPTS} attempts); the object changed or is unreadable: rebuild the dataset or check the store")

    def _valid(self, dest: Path, size: int | None, sha256: str | None, check: Callable[[Path], bool] | None) -> bool:
        st = dest.stat()
        if size is not None and st.st_size != size:
            return False
        ident = (str(dest), st.st_size, st.st_mtime_ns, st.st_ino)
        if self.verify == "stamp" or ident in self._hashed:
            try:
                stamp = json.loads(_stamp(dest).read_text())
                if [stamp.get("size"), stamp.get("mtime_ns")] == [st.st_size, st.st_mtime_ns] and (sha256 is None or stamp.get("sha256") == sha256):
                    return True
            except (OSError, ValueError):
                pass
        digest = file_sha256(dest)
        ok = digest == sha256 if sha256 else (check is None or check(dest))
        if ok:
            self._write_stamp(dest, digest)
        return ok

    def _write_stamp(self, dest: Path, digest: str) -> None:
        st = dest.stat()
        self._hashed.add((str(dest), st.st_size, st.st_mtime_ns, st.st_ino))
        _stamp(dest).write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}))
        _touch(_stamp(dest))

    def _evict(self, incoming: int, keep: Path) -> None:
        """Remove least recently used files until `incoming` more bytes fit in max_bytes."""
        if self.max_bytes is None or not self.root.is_dir():
            return
        entries = []
        for stamp in self.root.rglob("*.ok"):
            data = stamp.with_name(stamp.name[: -len(".ok")])
            try:
                entries.append((stamp.stat().st_mtime_ns, data.stat().st_size, data, stamp))
            except OSError:
                continue
        total = sum(e[1] for e in entries)
        for _, nbytes, data, stamp in sorted(entries, key=lambda e: e[0]):
            if total + incoming <= self.max_bytes:
                break
            if data == keep:
                continue
            log.info("shard cache %s over %d bytes: evicting %s", self.root, self.max_bytes, data)
            data.unlink(missing_ok=True)
            stamp.unlink(missing_ok=True)
            total -= nbytes


def localize(path: str | Path, cache: ShardCache | None = None, threads: int = 16) -> str | Path:
    """A source path as a local one: an object-store URL (one object, or every object under a prefix,
    e.g. a folder of images) is first downloaded into the cache (kept there for the next build)."""
    if not is_url(path):
        return path
    cache = cache or ShardCache()
    url = str(path).rstrip("/")
    objects = listing(url)
    if not objects:
        return cache.fetch(url, None, None)  # a single object (or an error naming the URL)
    with ThreadPoolExecutor(threads, thread_name_prefix="dist-sae-localize") as pool:
        list(pool.map(lambda item: cache.fetch(join(url, item[0]), item[1], None), objects.items()))
    log.info("downloaded %d objects of %s into %s", len(objects), url, cache.local_path(url))
    return cache.local_path(url)


def shard_cache(data_cfg) -> ShardCache:
    """The ShardCache a DataConfig names (data.local_cache, data.local_cache_gb, data.local_cache_verify)."""
    gb = data_cfg.local_cache_gb
    return ShardCache(data_cfg.local_cache, int(gb * 2**30) if gb else None, data_cfg.local_cache_verify, data_cfg.read_ahead_shards)


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".ok")


def _touch(path: Path) -> None:
    """Mark a file used now (explicit ns: an implicit touch gets the kernel's coarse clock, and ties)."""
    try:
        now = time.time_ns()
        os.utime(path, ns=(now, now))
    except OSError:
        pass

