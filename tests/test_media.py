"""workers/media.py: PNG output and safe input-image loading (data: URIs and real HTTP on loopback)."""
from __future__ import annotations

import base64
import io
import ipaddress
import socket
import struct
import subprocess
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from workers.media import ImageLimits, encode_png, load_input_image

MAX_BYTES = 1_000_000
MAX_PIXELS = 1_000_000


def png_bytes(size=(48, 32), mode="RGB", color=(200, 30, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes, media_type="image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def load(source: str, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, timeout=5.0) -> Image.Image:
    return load_input_image(source, max_bytes=max_bytes, max_pixels=max_pixels, timeout=timeout)


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose IHDR claims width × height pixels (1-bit grey)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- encode_png

def test_encode_png_round_trips_without_metadata():
    image = Image.new("RGB", (40, 24), (10, 120, 250))
    image.info["icc_profile"] = b"not-a-real-profile"  # must not be copied into the output
    data = encode_png(image)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert b"iCCP" not in data and b"tEXt" not in data and b"eXIf" not in data
    decoded = Image.open(io.BytesIO(data))
    assert decoded.size == (40, 24) and decoded.convert("RGB").getpixel((5, 5)) == (10, 120, 250)


# ---------------------------------------------------------------- data: URIs

def test_data_uri_png_decodes_to_rgb():
    image = load(data_uri(png_bytes()))
    assert image.mode == "RGB" and image.size == (48, 32)
    assert image.getpixel((0, 0)) == (200, 30, 60)


def test_transparent_pixels_become_white_and_jpeg_works():
    image = load(data_uri(png_bytes(mode="RGBA", color=(0, 0, 0, 0))))
    assert image.mode == "RGB" and image.getpixel((3, 3)) == (255, 255, 255)
    buffer = io.BytesIO()
    Image.new("L", (16, 16), 128).save(buffer, format="JPEG")
    assert load(data_uri(buffer.getvalue(), "image/jpeg")).mode == "RGB"


def test_data_uri_with_line_breaks_is_accepted():
    encoded = base64.encodebytes(png_bytes()).decode()  # base64 with a newline every 76 characters
    assert load("data:image/png;base64," + encoded).size == (48, 32)


@pytest.mark.parametrize("source, message", [
    ("data:image/png;base64,@@@not base64@@@", "not valid base64"),
    ("data:image/png;base64,QUJ", "not valid base64"),  # bad padding
    ("data:image/png,rawbytes", "data:image/<type>;base64"),
    ("data:text/plain;base64,aGVsbG8=", "data:image/<type>;base64"),
    ("data:image/png;base64,", "empty"),
    (data_uri(b"hello, this is text and not an image"), "not a decodable image"),
    (data_uri(png_bytes()[:60]), "truncated or corrupt"),
    ("ftp://example.invalid/a.png", "http(s) URL or a data:image"),
    ("file:///etc/hostname", "http(s) URL or a data:image"),
    ("", "missing"),
])
def test_bad_inputs_raise_value_error_with_a_reason(source, message):
    with pytest.raises(ValueError, match="init image") as info:
        load(source)
    assert message in str(info.value)


def test_oversize_data_uri_is_refused_before_decoding():
    with pytest.raises(ValueError, match="byte limit"):
        load(data_uri(png_bytes(size=(64, 64))), max_bytes=50)


def test_eps_is_not_an_accepted_format():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ValueError, match="not a decodable image"):
        load(data_uri(eps, "image/eps"))


# ---------------------------------------------------------------- decompression bombs

def test_small_file_with_too_many_pixels_is_refused():
    buffer = io.BytesIO()
    Image.new("1", (3000, 3000), 0).save(buffer, format="PNG")  # 9 Mpx in a few kB
    assert len(buffer.getvalue()) < 20_000
    with pytest.raises(ValueError, match="pixel limit"):
        load(data_uri(buffer.getvalue()), max_pixels=1_000_000)


def test_header_claiming_huge_dimensions_is_refused():
    # 10^10 pixels: PIL's own DecompressionBombError fires in Image.open, and becomes our ValueError.
    with pytest.raises(ValueError, match="too large"):
        load(data_uri(png_with_header_size(100_000, 100_000)), max_pixels=10**12)
    # Under PIL's threshold but over ours: our header check refuses before any pixel is decoded.
    with pytest.raises(ValueError, match="pixel limit"):
        load(data_uri(png_with_header_size(5000, 5000)))


def test_image_limits_from_catalog():
    from workers.config import load_catalog
    limits = ImageLimits.from_catalog(load_catalog().limits, timeout=7)
    assert limits.max_bytes == 20_000_000 and limits.max_pixels == 4096 * 4096 and limits.timeout == 7


# ---------------------------------------------------------------- http(s) URLs, real HTTP on loopback

class _Handler(BaseHTTPRequestHandler):
    routes: dict = {}
    hosts: list = []      # the Host header of each request

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        self.hosts.append(self.headers.get("Host"))
        route = self.routes.get(self.path)
        if route is None:
            self.send_error(404, "not found")
            return
        kind, body = route
        if kind == "redirect":
            self.send_response(302)
            self.send_header("Location", body)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if kind == "plain":
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if kind == "drip":  # a byte every 0.2 s: no single read times out, the whole does
            try:
                for byte in body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.2)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as it should
        else:  # "plain", or "stream": no Content-Length, the body ends when the connection closes
            self.wfile.write(body)


