"""The sharding manifest: the contract between the sharding stage and everything that reads data.

``$RINGFLOW_HOME/data/<fingerprint>/manifest.json`` lists every file the stage wrote with its
row count, size and sha256. Readers go through :func:`read_table`, which verifies the checksum
and decrypts in memory when the file is encrypted (AES-GCM; the key is never stored here).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pandas as pd
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError, field_validator

if TYPE_CHECKING:
    from ringflow.training.preprocess import Preprocessor

KEY_ENV = "RINGFLOW_DATA_KEY"
MANIFEST_NAME = "manifest.json"
NONCE_BYTES = 12


class ShardIntegrityError(RuntimeError):
    """A data file's bytes do not match the manifest (tampered, truncated or replaced)."""


class MissingKeyError(RuntimeError):
    """The data is encrypted and no key was given."""


class FileEntry(BaseModel):
    file: str
    """A plain file name in the manifest's directory (no path: nothing outside it is ever read)."""
    rows: int
    bytes: int
    sha256: str
    """Of the bytes on disk (the ciphertext when encrypted)."""

    @field_validator("file")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or v in {".", ".."} or Path(v).name != v or "\\" in v or "\0" in v:
            raise ValueError(f"{v!r} is not a plain file name in the manifest's directory")
        return v


class ShardEntry(FileEntry):
    index: int
    weight: float


class WindowEntry(BaseModel):
    start: str
    end: str
    rows: int
    positives: int


class Manifest(BaseModel):
    version: int = 1
    fingerprint: str
    source: str
    source_sha256: str
    created_at: str
    seed: int
    encrypted: bool
    schema_: dict[str, str]
    """Column -> dtype of the stored (raw, labelled) rows."""
    timestamp_column: str
    label_column: str
    target_column: str
    numeric_features: list[str]
    categorical_features: list[str]
    windows: dict[str, WindowEntry]
    """train / validation / test."""
    rows_total: int
    """Labelled rows in the source (all dates, before the windows are cut)."""
    rows_dropped_unlabelled: int
    """Source rows without a label (cancelled flights), dropped before everything else."""
    shards: list[ShardEntry]
    validation: FileEntry
    test: FileEntry
    preprocessor: FileEntry
    config: dict[str, Any]
    """The data + sharding config that produced this manifest (part of the fingerprint)."""
    digest: str | None = None
    """sha256 over everything above (canonical JSON): a manifest changed after it was written
    (an entry pointed at another file, a checksum swapped) no longer loads. None: written by an
    older ringflow; such a manifest loads but is never taken as an up-to-date dataset."""

    model_config = {"populate_by_name": True}

    def content_digest(self) -> str:
        body = self.model_dump(mode="json", exclude={"digest"})
        return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())

    # ------------------------------------------------------------------ io
    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Load and check a manifest; :class:`ShardIntegrityError` names what is wrong with it."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"manifest not found: {path}")
        try:
            m = cls.model_validate_json(path.read_text())
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:5])
            raise ShardIntegrityError(f"manifest {path} is invalid: {problems}") from None
        if m.digest is not None and m.digest != m.content_digest():
            raise ShardIntegrityError(
                f"manifest {path} was modified after it was written (its digest does not "
                "match its content): re-run `ringflow shard`"
            )
        m._dir = path.parent
        return m

    @property
    def dir(self) -> Path:
        d: Path | None = getattr(self, "_dir", None)
        if d is None:
            raise RuntimeError("manifest was not loaded from disk; its directory is unknown")
        return d

    @property
    def path(self) -> Path:
        return self.dir / MANIFEST_NAME

    def write(self, directory: Path) -> Path:
        """Write atomically: readers never see a half-written manifest."""
        directory.mkdir(parents=True, exist_ok=True)
        self.digest = self.content_digest()
        atomic_write_bytes(
            directory / MANIFEST_NAME,
            json.dumps(self.model_dump(mode="json", by_alias=False), indent=1).encode(),
        )
        self._dir = directory
        return directory / MANIFEST_NAME

    # ------------------------------------------------------------------ readers
    def shards_for_rank(self, rank: int, size: int) -> list[ShardEntry]:
        """Shards rank ``rank`` of ``size`` reads: round-robin, so any world size works."""
        return [s for s in self.shards if s.index % size == rank]

    def file_path(self, entry: FileEntry) -> Path:
        """Where ``entry`` lives: inside the manifest's directory, also after symlinks, or an error."""
        path = self.dir / entry.file
        if not path.resolve().is_relative_to(self.dir.resolve()):
            raise ShardIntegrityError(
                f"{path} (manifest entry {entry.file!r}) resolves outside {self.dir}; refusing it"
            )
        return path

    def read(self, entry: FileEntry, key: bytes | None = None) -> pd.DataFrame:
        return read_table(self.file_path(entry), entry, self.encrypted, key)

    def open(self, entry: FileEntry, key: bytes | None = None, stream: bool = False) -> pq.ParquetFile:
        """The entry as a ParquetFile (checksum verified, decrypted) to read by row groups.

        ``stream=True`` (a plain file only) checks the sha256 by streaming the file and then reads
        it from disk, so its bytes are never all in memory; an encrypted file is always decrypted
        whole in memory, which is also where its checksum is taken."""
        path = self.file_path(entry)
        if stream and not self.encrypted:
            if not path.is_file():
                raise ShardIntegrityError(f"data file missing: {path}")
            check_digest(path, entry, sha256_file(path))
            return pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        return open_parquet(path, entry, self.encrypted, key)

    def files(self) -> list[FileEntry]:
        """Every data file this manifest lists: shards, validation, test, preprocessor."""
        return [*self.shards, self.validation, self.test, self.preprocessor]

    def verify(self, checksums: bool = True) -> None:
        """Check that every listed file exists with its recorded size (and sha256 unless
        ``checksums=False``: the quick check before a launch; readers verify the sha256 anyway).

        Raises :class:`ShardIntegrityError` naming the first file that does not match.
        """
        for entry in self.files():
            path = self.file_path(entry)
            if not path.is_file():
                raise ShardIntegrityError(f"data file missing: {path} (listed in {self.path})")
            size = path.stat().st_size
            if size != entry.bytes:
                raise ShardIntegrityError(f"size mismatch for {path}: manifest {entry.bytes} bytes, file {size}")
            if not checksums:
                continue
            check_digest(path, entry, sha256_file(path))

    def read_preprocessor(self) -> Preprocessor:
        from ringflow.training.preprocess import Preprocessor

        raw = read_verified_bytes(self.file_path(self.preprocessor), self.preprocessor)
        return Preprocessor.from_dict(json.loads(raw))


