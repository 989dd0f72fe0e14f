"""workers/png.py: the banded parallel PNG encoder must give back exactly the pixels it was given,
to PIL and to ffmpeg (two independent decoders), with valid chunk CRCs and zlib checksum."""
import io
import struct
import subprocess
import zlib

import numpy as np
import pytest
from PIL import Image

from workers import media, png

RNG = np.random.default_rng(7)


def noise(height, width):
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


def smooth(height, width):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x % 256, y % 256, (x * y) % 256], -1).astype(np.uint8)


def chunks(data: bytes):
    assert data[:8] == png.SIGNATURE
    pos, found = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        found.append((kind, body))
        pos += 12 + length
    return found


# Shapes that cross band edges in different ways: one band, many bands, a last band of one row,
# rows shorter than the 3-byte pixel step, a band thinner than the 32 KiB dictionary.
SHAPES = [(1, 1), (2, 1), (64, 64), (1024, 1024), (1000, 131), (3000, 7), (345, 2049), (86, 1024)]


@pytest.mark.parametrize("height,width", SHAPES)
@pytest.mark.parametrize("make", [noise, smooth])
def test_pil_decodes_exactly_the_pixels(height, width, make):
    rgb = make(height, width)
    data = png.encode_rgb(rgb)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == "RGB" and decoded.size == (width, height)
    assert np.array_equal(np.asarray(decoded), rgb)


def test_structure_checksums_and_zlib_stream():
    rgb = smooth(700, 900)
    found = chunks(png.encode_rgb(rgb))
    assert [kind for kind, _ in found] == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBBBBB", found[0][1]) == (900, 700, 8, 2, 0, 0, 0)
    raw = zlib.decompress(found[1][1])   # checks the zlib header and the chained Adler-32
    rows = np.frombuffer(raw, np.uint8).reshape(700, 900 * 3 + 1)
    assert (rows[:, 0] == png.PAETH).all()
    assert raw == png.paeth_filtered(rgb).tobytes()   # banding does not change the filtered data


def test_ffmpeg_decodes_exactly_the_pixels(tmp_path):
    rgb = noise(512, 768)
    path = tmp_path / "out.png"
    path.write_bytes(png.encode_rgb(rgb))
    result = subprocess.run([media.ffmpeg_binary(), "-v", "error", "-i", str(path), "-f", "rawvideo",
                             "-pix_fmt", "rgb24", "pipe:1"], capture_output=True, timeout=60, check=True)
    assert np.array_equal(np.frombuffer(result.stdout, np.uint8).reshape(512, 768, 3), rgb)


def test_bytes_depend_only_on_pixels():
    images = [noise(300, 400), smooth(1024, 1024), noise(1024, 1024)]
    together = png.encode_many(images)
    assert together == [png.encode_rgb(im) for im in images] == png.encode_many(images)


def test_compresses_like_pil_level_one():
    # Photo-like: smooth shapes (a 12×12 random picture scaled up) with a little grain.
    base = np.asarray(Image.fromarray(noise(12, 12)).resize((512, 512), Image.Resampling.BICUBIC), np.int16)
    rgb = np.clip(base + RNG.integers(-2, 3, base.shape), 0, 255).astype(np.uint8)
    pil = io.BytesIO()
    Image.fromarray(rgb).save(pil, format="PNG", compress_level=1)
    assert len(png.encode_rgb(rgb)) < 1.15 * len(pil.getvalue())


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((4, 4, 3), np.float32), np.zeros((0, 4, 3), np.uint8)])
def test_rejects_what_is_not_8_bit_rgb(bad):
    with pytest.raises(ValueError, match="H×W×3 uint8"):
        png.encode_rgb(bad)


def test_media_keeps_other_modes_on_pil():
    gray, rgb = Image.new("L", (20, 10), 77), Image.fromarray(noise(10, 20))
    first, second = media.encode_pngs([gray, rgb])
    assert Image.open(io.BytesIO(first)).mode == "L"
    assert second == png.encode_rgb(np.asarray(rgb))
