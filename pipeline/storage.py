"""Where runs and sweeps keep their files: a local folder, a shared mount (EFS, FSx, NFS) or a bucket URI
(``s3://``, ``gs://``, ``abfs://``, ``hdfs://``), all through ``pyarrow.fs``, the layer Ray Train and Tune store
checkpoints with. A ``Location`` is a filesystem and a path on it; what the pipeline itself reads or writes under
``ray.storage_path`` or ``tune.output_dir`` goes through one, never through ``pathlib`` on a URI.

Credentials come from the environment of each process, as pyarrow (and boto3, for MLflow) read them: for
``s3://`` an instance profile on every node (or ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``), and
``AWS_ENDPOINT_URL_S3`` for an S3-compatible service; for ``gs://`` the nodes' service account. A URI may also
carry pyarrow's own options as a query (``s3://bucket/runs?region=us-west-2``); they stay with it.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from pipeline.config import ConfigError, first_line, resolve_path

if TYPE_CHECKING:
    from _csv import Writer


BUCKET_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az")  # a URI of these starts with its bucket or container


def is_uri(text: str) -> bool:
    """Whether ``text`` names storage by a URI scheme (``s3://...``) rather than a local path."""
    return "://" in text and not text.startswith("file://")


@dataclass(frozen=True)
class Location:
    """A folder or file on a ``pyarrow.fs`` filesystem: ``uri`` is what Ray is given (a local absolute path or a
    URI with its query), ``path`` the same place in the filesystem's own terms."""

    uri: str
    filesystem: pafs.FileSystem
    path: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def __truediv__(self, name: str) -> Location:
        parts = urlsplit(self.uri) if is_uri(self.uri) else None
        if parts is None:
            uri = f"{self.uri.rstrip('/')}/{name}"
        else:
            uri = parts._replace(path=f"{parts.path.rstrip('/')}/{name}").geturl()
        return Location(uri, self.filesystem, f"{self.path.rstrip('/')}/{name}")

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def on_same(self, path: str) -> Location:
        """Another path on this filesystem (e.g. a checkpoint path Ray reports), with a URI to show for it."""
        if not is_uri(self.uri):
            return Location(path, self.filesystem, path)
        parts = urlsplit(self.uri)
        bucket_relative = path.split("/", 1)[1] if "/" in path else ""
        return Location(parts._replace(path=f"/{bucket_relative}").geturl(), self.filesystem, path)

    def kind(self) -> pafs.FileType:
        return self.filesystem.get_file_info(self.path).type

    def is_file(self) -> bool:
        return self.kind() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.kind() == pafs.FileType.Directory

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file (a bucket object appears whole when the stream closes; a local file is written
        beside the target and renamed over it)."""
        if self.is_local:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.tmp"
            Path(tmp).write_bytes(data)
            os.replace(tmp, self.path)
            return
        with self.filesystem.open_output_stream(self.path) as stream:
            stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def _entries(self, kind: pafs.FileType, chosen: Callable[[str], bool]) -> list[Location]:
        """The entries of ``kind`` directly in this folder whose names are ``chosen``, by name; none if it does
        not exist."""
        if not self.is_dir():
            return []
        found = self.filesystem.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return sorted((self.on_same(f.path) for f in found if f.type == kind and chosen(f.base_name)),
                      key=lambda loc: loc.path)

    def files(self, suffix: str = "") -> list[Location]:
        """The files directly in this folder whose names end with ``suffix``, by name."""
        return self._entries(pafs.FileType.File, lambda name: name.endswith(suffix))

    def folders(self, prefix: str = "") -> list[Location]:
        """The folders directly in this folder whose names start with ``prefix``, by name."""
        return self._entries(pafs.FileType.Directory, lambda name: name.startswith(prefix))

    def delete(self) -> None:
        self.filesystem.delete_file(self.path)

    def delete_folder(self) -> None:
        self.filesystem.delete_dir(self.path)

    @contextmanager
    def as_local_folder(self) -> Iterator[Path]:
        """This folder on the local disk: itself when local, else a temporary copy of it."""
        if self.is_local:
            yield Path(self.path)
            return
        with tempfile.TemporaryDirectory(prefix="varcon-fetch-") as folder:
            pafs.copy_files(self.path, folder, source_filesystem=self.filesystem,
                            destination_filesystem=pafs.LocalFileSystem())
            yield Path(folder)

    def upload(self, local_folder: str | Path) -> None:
        """Copy the files of ``local_folder`` into this folder."""
        if self.is_local:
            shutil.copytree(local_folder, self.path, dirs_exist_ok=True)
            return
        pafs.copy_files(str(local_folder), self.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.filesystem)


def location(path_or_uri: str) -> Location:
    """The ``Location`` of a config's storage value: a URI as given, a local path made absolute
    (``config.resolve_path``). An unsupported scheme, or a URI pyarrow cannot open, is a ``ConfigError``."""
    if not is_uri(path_or_uri):
        local = str(resolve_path(path_or_uri.removeprefix("file://")))
        return Location(local, pafs.LocalFileSystem(), local)
    scheme, bucket = urlsplit(path_or_uri)[:2]
    if scheme in BUCKET_SCHEMES and not bucket:  # pyarrow would take it and fail later, on a path "/..."
        raise ConfigError(f"storage URI {path_or_uri} names no bucket: write {scheme}://BUCKET/path")
    try:
        filesystem, path = pafs.FileSystem.from_uri(path_or_uri)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, ValueError or OSError by scheme
        raise ConfigError(f"storage URI {path_or_uri} cannot be opened ({first_line(exc)}): use a local or shared "
                          f"path, or a scheme pyarrow.fs supports (s3://, gs://, abfs://, hdfs://)") from None
    return Location(path_or_uri, filesystem, path)


def check_writable(place: Location, key: str) -> None:
    """Write and delete a probe file under ``place``, so that a missing bucket, missing credentials or an
    unreachable service is one ``ConfigError`` naming ``key`` before any cluster resource is used."""
    if place.is_local:  # nothing is created here: the nearest existing folder must let it be
        existing = Path(place.path)
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}={place.uri} cannot be created ({existing} is not a writable folder): choose a "
                              f"writable folder")
        return
    bucket = place.path.split("/", 1)[0]
    try:
        found = place.filesystem.get_file_info(bucket).type
        if found == pafs.FileType.NotFound:
            raise ConfigError(f"{key}={place.uri}: bucket {bucket} does not exist: create it (storage must outlive "
                              f"the cluster), or point {key} at an existing one")
        probe = place / f".varcon-probe-{uuid.uuid4().hex[:12]}"
        probe.write_bytes(b"")
        probe.delete()
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow's OSError carries the service's own reason
        raise ConfigError(f"{key}={place.uri} is not writable ({first_line(exc)}): give every node credentials for "
                          f"it (an instance profile / service account; see README: Storage) and check that the "
                          f"bucket and its endpoint exist") from None


def csv_text(write_rows: Callable[[Writer], object]) -> str:
    """The text of a CSV that ``write_rows(writer)`` writes (for files written through a ``Location``)."""
    import csv

    buffer = io.StringIO(newline="")
    write_rows(csv.writer(buffer))
    return buffer.getvalue()
