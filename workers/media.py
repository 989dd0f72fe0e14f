"""Image bytes in and out: PNG encoding for outputs, safe decoding of user-supplied input images.

Every input failure raises `ValueError` with a message that can be shown to the user (it goes into
the failed callback's errorMessage). No torch or diffusers here: this module is imported by
processes that never touch the GPU.
"""
from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import urljoin, urlsplit

import certifi
import numpy as np
import urllib3
from PIL import Image, ImageOps

from workers import png

# Formats a browser can send. Restricting the list keeps PIL away from plugins that shell out
# (EPS → Ghostscript) or have large parsers nobody needs here.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_CHUNK = 64 * 1024
_MAX_REDIRECTS = 5


@dataclass(frozen=True)
class ImageLimits:
    """Caps for one input image; `from_catalog` reads them from job_types.yaml's `limits`."""

    max_bytes: int = 20_000_000
    max_pixels: int = 4096 * 4096
    timeout: float = 30.0

    @classmethod
    def from_catalog(cls, limits, timeout: float = 30.0) -> "ImageLimits":
        return cls(max_bytes=limits.input_image_max_bytes, max_pixels=limits.input_image_max_pixels, timeout=timeout)


def encode_png(image: Image.Image) -> bytes:
    """PIL image → PNG bytes, with no text chunks, ICC profile or EXIF. RGB images (every output)
    go through workers/png.py: bands of rows filtered and deflated on several threads, a 1024² image
    in about a quarter of PIL's time at the same size; other modes through PIL at compress_level 1."""
    return encode_pngs([image])[0]


def encode_pngs(images: list[Image.Image]) -> list[bytes]:
    """encode_png of each image, in order; the bands of all images are encoded in parallel."""
    encoded = iter(png.encode_many([np.asarray(image) for image in images if image.mode == "RGB"]))
    return [next(encoded) if image.mode == "RGB" else _pil_png(image) for image in images]


def _pil_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1, optimize=False, icc_profile=None)
    return buffer.getvalue()


def _decode_data_uri(source: str, max_bytes: int) -> bytes:
    header, sep, body = source.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ValueError("init image: a data: URI must look like data:image/<type>;base64,<data>")
    body = "".join(body.split())  # line breaks inside base64 are common and harmless
    if len(body) * 3 // 4 > max_bytes + 2:  # check before decoding anything
        raise ValueError(f"init image is larger than the {max_bytes}-byte limit")
    try:
        data = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("init image: the data: URI is not valid base64") from None
    if len(data) > max_bytes:
        raise ValueError(f"init image is {len(data)} bytes, over the {max_bytes}-byte limit")
    if not data:
        raise ValueError("init image: the data: URI is empty")
    return data


def request_target(url: str, what: str) -> urllib3.util.Url:
    """The URL as the HTTP client will send it. Refused when two URL parsers would read it apart
    (`http://127.0.0.1:8080\\@example.com/` is example.com to urlsplit, loopback to urllib3): every
    host check must look at the host the connection goes to."""
    if any(ch in url for ch in "\\ \t\r\n"):
        raise ValueError(f"{what} URL contains a backslash or whitespace")
    try:
        target = urllib3.util.parse_url(url)
    except urllib3.exceptions.LocationParseError:
        raise ValueError(f"{what} URL cannot be parsed") from None
    host = (target.host or "").strip("[]").lower()
    if target.scheme not in ("http", "https") or not host or host != (urlsplit(url).hostname or "").lower():
        raise ValueError(f"{what} URL must be a plain http(s) URL with a host")
    return target


def _connect_address(host: str) -> str:
    """The address to connect to. Input URLs come from users: every address of the name must be
    public (SSRF), and the connection goes to the address checked here, so a second DNS answer
    cannot send it elsewhere (DNS rebinding). ALLOW_PRIVATE_INPUT_URLS=1 lifts the check for tests
    and private deployments."""
    try:
        addresses = [info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)]
    except OSError:
        raise ValueError(f"init image host {host[:100]!r} does not resolve") from None
    if os.environ.get("ALLOW_PRIVATE_INPUT_URLS", "") not in ("1", "true", "yes"):
        for address in addresses:
            if not ipaddress.ip_address(address.split("%")[0]).is_global:
                raise ValueError(f"init image host {host[:100]!r} is not a public address")
    return sorted(addresses, key=lambda a: ":" in a)[0]   # IPv4 first


