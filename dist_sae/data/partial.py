"""An output dataset written shard by shard by many processes, and resumable: `<out>.partial/`.

Every shard is written whole somewhere else (a scratch file), then put into the partial folder
with one rename (local) or one upload (object storage), and only then its record,
`<shard>.json`: the ShardInfo (rows, row hash, file size and SHA-256). A shard without a record is
not done. A resumed run keeps every shard whose file still has the recorded size and SHA-256, and
recomputes the others; `job.json` holds the settings the shards were made with, and a resume
with other settings is refused. `finish` writes dataset.json, last, and moves the folder into
place (a rename; on object storage, server-side copies under the final prefix, dataset.json last).

Works the same for a local folder and an object-store prefix (s3://, gs://, az://); the workers
that write the shards need only the folder's name (`store_shard`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dist_sae.data import storage
from dist_sae.data.dataset import MANIFEST, Dataset, ShardInfo
from dist_sae.data.writer import publish
from dist_sae.errors import DataError

log = logging.getLogger(__name__)

JOB = "job.json"
RECORD = ".json"  # a finished shard's record: <shard file> + RECORD
_SHARD = re.compile(r"^shard-(\d{5,})\.h5$")


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.h5"


def scratch_file(folder: str, name: str) -> Path:
    """Where a shard is written before it is stored: inside a local partial folder (so the store
    is a rename on one file system), else in this node's temp folder. Unique per attempt, so a
    retried shard never writes into a dead attempt's file."""
    base = Path(folder) if not storage.is_url(folder) else Path(tempfile.gettempdir())
    return base / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def store_shard(folder: str, scratch: Path, info: ShardInfo) -> None:
    """Put a finished shard (written to `scratch`) into the partial folder as info.file, then its record."""
    record = json.dumps(asdict(info)).encode()
    if storage.is_url(folder):
        try:
            storage.put_file(scratch, storage.join(folder, info.file))
        finally:
            scratch.unlink(missing_ok=True)
        storage.put_bytes(storage.join(folder, info.file + RECORD), record)
        return
    # No fsync here: a resume re-hashes every recorded shard, so one torn by a crash is recomputed,
    # and `finish` fsyncs the whole folder once before it becomes the dataset. (A shard waiting
    # for the disk here held its worker: the output is written at disk speed once, not twice.)
    folder_path = Path(folder)
    os.replace(scratch, folder_path / info.file)
    tmp = scratch.with_suffix(".rec")
    tmp.write_bytes(record)
    os.replace(tmp, folder_path / (info.file + RECORD))


