"""A lean reader of the regular files in a tar archive, for the shard stream (data/shards.py).

Why not `tarfile` (what webdataset's `tar_file_iterator` runs on): it builds a TarInfo object per header, decodes
every field and, for the pax headers that webdataset's `TarWriter` writes before each member, parses two headers per
member; on small images that is most of the time spent reading a shard (bench/bench_curate.py `--only shards`
measures both readers on the same shards, and README "Curate your data" has the figures). This reader looks at the
only fields a sample needs -- name, size, type -- and checks every header's checksum, as tarfile does, so that a
damaged shard stops being read instead of yielding garbage. Writing stays with webdataset's `TarWriter`.

Format facts (POSIX.1-1988 ustar, POSIX.1-2001 pax, GNU tar), as tarfile reads them: 512-byte header blocks; name
[0:100], size [124:136] (octal text, or base-256 when its first byte has the high bit set), checksum [148:156]
(the unsigned -- or, from old tars, signed -- byte sum of the header with the checksum field read as 8 spaces), type
[156], magic [257:265] (`ustar\\0` + "00": [345:500] is a name prefix; GNU's `ustar  \\0` has none); a member's data
follows its header, padded to a block; type 'x' is a pax header for the next member ("<len> <key>=<value>\\n"
records: `path` and `size` override the header's), 'g' a pax header for all later members, 'L' a GNU long name for
the next member; the archive ends with a zero block.
"""

from __future__ import annotations

import contextlib
import importlib
import lzma
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
REGULAR_TYPES = (b"0", b"\0", b"7")  # regular file, its pre-POSIX form, contiguous file
EXTENSION_TYPES = (b"x", b"g", b"L", b"K")  # headers that describe the next member (K: a GNU long link name)
CHECKSUM_FIELD = b" " * 8  # how the checksum field counts in its own sum


class DamagedTar(Exception):
    """The archive cannot be read on: a header fails its checksum or is malformed, or the file ends inside it."""


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # base-256 (GNU, for sizes of 8 GiB and more); 0xff would be negative
        if field[0] != 0x80:
            raise DamagedTar(f"negative number {field!r}: a damaged or not a tar header")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()  # octal digits, ended by NUL or space
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise DamagedTar(f"{field!r} is not an octal number: a damaged or not a tar header") from None


def _check(header: bytes, offset: int) -> None:
    stored = _number(header[148:156])
    # The low 16 bits of Adler-32 are 1 + the byte sum mod 65521: zlib sums the block in C, about 7x faster than
    # sum(); a header sum is at most 130560, so a damaged header passes only if its sum is off by exactly 65521.
    if zlib.adler32(header[156:], zlib.adler32(CHECKSUM_FIELD, zlib.adler32(header[:148]))) & 0xFFFF == \
            (stored + 1) % 65521:
        return
    unsigned = sum(header) - sum(header[148:156]) + sum(CHECKSUM_FIELD)
    signed = unsigned - 256 * sum(1 for byte in header[:148] + header[156:] if byte > 127)
    if stored not in (unsigned, signed):
        raise DamagedTar(f"bad checksum of the header at byte {offset}: a damaged or not a tar header")


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise DamagedTar(f"malformed pax header at byte {offset}") from None
        record = data[space + 1:pos + length]
        key, sep, value = record.partition(b"=")
        if length <= 0 or not sep or not record.endswith(b"\n"):
            raise DamagedTar(f"malformed pax header at byte {offset}")
        records[key.decode("utf-8", "surrogateescape")] = value[:-1].decode("utf-8", "surrogateescape")
        pos += length
    return records


def _pax_size(text: str, offset: int) -> int:
    if not text.isdigit():
        raise DamagedTar(f"pax size {text!r} of the member at byte {offset} is not a number")
    return int(text)


def _read(stream: BinaryIO, size: int, offset: int) -> bytes:
    data = stream.read(size)
    if len(data) < size:
        raise DamagedTar(f"the file ends inside a member (at byte {offset + len(data)} of {offset + size})")
    return data


