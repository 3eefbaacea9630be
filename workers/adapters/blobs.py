"""Content-addressed blob backends for adapter files: PostgreSQL (default) and filesystem.

Both are keyed by the sha256 of the bytes, so a blob is written once however many adapter
versions share it, and a reader can verify what it got.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Protocol

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from schema.tables import AdapterBlob


class BlobMissing(LookupError):
    pass


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobBackend(Protocol):
    name: str

    def put(self, session: Session, sha256: str, data: bytes) -> None: ...
    def put_many(self, session: Session, blobs: dict[str, bytes]) -> None: ...
    def get(self, session: Session, sha256: str) -> bytes: ...
    def delete(self, session: Session, sha256: str) -> None: ...


class PostgresBlobs:
    """Blobs in the ``adapter_blobs`` table, written in the caller's transaction (atomic with
    the adapter row)."""

    name = "postgres"

    def put(self, session: Session, sha256: str, data: bytes) -> None:
        session.execute(insert(AdapterBlob).values(sha256=sha256, size_bytes=len(data), data=data)
                        .on_conflict_do_nothing(index_elements=["sha256"]))

    def put_many(self, session: Session, blobs: dict[str, bytes]) -> None:
        """One statement for a bulk import's batch (one round trip instead of one per blob)."""
        if blobs:
            session.execute(insert(AdapterBlob).values([{"sha256": k, "size_bytes": len(v), "data": v}
                                                        for k, v in blobs.items()])
                            .on_conflict_do_nothing(index_elements=["sha256"]))

    def get(self, session: Session, sha256: str) -> bytes:
        data = session.scalar(select(AdapterBlob.data).where(AdapterBlob.sha256 == sha256))
        if data is None:
            raise BlobMissing(f"blob {sha256[:12]} not in adapter_blobs")
        return bytes(data)

    def delete(self, session: Session, sha256: str) -> None:
        session.execute(delete(AdapterBlob).where(AdapterBlob.sha256 == sha256))


class FilesystemBlobs:
    """Blobs as files ``<root>/<sha[:2]>/<sha>``; written atomically (temp file + rename)
    before the database transaction commits. A failed commit can leave an unreferenced blob,
    never a row pointing at a missing one."""

    name = "filesystem"

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def put(self, session: Session, sha256: str, data: bytes) -> None:
        path = self._path(sha256)
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_many(self, session: Session, blobs: dict[str, bytes]) -> None:
        for sha, data in blobs.items():
            self.put(session, sha, data)

    def get(self, session: Session, sha256: str) -> bytes:
        try:
            return self._path(sha256).read_bytes()
        except FileNotFoundError:
            raise BlobMissing(f"blob {sha256[:12]} not under {self.root}") from None

    def delete(self, session: Session, sha256: str) -> None:
        self._path(sha256).unlink(missing_ok=True)