class PartialOutput:
    """The partial folder of one output dataset (a local folder or an object-store URL).

    Args:
        out: the dataset to create (folder or URL); the partial folder is `<out>.partial`.
        job: the settings the shards are made with (saved in job.json; a resume must match them).
        resume: keep the verified shards of an earlier run with the same settings.
        overwrite: replace an existing `out` when finished; without resume, also start over from
            an earlier run's partial folder.
    """

    def __init__(self, out: str | Path, job: dict[str, Any], resume: bool = False, overwrite: bool = False) -> None:
        self.url = storage.is_url(out)
        # Absolute: the workers that store shards may run in another working directory (a Ray job's).
        self.out = str(out).rstrip("/") if self.url else Path(out).absolute()
        self.folder = f"{self.out}.partial"
        self.job, self.resume, self.overwrite = job, resume, overwrite

    # ---- the folder's contents, local or remote ------------------------------------------------

    def _names(self) -> dict[str, int]:
        if self.url:
            return {n: s for n, s in storage.listing(self.folder).items() if "/" not in n}
        folder = Path(self.folder)
        return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}

    def _read(self, name: str) -> bytes:
        return storage.read_bytes(storage.join(self.folder, name)) if self.url else (Path(self.folder) / name).read_bytes()

    def _remove(self, names) -> None:
        for name in names:
            if self.url:
                storage.delete(storage.join(self.folder, name))
            else:
                (Path(self.folder) / name).unlink(missing_ok=True)

    def _file_sha256(self, name: str) -> str:
        if self.url:
            return storage.object_sha256(storage.join(self.folder, name))[1]
        return storage.file_sha256(Path(self.folder) / name)

    def _existing_out(self) -> list[str]:
        """What is at `out` now: a local folder's entries, or every object under the prefix."""
        if self.url:
            return sorted(storage.listing(self.out))
        out = Path(self.out)
        return sorted(p.name for p in out.iterdir()) if out.is_dir() else ([out.name] if out.exists() else [])

    def _old_dataset_files(self) -> list[str]:
        """The objects a dataset at the `out` prefix consists of (its manifest names them): what
        --overwrite replaces there, and nothing else under the prefix."""
        try:
            meta = json.loads(storage.read_bytes(storage.join(self.out, MANIFEST)))
        except (DataError, ValueError):
            return []
        return [MANIFEST, *(s["file"] for s in meta.get("shards", [])), *([meta["transform"]["file"]] if meta.get("transform") else [])]

    # ---- start, resume, finish -------------------------------------------------------------------

    def start(self) -> dict[int, ShardInfo]:
        """Check the output, lock and make or reopen the partial folder; the finished shards kept, by index.

        Raises:
            DataError: `out` exists (a folder, or a non-empty prefix) without overwrite; another
                encode holds the partial folder; a partial folder with finished shards exists without
                resume or overwrite; a resume whose settings differ from the partial folder's.
        """
        existing = self._existing_out()
        if existing and not self.overwrite:
            what = "already exists" if not self.url else f"already holds {len(existing)} object(s) ({', '.join(existing[:3])}...)"
            raise DataError(f"{self.out} {what}; choose another --out or pass --overwrite")
        self._lock()
        names = self._names()
        finished = sum(1 for n in names if n.endswith(".h5" + RECORD))
        saved = self._saved_job(names)
        if finished and not self.resume and not self.overwrite:
            raise DataError(f"{self.folder} holds an earlier run's output ({finished} finished shard(s)); "
                            "add --resume to continue it, or --overwrite to start again")
        if finished and self.resume and saved != self.job and not self.overwrite:
            differ = sorted(k for k in set(self.job) | set(saved or {}) if (saved or {}).get(k) != self.job.get(k))
            raise DataError(f"{self.folder} was made with other settings ({', '.join(differ)} differ); "
                            "resume with the same ones, or pass --overwrite to start again")
        if not finished or saved != self.job or not self.resume:  # nothing to keep: start afresh
            self._remove(names)
            names = {}
        if not self.url:
            Path(self.folder).mkdir(parents=True, exist_ok=True)
        if JOB not in names:
            job = json.dumps(self.job, indent=2, sort_keys=True).encode()
            if self.url:
                storage.put_bytes(storage.join(self.folder, JOB), job)
            else:
                (Path(self.folder) / JOB).write_bytes(job)
        return self._verified(names)

    def _saved_job(self, names: dict[str, int]) -> dict | None:
        try:
            return json.loads(self._read(JOB)) if JOB in names else None
        except ValueError:  # torn by a crash: as if absent
            return None

    def _lock(self) -> None:
        """One encode at a time into a local output (a second would delete the first's scratch as
        stray): an flock on `<out>.partial.lock`, held until `close`. Object storage has no such
        lock: give each running encode its own --out."""
        if self.url:
            return
        path = Path(f"{self.folder}.lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(path, "a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            self._lock_file = None
            raise DataError(f"another encode is writing {self.out} (it holds {path}); wait for it, or choose another --out") from None

    def close(self) -> None:
        """Release the lock (the partial folder stays for a resume unless `finish` published it)."""
        if getattr(self, "_lock_file", None) is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def _verified(self, names: dict[str, int]) -> dict[int, ShardInfo]:
        """The finished shards whose files match their records; the others (and stray scratch) are removed."""
        done: dict[int, ShardInfo] = {}
        for name in sorted(names):
            m = _SHARD.match(name[: -len(RECORD)]) if name.endswith(RECORD) else None
            if m is None:
                continue
            try:
                info = ShardInfo(**json.loads(self._read(name)))
                ok = info.file == name[: -len(RECORD)] and names.get(info.file) == info.size and self._file_sha256(info.file) == info.file_sha256
            except (ValueError, TypeError):  # a record torn by a crash
                info, ok = None, False
            if ok:
                done[int(m.group(1))] = info
            else:
                log.warning("%s does not match its record (size or SHA-256): it is computed again", storage.join(self.folder, m.group(0)))
                self._remove([name, m.group(0)])
        stray = [n for n in names if n.startswith(".") or (_SHARD.match(n) and int(_SHARD.match(n).group(1)) not in done)]
        self._remove(stray)  # scratch of attempts that died, shards whose record never came
        if done:
            log.info("resuming %s: %d finished shard(s) verified and kept", self.folder, len(done))
        return done

    def finish(self, meta: dict[str, Any], side_files: dict[str, Path]) -> Dataset:
        """Write dataset.json (`meta`) and the side files, and move the dataset into place.

        The records and job.json stay in the partial folder until the dataset is in place, so an
        encode stopped while publishing (the fsync of every shard) is resumed, not redone.
        """
        shards = [s["file"] for s in meta["shards"]]
        bookkeeping = [n for n in self._names() if n == JOB or n.endswith(RECORD) and n != MANIFEST]
        try:
            if not self.url:
                folder = Path(self.folder)
                for name in self._names():
                    if name not in shards and name not in bookkeeping:
                        (folder / name).unlink()
                for name, path in side_files.items():
                    shutil.copy2(path, folder / name)
                published = publish(folder, Path(self.out), meta)
                for name in bookkeeping:  # now in the published folder: no longer needed
                    (Path(self.out) / name).unlink(missing_ok=True)
                return Dataset.open(published.path)
            replaced = self._old_dataset_files()
            if MANIFEST in replaced:
                storage.delete(storage.join(self.out, MANIFEST))
            for name in shards:  # server-side copies: no shard passes through this process
                storage.copy(storage.join(self.folder, name), storage.join(self.out, name))
            for name, path in side_files.items():
                storage.put_file(path, storage.join(self.out, name))
            storage.put_bytes(storage.join(self.out, MANIFEST), (json.dumps(meta, indent=2) + "\n").encode())
            for name in set(replaced) - set(shards) - set(side_files) - {MANIFEST}:
                storage.delete(storage.join(self.out, name))  # the replaced dataset's own leftovers, nothing else
            self._remove(self._names())
            return Dataset.open(self.out)
        finally:
            self.close()
            if not self.url and not Path(self.folder).exists():
                Path(f"{self.folder}.lock").unlink(missing_ok=True)