# What reading a truncated or corrupt compressed tar raises (gzip's BadGzipFile and bz2's errors are OSErrors).
DECOMPRESSION_ERRORS = (EOFError, zlib.error, lzma.LZMAError)
COMPRESSIONS = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "lzma"))  # magic numbers


@contextlib.contextmanager
def open_tar(path: str | Path) -> Iterator[BinaryIO]:
    """A tar file opened for reading, buffered (headers are read 512 bytes at a time), and decompressed when it is
    gzip, bzip2 or xz (found by its magic number, as tarfile's "r|*" mode does: a shard may be a .tar.gz)."""
    with open(path, "rb", buffering=1 << 20) as stream:
        start = stream.peek(6)[:6]
        for magic, module in COMPRESSIONS:
            if start.startswith(magic):
                with importlib.import_module(module).open(stream) as decompressed:
                    yield decompressed
                return
        yield stream


def tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each regular file of the tar archive in `stream`, in archive order; links, folders and
    other entries are passed over. Raises DamagedTar where the archive cannot be read on (after the members before
    that point were yielded), including an empty file and one that ends without its end-of-archive block."""
    for name, _, data in _walk(stream, read_data=True):
        yield name, data


def tar_index(stream: BinaryIO) -> tuple[dict[str, tuple[int, int]], DamagedTar | None]:
    """{name: (byte offset of the content, size)} of the regular files of a seekable tar, found by reading the
    headers only (contents are seeked over), and the DamagedTar that ended the scan early (None if none did): the
    members before the damage stay usable. A duplicate name keeps its last member, as tar extraction does."""
    index: dict[str, tuple[int, int]] = {}
    try:
        for name, offset, size in _walk(stream, read_data=False):
            index[name] = (offset, size)
    except DamagedTar as err:
        return index, err
    return index, None


def _walk(stream: BinaryIO, read_data: bool) -> Iterator[tuple]:
    """Per regular file: (name, content offset, content) when read_data, else (name, content offset, size)."""
    try:
        yield from _walk_headers(stream, read_data)
    except (OSError, *DECOMPRESSION_ERRORS) as err:
        raise DamagedTar(f"{type(err).__name__}: {err}") from err


def _walk_headers(stream: BinaryIO, read_data: bool) -> Iterator[tuple]:
    global_pax: dict[str, str] = {}
    pax: dict[str, str] = {}
    long_name: str | None = None
    offset = 0
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK:
            raise DamagedTar("an empty file, not a tar archive" if offset == 0 and not header else
                             f"the file ends at byte {offset + len(header)} without the end-of-archive block")
        if header == ZERO_BLOCK:
            return
        _check(header, offset)
        kind = header[156:157]
        size = _number(header[124:136])
        if "size" in pax and kind not in EXTENSION_TYPES:
            size = _pax_size(pax["size"], offset)
        start, padded = offset, size + (-size % BLOCK)
        offset += BLOCK + padded
        if not read_data and kind in REGULAR_TYPES:
            stream.seek(padded, 1)  # a short file shows at the next header read
            data = None
        else:
            data = _read(stream, size, start + BLOCK)
            if padded > size:
                _read(stream, padded - size, start + BLOCK + size)
        if kind == b"x":
            # Most pax headers hold only times (webdataset's: mtime): parse those that name a path or a size.
            used = b" path=" in data or b" size=" in data
            pax = {**global_pax, **_pax_records(data, start)} if used else dict(global_pax)
            continue
        if kind == b"g":
            global_pax.update(_pax_records(data, start))
            pax = {**global_pax, **pax}
            continue
        if kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind == b"K":  # a long link target: the next member is a link, passed over below
            continue
        if kind in REGULAR_TYPES:
            if "path" in pax:
                name = pax["path"]
            elif long_name is not None:
                name = long_name
            else:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if header[257:263] == b"ustar\0":
                    prefix = header[345:500].split(b"\0", 1)[0]
                    if prefix:
                        name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            yield (name, start + BLOCK, data) if read_data else (name, start + BLOCK, size)
        pax, long_name = dict(global_pax), None