@pytest.fixture
def http_server(_loopback_server, monkeypatch):
    monkeypatch.setenv("ALLOW_PRIVATE_INPUT_URLS", "1")   # the test server lives on loopback
    return _loopback_server


@pytest.fixture(scope="module")
def _loopback_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    _Handler.routes = {
        "/ok.png": ("plain", png_bytes(size=(20, 10))),
        "/big.png": ("plain", b"\0" * 5000),
        "/stream-big": ("stream", b"\0" * 5000),
        "/stream.png": ("stream", png_bytes(size=(12, 12))),
        "/not-image": ("plain", b"<html>hello</html>"),
        "/drip": ("drip", png_bytes(size=(8, 8))),
        "/moved": ("redirect", "/ok.png"),
    }
    yield base
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x.png", "http://169.254.169.254/latest/meta-data",
                                 "http://10.0.0.1/a.png", "http://[::1]/a.png", "http://localhost/a.png"])
def test_private_hosts_are_refused_before_any_request(url, monkeypatch):
    monkeypatch.delenv("ALLOW_PRIVATE_INPUT_URLS", raising=False)
    with pytest.raises(ValueError, match="not a public address"):
        load(url)


def test_a_redirect_to_a_private_host_is_refused(_loopback_server, monkeypatch):
    from workers import media

    checked = []
    real = media._connect_address

    def public_first_hop(host):   # the first hop stands for a public host; the redirect target is checked for real
        checked.append(host)
        if len(checked) > 1:
            monkeypatch.delenv("ALLOW_PRIVATE_INPUT_URLS", raising=False)
        return real(host)

    monkeypatch.setenv("ALLOW_PRIVATE_INPUT_URLS", "1")
    monkeypatch.setattr(media, "_connect_address", public_first_hop)
    with pytest.raises(ValueError, match="not a public address"):
        load(f"{_loopback_server}/moved")
    assert checked == ["127.0.0.1", "127.0.0.1"]


def test_a_url_two_parsers_read_apart_is_refused_before_any_request(_loopback_server, monkeypatch):
    """urlsplit reads example.com, an HTTP client would connect to the loopback server."""
    monkeypatch.delenv("ALLOW_PRIVATE_INPUT_URLS", raising=False)
    port = _loopback_server.rsplit(":", 1)[1]
    with pytest.raises(ValueError, match="backslash"):
        load(f"http://127.0.0.1:{port}\\@example.com/ok.png")


