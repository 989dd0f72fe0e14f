"""A local stand-in of the Supabase endpoints the daemon calls, checking requests as CONTRACT.md documents them.

    with SupabaseStandin(service_key="k", buckets=["sdxl_image_fast"]) as cloud:
        SupabaseStorage(cloud.url, "k").upload(...)
        cloud.objects["sdxl_image_fast/user/job_0.png"]   # (bytes, content_type)
        cloud.callbacks                                    # JSON bodies job-callback accepted

Endpoints:
  POST /storage/v1/object/{bucket}/{userId}/{filename}   Bearer key, Content-Type, x-upsert to overwrite
  GET  /storage/v1/object/{bucket}/{userId}/{filename}   Bearer key → the bytes
  POST /functions/v1/job-callback                       Bearer key (+ a valid signature when a secret is set)
Fault injection: fail_next(prefix, count, status), hang_next(prefix, count, seconds), clear_faults();
outages for a time: fail_for(prefix, duration, status), hang_for(prefix, duration, seconds).
A hung request is still processed after its delay, as a slow real server would.
`early_completions` lists completed callbacks that named an output the stand-in did not hold yet.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from tests.worker_harness import delivered_callbacks

STORAGE_PREFIX = "/storage/v1/object/"
CALLBACK_PATH = "/functions/v1/job-callback"
SIGNATURE_TOLERANCE = 300  # seconds a signed timestamp stays valid
DEFAULT_BUCKETS = ("sdxl_image_fast", "sdxl_image_high", "sdxl_fast", "sdxl_high", "image_fast", "image_high",
                   "video_fast", "video_high")


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict  # lower-case names
    body: bytes = field(repr=False, default=b"")


@dataclass
class _Fault:
    prefix: str
    remaining: int
    status: int | None = None
    seconds: float = 0.0
    until: float | None = None  # a time-bound outage (time.monotonic()); `remaining` is then ignored
    http_status: int | None = None  # the HTTP status sent when it differs from the body's statusCode


class SupabaseStandin:
    def __init__(self, service_key: str = "test-service-key", buckets=DEFAULT_BUCKETS,
                 callback_secret: str | None = None, max_object_bytes: int | None = None):
        self.service_key = service_key
        self.buckets = set(buckets)
        self.callback_secret = callback_secret
        self.max_object_bytes = max_object_bytes
        self.objects: dict[str, tuple[bytes, str]] = {}
        self.callbacks: list[dict] = []
        self.requests: list[Recorded] = []
        self.early_completions: list[dict] = []
        self.lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "SupabaseStandin":
        standin = self

        class Handler(_Handler):
            cloud = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True  # hung handlers must not hold up stop()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="supabase-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "SupabaseStandin":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- fault injection ---------------------------------------------------------------------------
    def fail_next(self, path_prefix: str, count: int, status: int = 503, http_status: int | None = None) -> None:
        """`http_status`: Storage's older answer, HTTP 400 with the real code in the body's statusCode."""
        with self.lock:
            self._faults.append(_Fault(path_prefix, count, status=status, http_status=http_status))

    def hang_next(self, path_prefix: str, count: int, seconds: float) -> None:
        with self.lock:
            self._faults.append(_Fault(path_prefix, count, seconds=seconds))

    def fail_for(self, path_prefix: str, duration: float, status: int = 503) -> None:
        with self.lock:
            self._faults.append(_Fault(path_prefix, 0, status=status, until=time.monotonic() + duration))

    def hang_for(self, path_prefix: str, duration: float, seconds: float) -> None:
        with self.lock:
            self._faults.append(_Fault(path_prefix, 0, seconds=seconds, until=time.monotonic() + duration))

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def _take_fault(self, path: str) -> _Fault | None:
        with self.lock:
            for fault in self._faults:
                if not path.startswith(fault.prefix):
                    continue
                if fault.until is not None:
                    if time.monotonic() < fault.until:
                        return fault
                elif fault.remaining > 0:
                    fault.remaining -= 1
                    return fault
        return None

    # --- views for tests ---------------------------------------------------------------------------
    def requests_to(self, path_prefix: str) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.path.startswith(path_prefix)]

    def callbacks_for(self, job_id: str, timeout: float = 10) -> list[dict]:
        """A job's callback bodies, once its terminal one arrived (or `timeout` passed)."""
        def read():
            with self.lock:
                return list(self.callbacks)
        return delivered_callbacks(read, job_id, timeout)


def _storage_error(status: int, error: str, message: str) -> tuple[int, dict]:
    return status, {"statusCode": str(status), "error": error, "message": message}


