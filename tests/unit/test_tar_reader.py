"""The tar member reader (dist_sae.data.wds.tar_members) at its edges, against the standard
library's tarfile as the reference: the three formats, members passed by seek or read past, cut
tars, size fields that are not numbers, signed header checksums."""

from __future__ import annotations

import io

import numpy as np
import pytest


@pytest.mark.parametrize("fmt", ["pax", "gnu", "ustar"])
def test_the_tar_reader_reads_what_tarfile_reads(tmp_path, fmt):
    """dist_sae's member reader against the standard library's on the three tar formats, long names included."""
    import io
    import tarfile

    from dist_sae.data.wds import tar_members

    path = tmp_path / "t.tar"
    rng = np.random.default_rng(0)
    names = ["a/000001.jpg", "a/000001.cls", "d" * 60 + "/" + "k" * 90 + ".png", "é/x.seg.png", "big.bin"]
    if fmt == "ustar":
        names[2], names[3] = "d" * 60 + "/" + "k" * 40 + ".png", "e/x.seg.png"  # ustar: ASCII, name + prefix only
    with tarfile.open(path, "w", format={"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}[fmt]) as tf:
        d = tarfile.TarInfo("a")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for n in names:
            data = rng.bytes(int(rng.integers(0, 3000)) if n != "big.bin" else 70000)
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        ref = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
    with open(path, "rb") as fh:
        got = [(name, read()) for name, _, read in tar_members(fh)]
    assert got == ref and [n for n, _ in got] == names


class _Stream:
    """A file object with read() only (no length, no seek): a pipe, say."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._buf.read(n)


def test_members_not_read_are_passed_by_seek_or_in_pieces_and_a_cut_one_is_found(tmp_path):
    """A 3 MB member that is not read: passed by seeking (a file, from `seek_past` bytes on) or in
    1 MB pieces (a stream, or a member under `seek_past`), the same members every way; the tar cut
    inside it raises TarError every way; a tar whose last padding is missing is whole."""
    import io
    import tarfile

    from dist_sae.data.wds import TarError, tar_members

    rng = np.random.default_rng(3)
    members = [("000000.jpg", rng.bytes(700)), ("000000.npy", rng.bytes(3 * 2**20 + 5)), ("000001.jpg", rng.bytes(900))]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    wanted = {"000000.jpg", "000001.jpg"}

    class Counted(io.FileIO):  # a local file that counts its seeks
        seeks = 0

        def seek(self, *args):
            Counted.seeks += 1
            return super().seek(*args)

    def images(fh, seek_past=2**20):
        return [(name, read()) for name, _, read in tar_members(fh, seek_past) if name in wanted]

    expected = [(n, d) for n, d in members if n in wanted]
    with Counted(path) as fh:
        assert images(fh) == expected and Counted.seeks == 1  # the .npy member, seeked past
    Counted.seeks = 0
    with Counted(path) as fh:
        assert images(fh, seek_past=8 * 2**20) == expected and Counted.seeks == 0  # under 8 MB: read past
    Counted.seeks = 0
    with Counted(path) as fh:  # a local file by default: every member nobody reads seeked past
        assert [(n, r()) for n, _, r in tar_members(fh) if n in wanted] == expected and Counted.seeks == 1
    assert images(_Stream(path.read_bytes())) == expected
    cut = path.read_bytes()[: 512 + 1024 + 512 + 2**20]  # inside the .npy member's data
    (tmp_path / "cut.tar").write_bytes(cut)
    for seek_past in (2**20, 8 * 2**20):
        with open(tmp_path / "cut.tar", "rb") as fh, pytest.raises(TarError, match="truncated: 000000.npy"):
            images(fh, seek_past)
    with pytest.raises(TarError, match="truncated: 000000.npy"):
        images(_Stream(cut))
    # Ends right after the last member's data (no padding, no end blocks): whole, every way.
    whole = path.read_bytes()[: 512 + 1024 + 512 + len(members[1][1])]
    for fh in (io.BytesIO(whole), _Stream(whole)):
        assert [name for name, _, _ in tar_members(fh)] == ["000000.jpg", "000000.npy"]


@pytest.mark.parametrize("field", [b"-1110", b"1_0", b"+7"])
def test_a_size_field_that_is_no_octal_number_is_damage(field):
    """int() takes '-1110' and '1_0' in base 8; a tar's size field is octal digits only (a negative
    size would have the reader seek back to the same header forever)."""
    import io
    import tarfile

    from dist_sae.data.wds import TarError, tar_members

    info = tarfile.TarInfo("0.jpg")
    info.size = 3
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[124:136] = field.ljust(11, b" ") + b"\0"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    data = bytes(header) + b"abc".ljust(512, b"\0") + b"\0" * 1024
    with pytest.raises(TarError, match="not a tar header"):
        list(tar_members(io.BytesIO(data)))
    pax = tarfile.TarInfo("0.jpg")
    pax.size, pax.pax_headers = 3, {"size": "\u00b2"}
    data = pax.tobuf(tarfile.PAX_FORMAT) + b"abc".ljust(512, b"\0") + b"\0" * 1024
    with pytest.raises(TarError, match="damaged pax header"):
        list(tar_members(io.BytesIO(data)))


def test_a_header_with_a_signed_checksum_is_read():
    """Some old writers summed the header as signed bytes; tarfile accepts that, and so does the reader."""
    import io
    import tarfile

    from dist_sae.data.wds import tar_members

    info = tarfile.TarInfo("caf\xe9.jpg")
    info.size = 3
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT, encoding="latin-1"))
    blanked = header[:148] + b" " * 8 + header[156:]
    signed = sum(b - 256 if b > 127 else b for b in blanked)
    header[148:156] = b"%06o\0 " % signed
    data = bytes(header) + b"abc".ljust(512, b"\0") + b"\0" * 1024
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:  # the reference reads it too
        assert tf.extractfile(tf.getmembers()[0]).read() == b"abc"
    assert [(n, read()) for n, _, read in tar_members(io.BytesIO(data))] == [("caf\ufffd.jpg", b"abc")]