def test_the_connection_goes_to_the_address_that_was_checked(_loopback_server, monkeypatch):
    """DNS rebinding: a name that answers a public address when checked and loopback a moment
    later. The download must connect to the checked address, never look the name up again."""
    real = socket.getaddrinfo
    answers = []

    def rebinding(host, *args, **kwargs):
        if host != "rebind.example":
            return real(host, *args, **kwargs)
        answers.append(host)
        address = "192.0.2.10" if len(answers) == 1 else "127.0.0.1"   # TEST-NET-1, then the pod itself
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 0))]

    monkeypatch.delenv("ALLOW_PRIVATE_INPUT_URLS", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    monkeypatch.setattr(ipaddress.IPv4Address, "is_global", property(lambda ip: str(ip) == "192.0.2.10"))
    port = _loopback_server.rsplit(":", 1)[1]
    with pytest.raises(ValueError, match="download failed|timed out"):
        load(f"http://rebind.example:{port}/ok.png", timeout=1)
    assert answers == ["rebind.example"]                   # looked up once: the connection went to 192.0.2.10


def test_the_request_carries_the_urls_host(_loopback_server, monkeypatch):
    monkeypatch.setenv("ALLOW_PRIVATE_INPUT_URLS", "1")
    port = _loopback_server.rsplit(":", 1)[1]
    assert load(f"http://localhost:{port}/ok.png").size == (20, 10)   # connected to 127.0.0.1 (IPv4 first)
    assert _Handler.hosts[-1] == f"localhost:{port}"


def test_http_url_downloads_and_decodes(http_server):
    assert load(f"{http_server}/ok.png").size == (20, 10)
    assert load(f"{http_server}/stream.png").size == (12, 12)
    assert load(f"{http_server}/moved").size == (20, 10)


def test_http_404_is_a_value_error(http_server):
    with pytest.raises(ValueError, match="HTTP 404"):
        load(f"{http_server}/missing.png")


def test_http_oversize_is_refused_by_header_and_while_streaming(http_server):
    with pytest.raises(ValueError, match="5000 bytes, over the 1000-byte limit"):
        load(f"{http_server}/big.png", max_bytes=1000)
    with pytest.raises(ValueError, match="over the 1000-byte limit"):
        load(f"{http_server}/stream-big", max_bytes=1000)


def test_http_non_image_and_unreachable_host(http_server):
    with pytest.raises(ValueError, match="not a decodable image"):
        load(f"{http_server}/not-image")
    closed = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens on this port now
    with pytest.raises(ValueError, match="download failed"):
        load(f"http://127.0.0.1:{port}/ok.png")


def test_http_total_deadline_stops_a_dripping_server(http_server):
    started = time.monotonic()
    with pytest.raises(ValueError, match="longer than 0.5 s|timed out"):
        load(f"{http_server}/drip", timeout=0.5)
    assert time.monotonic() - started < 3


@pytest.fixture(scope="module")
def https_server(tmp_path_factory):
    """The loopback routes over TLS, with a self-signed certificate for `localhost` (openssl)."""
    import ssl

    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], cert
    server.shutdown()
    server.server_close()


def test_https_checks_the_certificate_for_the_urls_name_on_the_pinned_address(https_server, _loopback_server,
                                                                              monkeypatch):
    port, cert = https_server
    monkeypatch.setenv("ALLOW_PRIVATE_INPUT_URLS", "1")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))          # trust the test certificate
    assert load(f"https://localhost:{port}/ok.png").size == (20, 10)
    with pytest.raises(ValueError, match="download failed"):    # the certificate names localhost, not 127.0.0.1
        load(f"https://127.0.0.1:{port}/ok.png")
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    with pytest.raises(ValueError, match="download failed"):    # an untrusted certificate
        load(f"https://localhost:{port}/ok.png")