class _Handler(BaseHTTPRequestHandler):
    cloud: SupabaseStandin

    def log_message(self, format, *args) -> None:  # keep test output clean
        pass

    def do_POST(self) -> None:
        self._serve("POST")

    def do_GET(self) -> None:
        self._serve("GET")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = urlsplit(self.path).path
        headers = {k.lower(): v for k, v in self.headers.items()}
        cloud = self.cloud
        with cloud.lock:
            cloud.requests.append(Recorded(method, path, headers, body))
        fault = cloud._take_fault(path)
        if fault is not None and fault.status is not None:
            return self._reply(fault.http_status or fault.status, {"statusCode": str(fault.status), "error": "Injected",
                                              "message": f"injected HTTP {fault.status}"})
        if fault is not None:
            time.sleep(fault.seconds)
        try:
            if path.startswith(STORAGE_PREFIX) and method in ("POST", "GET"):
                status, payload = self._storage(method, path[len(STORAGE_PREFIX):], headers, body)
            elif path == CALLBACK_PATH and method == "POST":
                status, payload = self._callback(headers, body)
            else:
                status, payload = 404, {"statusCode": "404", "error": "Not found", "message": f"no route {method} {path}"}
        except Exception as exc:  # a stand-in bug must show up as a 500, not a hang
            status, payload = 500, {"error": "standin", "message": repr(exc)}
        self._reply(status, payload)

    def _reply(self, status: int, payload) -> None:
        if isinstance(payload, tuple):
            data, content_type = payload
        else:
            data, content_type = json.dumps(payload).encode(), "application/json"
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test); a real server would not notice either

    def _bearer_ok(self, headers: dict) -> bool:
        key = self.cloud.service_key
        if headers.get("authorization") != f"Bearer {key}":
            return False
        return headers.get("apikey") in (None, key)

    def _storage(self, method: str, rest: str, headers: dict, body: bytes):
        cloud = self.cloud
        if not self._bearer_ok(headers):
            return _storage_error(401, "Unauthorized", "Invalid JWT")
        parts = [unquote(p) for p in rest.split("/")]
        if len(parts) != 3 or not all(parts) or any(p in (".", "..") for p in parts):
            return _storage_error(400, "Invalid key", f"expected {{bucket}}/{{userId}}/{{filename}}, got {rest!r}")
        bucket, key = parts[0], "/".join(parts)
        if bucket not in cloud.buckets:
            return _storage_error(404, "Bucket not found", "Bucket not found")
        if method == "GET":
            with cloud.lock:
                stored = cloud.objects.get(key)
            if stored is None:
                return _storage_error(404, "not_found", "Object not found")
            return 200, stored
        content_type = headers.get("content-type")
        if not content_type:
            return _storage_error(400, "Invalid Content-Type", "a Content-Type header is required")
        if cloud.max_object_bytes is not None and len(body) > cloud.max_object_bytes:
            return _storage_error(413, "Payload too large", "The object exceeded the maximum allowed size")
        upsert = headers.get("x-upsert", "").lower() == "true"
        with cloud.lock:
            if key in cloud.objects and not upsert:
                return _storage_error(409, "Duplicate", "The resource already exists")
            cloud.objects[key] = (body, content_type)
        return 200, {"Key": key, "Id": str(uuid.uuid4())}

    def _callback(self, headers: dict, body: bytes):
        cloud = self.cloud
        if not self._bearer_ok(headers):
            return 401, {"code": 401, "message": "Invalid JWT"}
        if cloud.callback_secret:
            timestamp = headers.get("x-callback-timestamp", "")
            expected = "v1=" + hmac.new(cloud.callback_secret.encode(), timestamp.encode() + b"." + body,
                                        hashlib.sha256).hexdigest()
            fresh = timestamp.isdigit() and abs(time.time() - int(timestamp)) <= SIGNATURE_TOLERANCE
            if not fresh or not hmac.compare_digest(headers.get("x-callback-signature", ""), expected):
                return 401, {"success": False, "error": "invalid callback signature"}
        if not headers.get("content-type", "").startswith("application/json"):
            return 400, {"success": False, "error": "Content-Type must be application/json"}
        try:
            payload = json.loads(body)
        except ValueError:
            return 400, {"success": False, "error": "body is not JSON"}
        if not isinstance(payload, dict) or not payload.get("jobId"):
            return 400, {"success": False, "error": "jobId is required"}
        if payload.get("status") not in ("queued", "processing", "completed", "failed"):
            return 400, {"success": False, "error": f"invalid status {payload.get('status')!r}"}
        with cloud.lock:
            cloud.callbacks.append(payload)
            if payload["status"] == "completed":
                named = list(payload.get("imageUrls") or []) + [payload.get("filePath") or payload.get("outputUrl")]
                held = {key.split("/", 1)[1] for key in cloud.objects}
                if any(path not in held for path in named if path):
                    cloud.early_completions.append(payload)
        return 200, {"success": True}
