"""The lean tar reader (data/tar_reader.py) against Python's tarfile and webdataset on constructed archives: the
three header formats with long and non-ASCII names, pax overrides, links and folders passed over, and damaged
files (truncated, not a tar, a flipped header byte) stopping with DamagedTar after the members before the damage."""

import io
import tarfile

import pytest

from data.tar_reader import BLOCK, DamagedTar, tar_members

LONG_NAME = "folder-" + "x" * 120 + "/" + "y" * 90 + ".png"  # > 100 bytes: ustar prefix, GNU 'L' or pax path


def contents(size: int, seed: int) -> bytes:
    return bytes((seed * 7 + i * 13) % 256 for i in range(size))


FILES = {  # name -> content: empty, one exact block, several blocks with a partial one, long, non-ASCII
    "a.png": b"",
    "dir/b.cls": contents(BLOCK, 1),
    "c.jpg": contents(3 * BLOCK + 17, 2),
    LONG_NAME: contents(100, 3),
    "bild-ä-画.png": contents(5, 4),
}


def write_tar(fmt: int, files: dict[str, bytes] = FILES, **options) -> bytes:
    """A tar of `files`, plus a folder and a symbolic link (which the reader passes over), in tarfile's `fmt`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt, **options) as tar:
        folder = tarfile.TarInfo("dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        long = fmt != tarfile.USTAR_FORMAT  # GNU writes long link names as 'L' + 'K' headers, pax as records
        link = tarfile.TarInfo("link-to-" + "z" * 110 * long)
        link.type, link.linkname = tarfile.SYMTYPE, "target-" + "w" * 110 * long
        tar.addfile(link)
    return buffer.getvalue()


def read(data: bytes) -> list[tuple[str, bytes]]:
    return list(tar_members(io.BytesIO(data)))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
def test_reads_what_tarfile_reads(fmt):
    if fmt == tarfile.USTAR_FORMAT:  # ustar cannot hold non-ASCII names in a portable way; the long one fits prefix
        files = {name: data for name, data in FILES.items() if name.isascii()}
    else:
        files = FILES
    data = write_tar(fmt, files)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]
    assert read(data) == expected == list(files.items())


def test_global_and_per_member_pax_headers():
    # A global header ('g') first, then per-member 'x' headers (tarfile writes them for non-ASCII names).
    data = write_tar(tarfile.PAX_FORMAT, pax_headers={"comment": "a global pax header"})
    assert data[156:157] == b"g"
    assert read(data) == list(FILES.items())


def with_field(header: bytes, start: int, value: bytes) -> bytes:
    """A header block with bytes [start, start + len(value)) replaced and its checksum made right again."""
    header = header[:start] + value + header[start + len(value):]
    blank = header[:148] + b" " * 8 + header[156:]
    return blank[:148] + b"%06o\0 " % sum(blank) + blank[156:]


def test_a_pax_size_overrides_the_header_size():
    # As a writer does for members of 8 GiB and more: the ustar size field says 0, the pax record the real size.
    body = contents(700, 5)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("big.png")
        info.size, info.pax_headers = len(body), {"size": str(len(body))}
        tar.addfile(info, io.BytesIO(body))
    data = buffer.getvalue()
    assert data[156:157] == b"x" and b" size=700\n" in data[BLOCK:2 * BLOCK]
    member = 2 * BLOCK  # the pax header and its one block of records come first
    patched = data[:member] + with_field(data[member:member + BLOCK], 124, b"00000000000\0") + data[member + BLOCK:]
    assert read(patched) == [("big.png", body)]


def test_base_256_size_and_signed_checksum():
    body = contents(40, 6)
    data = write_tar(tarfile.GNU_FORMAT, {"s.png": body})
    member = next(i for i in range(0, len(data), BLOCK) if data[i:i + 5] == b"s.png")
    header = with_field(data[member:member + BLOCK], 124, b"\x80" + len(body).to_bytes(11, "big"))
    # Old tars summed the header as signed bytes: a name byte >= 128 makes the two sums differ.
    header = header[:10] + b"\xe9" + header[11:]
    blank = header[:148] + b" " * 8 + header[156:]
    signed = sum(b - 256 if b > 127 else b for b in blank)
    header = header[:148] + b"%06o\0 " % signed + header[156:]
    assert signed != sum(blank)
    (name, content), = read(data[:member] + header + data[member + BLOCK:])
    assert content == body and name.startswith("s.png")


def test_matches_webdataset_on_a_shard_written_by_its_tar_writer():
    from webdataset import TarWriter
    from webdataset.tariterators import tar_file_iterator

    buffer = io.BytesIO()
    with TarWriter(buffer, encoder=False) as writer:
        for i in range(5):
            writer.write({"__key__": f"{i:09d}", "png": contents(600 + i, i), "cls": str(i).encode()})
    data = buffer.getvalue()
    expected = [(m["fname"], m["data"]) for m in tar_file_iterator(io.BytesIO(data))]
    assert read(data) == expected and len(expected) == 10


def test_a_truncated_tar_gives_its_whole_members_then_fails():
    data = write_tar(tarfile.PAX_FORMAT)
    names = list(FILES)
    start_c = next(i for i in range(0, len(data), BLOCK) if data[i:i + 5] == b"c.jpg")
    # cut inside c.jpg's data: a.png and dir/b.cls came before it
    members = tar_members(io.BytesIO(data[:start_c + BLOCK + 100]))
    assert [next(members)[0], next(members)[0]] == names[:2]
    with pytest.raises(DamagedTar, match="ends inside a member"):
        next(members)
    # cut inside a header, and at a member boundary without the end-of-archive block
    for cut in (start_c + 100, start_c):
        members = tar_members(io.BytesIO(data[:cut]))
        assert [name for name, _ in (next(members), next(members))] == names[:2]
        with pytest.raises(DamagedTar, match="without the end-of-archive block"):
            next(members)


@pytest.mark.parametrize("damage", ["empty", "not a tar", "flipped byte"])
def test_damaged_files_raise(damage):
    data = write_tar(tarfile.USTAR_FORMAT, {"a.png": contents(10, 1), "b.png": contents(10, 2)})
    if damage == "empty":
        data, before = b"", []
    elif damage == "not a tar":
        data, before = contents(4 * BLOCK, 9), []
    else:
        second = next(i for i in range(0, len(data), BLOCK) if data[i:i + 5] == b"b.png")
        data, before = data[:second + 3] + b"c" + data[second + 4:], ["a.png"]  # "b.png" -> "b.pcg"
    members = tar_members(io.BytesIO(data))
    assert [next(members)[0] for _ in before] == before
    with pytest.raises(DamagedTar, match="empty file|not a tar header"):
        next(members)


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
def test_compressed_tars_are_read_and_their_damage_detected(tmp_path, compression):
    from data.tar_reader import open_tar

    path = tmp_path / f"shard.tar.{compression}"
    with tarfile.open(path, f"w:{compression}") as tar:
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open_tar(path) as stream:
        assert list(tar_members(stream)) == list(FILES.items())
    cut = tmp_path / f"cut.tar.{compression}"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with open_tar(cut) as stream, pytest.raises(DamagedTar):
        list(tar_members(stream))