def _open(url: str, timeout: float) -> tuple[urllib3.HTTPConnectionPool, urllib3.BaseHTTPResponse]:
    """One GET (no redirects followed) to the checked address, with the URL's own Host and TLS name."""
    target = request_target(url, "init image")
    host = target.host.strip("[]")
    address = _connect_address(host)
    limits = urllib3.Timeout(connect=timeout, read=timeout)
    if target.scheme == "https":   # the certificate is checked for the URL's name, as usual
        authorities = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE") or certifi.where()
        pool = urllib3.HTTPSConnectionPool(address, target.port or 443, timeout=limits, retries=False,
                                           cert_reqs="CERT_REQUIRED", ca_certs=authorities,
                                           assert_hostname=host, server_hostname=host)
    else:
        pool = urllib3.HTTPConnectionPool(address, target.port or 80, timeout=limits, retries=False)
    headers = {"Host": target.netloc, "Accept": "image/*", "User-Agent": "ourvidz-worker"}
    try:
        response = pool.urlopen("GET", target.request_uri, headers=headers, redirect=False,
                                preload_content=False, decode_content=True, assert_same_host=False)
    except BaseException:
        pool.close()
        raise
    return pool, response


def _download(url: str, max_bytes: int, timeout: float) -> bytes:
    """GET with a byte cap and an overall deadline. A socket timeout bounds each read only, so a
    server dripping bytes could hold the worker forever; read1() returns whatever has arrived,
    which lets the deadline be checked after every read. Redirects are followed by hand so that
    every hop's host is checked."""
    deadline = time.monotonic() + timeout
    chunks, size = [], 0
    pool = response = None
    try:
        for _ in range(_MAX_REDIRECTS + 1):
            pool, response = _open(url, timeout)
            location = response.headers.get("Location") if response.status in (301, 302, 303, 307, 308) else None
            if location is None:
                break
            url = urljoin(url, location)
            response.release_conn()
            pool.close()
        else:
            raise ValueError(f"init image URL redirects more than {_MAX_REDIRECTS} times")
        if response.status >= 400:
            raise ValueError(f"init image download failed: HTTP {response.status} from {url[:200]}")
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise ValueError(f"init image is {declared} bytes, over the {max_bytes}-byte limit")
        while chunk := response.read1(_CHUNK, decode_content=True):
            size += len(chunk)
            if size > max_bytes:
                raise ValueError(f"init image is over the {max_bytes}-byte limit")
            if time.monotonic() > deadline:
                raise ValueError(f"init image download took longer than {timeout:g} s")
            chunks.append(chunk)
    except urllib3.exceptions.NewConnectionError:   # a subclass of the timeout error: refused, unreachable
        raise ValueError("init image download failed: cannot connect") from None
    except urllib3.exceptions.TimeoutError:
        raise ValueError(f"init image download timed out after {timeout:g} s") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise ValueError(f"init image download failed: {type(exc).__name__}") from None
    finally:
        if response is not None:
            response.close()   # the connection it holds: pool.close() closes only idle ones
        if pool is not None:
            pool.close()
    if not chunks:
        raise ValueError("init image download returned no data")
    return b"".join(chunks)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes → RGB image, checking the pixel count from the header before decoding the pixels."""
    try:
        image = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
    except Image.DecompressionBombError:
        # PIL refuses headers over 2 × Image.MAX_IMAGE_PIXELS on its own: same answer as ours.
        raise ValueError(f"init image is too large (over {max_pixels} pixels)") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise ValueError(f"init image is not a decodable image (supported: {', '.join(INPUT_FORMATS)})") from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise ValueError(f"init image is {width}x{height} = {width * height} pixels, over the {max_pixels}-pixel limit")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)  # transparent → white, not black
        return image.convert("RGB")
    except Image.DecompressionBombError:
        raise ValueError(f"init image is too large (over {max_pixels} pixels)") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError):
        raise ValueError("init image is truncated or corrupt") from None


def load_input_image(source: str, max_bytes: int, max_pixels: int, timeout: float) -> Image.Image:
    """A data:image/...;base64 URI or an http(s) URL → RGB PIL image, or ValueError saying why not."""
    if not isinstance(source, str) or not source:
        raise ValueError("init image is missing")
    if source.startswith("data:"):
        data = _decode_data_uri(source, max_bytes)
    elif source.startswith(("https://", "http://")):
        data = _download(source, max_bytes, timeout)
    else:
        raise ValueError("init image must be an http(s) URL or a data:image/...;base64 URI")
    return decode_image(data, max_pixels)


def load_labelled_image(source: str, limits: ImageLimits, what: str) -> Image.Image:
    """`load_input_image` for an input that is not an init image: the messages name it `what`."""
    try:
        return load_input_image(source, limits.max_bytes, limits.max_pixels, limits.timeout)
    except ValueError as exc:
        raise ValueError(str(exc).replace("init image", what)) from None


# --- video outputs --------------------------------------------------------------------------------
MP4_CRF = 18            # visually lossless for generated footage; ~1-3 MB for 5 s at 832x480
MP4_PRESET = "veryfast"  # encoding stays well under a second per clip; slower presets gain ~10% size
FFMPEG_TIMEOUT = 300.0


@dataclass(frozen=True)
class VideoClip:
    """A generated clip: frames as uint8 RGB arrays (H, W, 3), all the same size, played at `fps`."""

    frames: Sequence[np.ndarray]
    fps: int


def ffmpeg_binary() -> str:
    """The ffmpeg of the imageio-ffmpeg wheel (pinned in the lock, ships libx264); IMAGEIO_FFMPEG_EXE
    overrides it."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def encode_mp4(frames: Sequence, fps: int) -> bytes:
    """Frames → H.264 MP4 that browsers play: yuv420p, even dimensions, `+faststart` (the index
    before the data, so playback starts before the download ends). Raises ValueError for bad frames
    and RuntimeError when ffmpeg fails."""
    arrays = [np.ascontiguousarray(np.asarray(frame, dtype=np.uint8)) for frame in frames]
    if not arrays:
        raise ValueError("a video needs at least one frame")
    shape = arrays[0].shape
    if len(shape) != 3 or shape[2] != 3 or any(a.shape != shape for a in arrays):
        raise ValueError(f"video frames must all be RGB arrays of one size, got {shape} first")
    if not 1 <= fps <= 120:
        raise ValueError(f"fps {fps} must be between 1 and 120")
    height, width = shape[:2]
    with tempfile.TemporaryDirectory(prefix="mp4-") as folder:
        # +faststart rewrites the finished file, so ffmpeg needs a seekable output, not a pipe.
        target = Path(folder) / "clip.mp4"
        command = [ffmpeg_binary(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
                   "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0",
                   "-an", "-c:v", "libx264", "-preset", MP4_PRESET, "-crf", str(MP4_CRF), "-pix_fmt", "yuv420p",
                   "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-movflags", "+faststart", str(target)]
        try:
            result = subprocess.run(command, input=b"".join(a.tobytes() for a in arrays), capture_output=True,
                                    timeout=FFMPEG_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"ffmpeg could not encode the video: {exc}") from None
        if result.returncode != 0 or not target.is_file():
            detail = result.stderr.decode(errors="replace").strip()[-500:]
            raise RuntimeError(f"ffmpeg could not encode the video (exit {result.returncode}): {detail}")
        return target.read_bytes()


def encode_jpeg(image, quality: int = 90) -> bytes:
    """A PIL image or uint8 RGB array → JPEG bytes (the video thumbnail: the clip's first frame)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
