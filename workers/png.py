"""A PNG encoder for 8-bit RGB outputs that compresses an image on several threads at once.

    data = encode_rgb(array)                    # H×W×3 uint8 → PNG bytes
    datas = encode_many([a, b, c])              # several images, every stripe of each in one pool

PIL writes one zlib stream on one thread and tries five filters per row: about 0.2 s for a 1024²
image, a quarter of an SDXL job. Here the image is cut into bands of rows, and each band is filtered
(Paeth, vectorised with numpy) and deflated on its own thread, as pigz does: a raw deflate stream
primed with the 32 KiB of filtered rows before the band (so matches still reach back across the cut)
and ended on a byte boundary (Z_SYNC_FLUSH), only the last band marked final. Their concatenation is
one valid zlib stream, whose Adler-32 is chained over the bands in order. The bytes depend only on the
pixels, never on thread timing, so a job run twice uploads the same file.
"""
from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
LEVEL = 1                   # fastest zlib level: PIL's level 1 gave the same sizes within a few %
STRIPE_BYTES = 256 * 1024   # of filtered data per task (a band of rows: 85 rows of a 1024-wide image)
WINDOW = 32 * 1024          # deflate's window: the dictionary each band gets from the rows before it
PAETH = 4                   # the filter byte each row starts with (PNG spec, 9.2)

# zlib (compress, crc32, adler32) and numpy release the GIL, so these threads run in parallel.
_POOL = ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1), thread_name_prefix="png")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def paeth_filtered(rgb: np.ndarray, first: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows first..stop-1, each as filter byte 4 (Paeth) followed by the row minus its Paeth
    prediction, mod 256. The encoder predicts from the unfiltered neighbours (left a, above b,
    above-left c), so any band of rows is a few vectorised operations on its own; photographs
    compress best with Paeth of the five filters (7% smaller than Up on a 1024² photo here)."""
    height, width, _ = rgb.shape
    stop = height if stop is None else stop
    x = rgb[first:stop].reshape(stop - first, width * 3).astype(np.int16)
    above = rgb[first - 1].reshape(1, width * 3).astype(np.int16) if first > 0 else np.zeros((1, width * 3), np.int16)
    b = np.concatenate([above, x[:-1]])
    a = np.zeros_like(x)
    a[:, 3:] = x[:, :-3]
    c = np.zeros_like(x)
    c[:, 3:] = b[:, :-3]
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    predicted = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    rows = np.empty((stop - first, width * 3 + 1), dtype=np.uint8)
    rows[:, 0] = PAETH
    rows[:, 1:] = (x - predicted).astype(np.uint8)   # two's complement wrap = mod 256
    return rows


def _band(rgb: np.ndarray, first: int, stop: int) -> tuple[bytes, bytes]:
    """Filter and deflate rows first..stop-1. The dictionary is the filtered rows just before the
    band (filtered again here: cheaper than waiting for the band before)."""
    row_bytes = rgb.shape[1] * 3 + 1
    primed_from = max(0, first - -(-WINDOW // row_bytes))
    rows = paeth_filtered(rgb, primed_from, stop)
    primer = rows[:first - primed_from].tobytes()[-WINDOW:]
    data = rows[first - primed_from:].tobytes()
    compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, -15, zdict=primer) if primer else \
        zlib.compressobj(LEVEL, zlib.DEFLATED, -15)
    last = stop == rgb.shape[0]
    return data, compressor.compress(data) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def _check(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"PNG encoding needs an H×W×3 uint8 image, got {rgb.dtype} {rgb.shape}")
    return np.ascontiguousarray(rgb)


def encode_many(images: Sequence[np.ndarray]) -> list[bytes]:
    """PNG bytes of each H×W×3 uint8 image, in order; the bands of all images share the pool."""
    arrays = [_check(image) for image in images]
    tasks = []
    for rgb in arrays:
        per_band = max(1, STRIPE_BYTES // (rgb.shape[1] * 3 + 1))
        tasks.append([_POOL.submit(_band, rgb, first, min(first + per_band, rgb.shape[0]))
                      for first in range(0, rgb.shape[0], per_band)])
    out = []
    for rgb, bands in zip(arrays, tasks):
        height, width, _ = rgb.shape
        checksum, deflated = 1, []
        for task in bands:
            data, compressed = task.result()
            checksum = zlib.adler32(data, checksum)
            deflated.append(compressed)
        header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)   # 8-bit RGB, deflate, no interlace
        # 0x78 0x01: deflate with a 32 KiB window, "fastest" level hint; then the bands and Adler-32.
        stream = b"\x78\x01" + b"".join(deflated) + struct.pack(">I", checksum)
        out.append(SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b""))
    return out


def encode_rgb(rgb: np.ndarray) -> bytes:
    return encode_many([rgb])[0]