# ---------------------------------------------------------------------- helpers


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def key_from_env(env: Mapping[str, str] | None = None) -> bytes | None:
    """The data key from ``RINGFLOW_DATA_KEY`` (base64 of 16, 24 or 32 bytes), or None."""
    raw = (env if env is not None else os.environ).get(KEY_ENV)
    return parse_key(raw) if raw else None


def parse_key(raw: str, origin: str = KEY_ENV) -> bytes:
    """Decode a base64 key; ``origin`` names where it came from in errors (never the value)."""
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{origin} is not valid base64") from None
    if len(key) not in (16, 24, 32):
        raise ValueError(f"{origin} must decode to 16, 24 or 32 bytes, got {len(key)}")
    return key


def encrypt(data: bytes, key: bytes, aad: str) -> bytes:
    """AES-GCM; the file name is bound as associated data so files cannot be swapped."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, data, aad.encode())


class Buffer(Protocol):
    """Any bytes-like object (``collections.abc.Buffer`` from Python 3.12 on)."""

    def __buffer__(self, flags: int, /) -> memoryview: ...


class SealedWriter(io.RawIOBase):
    """A write-only file that encrypts as it goes (AES-GCM, the same format as :func:`encrypt`:
    nonce, ciphertext, tag) and hashes what lands on disk, so a Parquet writer can stream row
    groups into it and no plaintext ever touches the disk. ``key=None`` writes plaintext.

    ``tell()`` is the plaintext position (what the Parquet writer expects); :meth:`entry` gives the
    manifest entry of the bytes on disk once closed.
    """

    def __init__(self, path: Path, key: bytes | None, aad: str):
        super().__init__()
        self.path = Path(path)
        self._f = open(self.path, "wb")  # noqa: SIM115  (the writer owns the file; close() ends it)
        self._sha = hashlib.sha256()
        self._pos = 0
        self.size = 0
        self._enc = None
        if key is not None:
            from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

            nonce = os.urandom(NONCE_BYTES)
            self._enc = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
            self._enc.authenticate_additional_data(aad.encode())
            self._out(nonce)

    def _out(self, data: bytes) -> None:
        self._f.write(data)
        self._sha.update(data)
        self.size += len(data)

    def writable(self) -> bool:
        return True

    def write(self, b: Buffer) -> int:
        data = bytes(b)
        self._out(self._enc.update(data) if self._enc else data)
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if self.closed:
            return
        if self._enc is not None:
            self._out(self._enc.finalize() + self._enc.tag)
        self._f.flush()
        os.fsync(self._f.fileno())  # before the directory rename publishes it
        self._f.close()
        super().close()

    def entry(self, rows: int) -> FileEntry:
        if not self.closed:
            raise RuntimeError(f"{self.path} is still open")
        return FileEntry(file=self.path.name, rows=rows, bytes=self.size, sha256=self._sha.hexdigest())


def decrypt(blob: bytes, key: bytes, aad: str) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad.encode())
    except InvalidTag:
        raise ShardIntegrityError(f"{aad}: decryption failed (wrong {KEY_ENV} or modified file)") from None


def read_verified_bytes(path: Path, entry: FileEntry) -> bytes:
    if not path.is_file():
        raise ShardIntegrityError(f"data file missing: {path}")
    data = path.read_bytes()
    check_digest(path, entry, sha256_bytes(data))
    return data


def check_digest(path: Path, entry: FileEntry, digest: str) -> None:
    if digest != entry.sha256:
        raise ShardIntegrityError(
            f"checksum mismatch for {path}: manifest sha256 {entry.sha256[:12]}..., file {digest[:12]}... "
            "(the file changed after sharding; re-run `ringflow shard` with a fresh RINGFLOW_HOME/data entry)"
        )


def open_parquet(path: Path, entry: FileEntry, encrypted: bool, key: bytes | None = None) -> pq.ParquetFile:
    """One Parquet file listed in a manifest, its sha256 verified and decrypted in memory, to be
    read whole or row group by row group (the file's bytes in memory, never a second copy)."""
    data = read_verified_bytes(path, entry)
    if encrypted:
        key = key or key_from_env()
        if key is None:
            raise MissingKeyError(
                f"{path.name} is encrypted: set {KEY_ENV} (base64 key) or configure "
                "sharding.key_secret_block to read it"
            )
        data = decrypt(data, key, path.name)
    return pq.ParquetFile(io.BytesIO(data))


def read_table(path: Path, entry: FileEntry, encrypted: bool, key: bytes | None = None) -> pd.DataFrame:
    """Read one Parquet file listed in a manifest: verify its sha256, decrypt in memory."""
    frame: pd.DataFrame = open_parquet(path, entry, encrypted, key).read().to_pandas()
    return frame
