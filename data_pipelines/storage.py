"""Local paths and object-store URIs (``s3://``, ``gs://``) through pyarrow filesystems."""
from __future__ import annotations

import os
import posixpath

import pyarrow.fs as pafs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or a URI pyarrow understands."""
    uri = str(uri)
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def check_output_folder(uri: str, flag: str) -> None:
    """Raise ValueError when the local output folder ``uri`` cannot be made
    because it, or a folder above it, is a file (object-store URIs have no
    folders to check)."""
    if "://" in str(uri):
        return
    path = os.path.abspath(uri)
    above = path
    while not os.path.exists(above):
        parent = os.path.dirname(above)
        if parent == above:
            return
        above = parent
    if os.path.isdir(above):
        return
    if above == path:
        raise ValueError(f"{flag} {uri} is a file, not a folder")
    raise ValueError(f"{flag} {uri}: {above} is a file, so no folder can be made under it")


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write to a temporary name, then move into place (atomic on local disks)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(fs: pafs.FileSystem, folder: str, suffix: str = "") -> list[str]:
    if not exists(fs, folder):
        return []
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=False))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def local_folder(fs: pafs.FileSystem, folder: str) -> str:
    """A local path for ``folder`` on ``fs``: itself on a local disk, else a
    downloaded copy in a new temporary folder."""
    if isinstance(fs, pafs.LocalFileSystem):
        return folder
    import tempfile

    dest = tempfile.mkdtemp(prefix="mmphi-download-")
    pafs.copy_files(folder, dest, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest
