"""Real PostgreSQL + Supabase stand-in pieces + the edge functions served by Deno, for tests.

Use from any test module (also the cross-half test) by importing the fixtures:
    from tests.supabase.fixtures import postgres_server, supabase_db, edge_server  # noqa: F401
or list "tests.supabase.fixtures" in a conftest's pytest_plugins.

- `postgres_server` (session): initdb into a temp dir, `postgres` on a free loopback port, a
  template database with supabase_stub.sql and every sql/*.sql migration applied in order.
  As root, the server runs as the `postgres` OS user (or PGTEST_OS_USER, else `nobody`).
- `supabase_db` (per test): a fresh database copied from that template (`.url`, `.psql()`).
- `edge_server` (per test): edge_functions/dev_server.ts (both functions under
  /functions/v1/<name>, like Supabase) on a free port, wired to `supabase_db` and `redis_server`.
  `EdgeServer(db_url, redis_url, {"DEV_STORAGE_URL": standin.url}).start()` also forwards
  /storage/v1/* to a storage stand-in, so a worker's single SUPABASE_URL serves both.
"""
from __future__ import annotations

import base64
import glob
import hashlib
import hmac
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
SQL_DIR = REPO / "sql"
STUB_SQL = Path(__file__).with_name("supabase_stub.sql")
DENO = REPO / "node_modules" / ".bin" / "deno"
DENO_CONFIG = REPO / "edge_functions" / "deno.json"
JWT_SECRET = "test-jwt-secret-with-at-least-32-characters"
SERVICE_KEY = "test-service-role-key"
CALLBACK_SECRET = "test-callback-secret"


def pg_bindir() -> Path:
    """pg_config's bindir when it has initdb, else the newest /usr/lib/postgresql/<v>/bin."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip()
        if out and (Path(out) / "initdb").exists():
            return Path(out)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found (initdb); install PostgreSQL 15")
    return Path(found[-1]).parent


def _os_user() -> pwd.struct_passwd | None:
    """None when not root; else the unprivileged user to run postgres as (initdb refuses root)."""
    if os.geteuid() != 0:
        return None
    for name in (os.environ.get("PGTEST_OS_USER"), "postgres", "nobody"):
        if name:
            try:
                return pwd.getpwnam(name)
            except KeyError:
                continue
    raise RuntimeError("running as root and no unprivileged user (postgres/nobody) exists for PostgreSQL")


def jwt_hs256(claims: dict, secret: str = JWT_SECRET) -> str:
    """A Supabase-style access token (HS256)."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def user_token(user_id: str, expires_in: int = 3600, role: str = "authenticated") -> str:
    now = int(time.time())
    return jwt_hs256({"sub": user_id, "role": role, "aud": "authenticated", "iat": now, "exp": now + expires_in})


class PostgresServer:
    def __init__(self):
        self.bindir = pg_bindir()
        self.user = _os_user()
        self.root = Path(tempfile.mkdtemp(prefix="pgtest-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.psql_bin = str(self.bindir / "psql") if (self.bindir / "psql").exists() else shutil.which("psql")
        if self.user:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)

    def _run_as(self) -> dict:
        if not self.user:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def start(self) -> "PostgresServer":
        subprocess.run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--locale=C", "--no-sync"], check=True, capture_output=True,
                       cwd=self.root, **self._run_as())
        self.log = open(self.root / "postgres.log", "ab")
        self.proc = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.root),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=60"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.root, **self._run_as())
        deadline = time.monotonic() + 30
        while subprocess.run([self.psql_bin, *self._conn("postgres"), "-c", "select 1"],
                             capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("postgres did not start:\n" + (self.root / "postgres.log").read_text()[-3000:])
            time.sleep(0.1)
        self.psql("create database supabase_template", db="postgres", single=False)
        self.psql_file(STUB_SQL, db="supabase_template")
        for migration in migrations():
            self.psql_file(migration, db="supabase_template")
        return self

    def _conn(self, db: str) -> list[str]:
        return ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", db]

    def url(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def psql(self, sql: str, db: str, check: bool = True, single: bool = True) -> subprocess.CompletedProcess:
        """Run SQL (in one transaction when `single`); stdout is unaligned, tuples only, '|'-separated."""
        result = subprocess.run([self.psql_bin, *self._conn(db), *(["-1"] if single else []), "-At", "-f", "-"], input=sql,
                                capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"psql failed ({result.returncode}): {result.stderr}\nSQL:\n{sql}")
        return result

    def psql_file(self, path: Path, db: str) -> None:
        result = subprocess.run([self.psql_bin, *self._conn(db), "-1", "-f", str(path)], capture_output=True, text=True)
        if result.returncode != 0:
            raise AssertionError(f"{path.name} failed: {result.stderr}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: smart shutdown
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def migrations() -> list[Path]:
    return sorted(SQL_DIR.glob("*.sql"))


class SupabaseDb:
    """One fresh database with all migrations applied."""

    def __init__(self, server: PostgresServer, name: str):
        self.server, self.name, self.url = server, name, server.url(name)

    def psql(self, sql: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.server.psql(sql, db=self.name, check=check)

    def query(self, sql: str) -> list[list[str]]:
        out = self.psql(sql).stdout.strip()
        return [line.split("|") for line in out.splitlines()] if out else []

    def as_user(self, user_id: str | None, sql: str, role: str = "authenticated", check: bool = True):
        """Run SQL as PostgREST would for a signed-in user (role + request.jwt.claims)."""
        claims = json.dumps({"sub": user_id, "role": role} if user_id else {"role": role}).replace("'", "''")
        return self.psql(f"set local role {role};\nset local request.jwt.claims = '{claims}';\n{sql}", check=check)

    def create_user(self, user_id: str | None = None) -> str:
        user_id = user_id or str(uuid.uuid4())
        self.psql(f"insert into auth.users (id, email) values ('{user_id}', '{user_id}@example.test')")
        return user_id


@pytest.fixture(scope="session")
def postgres_server():
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def supabase_db(postgres_server):
    name = "t_" + uuid.uuid4().hex[:16]
    postgres_server.psql(f"create database {name} template supabase_template", db="postgres", single=False)
    yield SupabaseDb(postgres_server, name)
    postgres_server.psql(f"drop database if exists {name} with (force)", db="postgres", check=False, single=False)


def deno_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment deno needs here: the npm registry npm itself uses, for npm: imports."""
    env = dict(os.environ)
    if not env.get("NPM_CONFIG_REGISTRY"):
        npm = shutil.which("npm")
        registry = subprocess.run([npm, "config", "get", "registry"], capture_output=True, text=True).stdout.strip() if npm else ""
        if registry:
            env["NPM_CONFIG_REGISTRY"] = registry
    env["NO_COLOR"] = "1"
    env.update(extra or {})
    return env


def require_deno() -> Path:
    if not DENO.exists():
        raise RuntimeError('deno missing: run NPM_CONFIG_REGISTRY="$(npm config get registry)" npm install at the repo root')
    return DENO


class EdgeServer:
    """edge_functions/dev_server.ts on a free port: POST {url}/functions/v1/queue-job etc."""

    def __init__(self, db_url: str, redis_url: str, extra_env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            "PORT": str(self.port), "SUPABASE_DB_URL": db_url, "REDIS_URL": redis_url,
            "JWT_SECRET": JWT_SECRET, "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
            "CALLBACK_SECRET": CALLBACK_SECRET, **(extra_env or {}),
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> "EdgeServer":
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([str(require_deno()), "run", "--allow-all", "--config", str(DENO_CONFIG),
                                      str(REPO / "edge_functions" / "dev_server.ts")],
                                     env=deno_env(self.env), stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 120  # the first run may fetch npm packages
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError("edge dev server did not start:\n" + self.log.read().decode(errors="replace")[-3000:])
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def edge_server(supabase_db, redis_server):
    server = EdgeServer(supabase_db.url, redis_server.url).start()
    yield server
    server.stop()
