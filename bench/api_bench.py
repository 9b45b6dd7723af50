"""API benchmark: wrk against gunicorn (2 sync workers, persistent connections), the portal next to
a bare Django app served the same way, in the same run."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench import cpu

ROOT = Path(__file__).resolve().parents[1]
LUA = ROOT / "bench" / "wrk" / "post.lua"
CONNECTIONS = 16
WRK_THREADS = 2
GUNICORN_WORKERS = 2


@dataclass
class Endpoint:
    name: str
    server: str  # "portal" or "bare"
    method: str
    path: str
    kind: str = ""  # the body post.lua writes (build, release, bare); empty for GET
    compare_to: str = ""  # the bare endpoint this one is measured against
    target: float = 0.5
    measures: str = ""  # what a row that is no target of its own shows


def endpoints(release_version: str, build_number: str) -> list[Endpoint]:
    """What is measured, in order: each bare view first, then the portal's endpoints against it. The
    last, one build, is the lightest read that authenticates (the token and one row in one round
    trip): what any authenticated read reaches at most here."""
    return [
        Endpoint("bare insert (one row, one statement)", "bare", "POST", "/insert", "bare"),
        Endpoint("POST /api/v1/builds", "portal", "POST", "/api/v1/builds", "build", "bare insert"),
        Endpoint("POST /api/v1/releases", "portal", "POST", "/api/v1/releases", "release", "bare insert"),
        Endpoint("bare JSON view", "bare", "GET", "/json"),
        Endpoint("GET /api/v1/applications/MAC/environments", "portal", "GET",
                 "/api/v1/applications/MAC/environments", compare_to="bare JSON"),
        Endpoint(f"GET /api/v1/releases/MAC/{release_version}", "portal", "GET",
                 f"/api/v1/releases/MAC/{release_version}", compare_to="bare JSON"),
        Endpoint(f"GET /api/v1/builds/MAC/{build_number}", "portal", "GET", f"/api/v1/builds/MAC/{build_number}",
                 compare_to="bare JSON", measures="ceiling of an authenticated read"),
    ]


def wrk_or_none() -> str | None:
    return shutil.which("wrk")


class Server:
    """gunicorn with 2 sync workers; persistent database connections."""

    def __init__(self, app: str, port: int, database_url: str, log: Path):
        self.app, self.port, self.database_url, self.log = app, port, database_url, log
        self.process: subprocess.Popen | None = None

    def __enter__(self):
        env = {**os.environ, "DATABASE_URL": self.database_url, "DATABASE_CONN_MAX_AGE": "600",
               "SECRET_KEY": os.environ.get("SECRET_KEY", "benchmark-only"),
               "ALLOWED_HOSTS": "127.0.0.1,localhost", "PORTAL_LOG_LEVEL": "WARNING",
               "PORTAL_SSL_REDIRECT": "0"}  # plain HTTP on loopback, as behind a proxy that ends TLS
        env.pop("DJANGO_SETTINGS_MODULE", None)
        gunicorn = str(Path(sys.executable).parent / "gunicorn")
        self.process = subprocess.Popen(
            [gunicorn, self.app, "--bind", f"127.0.0.1:{self.port}", "--workers", str(GUNICORN_WORKERS),
             "--worker-class", "sync", "--chdir", str(ROOT), "--log-level", "warning"],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn {self.app} exited; see {self.log}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=2)
                return self
            except urllib.error.HTTPError:
                return self  # it answers (a 404 or a redirect is fine)
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"gunicorn {self.app} did not answer on port {self.port}")

    def __exit__(self, *exc):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * _UNITS[unit]


class CpuMeter:
    """CPU spent by a gunicorn server's processes and by PostgreSQL's while a run lasts: what 16 clients
    on 2 cores run out of is CPU, so the CPU per request says where a request's cost is."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid

    def _now(self) -> tuple[float, float]:
        web = cpu.cpu_seconds(self.server_pid) + sum(cpu.cpu_seconds(c) for c in cpu.children(self.server_pid))
        return web, cpu.postgres_cpu_seconds()

    def __enter__(self):
        self.start = self._now()
        return self

    def __exit__(self, *exc):
        self.end = self._now()

    def per_request_ms(self, requests: int) -> tuple[float | None, float | None]:
        if not requests:
            return None, None
        return tuple(1000 * (b - a) / requests for a, b in zip(self.start, self.end, strict=True))


def run_wrk(wrk: str, url: str, endpoint: Endpoint, seconds: int, run_id: str, token: str) -> dict:
    command = [wrk, f"-t{WRK_THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", "--timeout", "10s"]
    if endpoint.method == "POST":
        command += ["-s", str(LUA), url, "--", endpoint.kind, run_id, token if endpoint.server == "portal" else ""]
    else:
        if endpoint.server == "portal":
            command += ["-H", f"Authorization: Bearer {token}"]
        command += [url]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return {**parse_wrk(done.stdout), "command": command}


def parse_wrk(out: str) -> dict:
    """requests, req/s, p50 and p99 in ms (None without answers), failed (non-2xx, socket errors, timeouts)."""
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = (int(non_2xx.group(1)) if non_2xx else 0) + (sum(int(g) for g in errors.groups()) if errors else 0)
    return {"rate": rate, "requests": requests, "failed": failed,
            "p50_ms": _ms(p50.group(1)) if requests and p50 else None,
            "p99_ms": _ms(p99.group(1)) if requests and p99 else None}


def drain(url: str, limit: float = 240.0) -> float:
    """Wait until the server answers a cheap request at once: the requests a run left queued in the
    workers' backlog would otherwise be served during the next run. Returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        start = time.monotonic()
        try:
            urllib.request.urlopen(url, timeout=limit)
        except urllib.error.HTTPError:
            pass  # an answer (401, 404) is what is waited for
        except OSError:
            time.sleep(0.5)
            continue
        if time.monotonic() - start < 0.5:
            break
    return time.monotonic() - t0


def _fmt(ms: float | None, digits: int = 1) -> str:
    return "-" if ms is None else f"{ms:.{digits}f}"


def prepare() -> tuple[str, str, str]:
    """A CI token for MAC (created through the portal's service, so it is audited), the bare table, and
    a release version and build number to read."""
    from django.db import connection

    from access.models import ApiToken
    from access.services import token_create
    from audit.actors import Actor
    from bench.bare.urls import CREATE_TABLE
    from releases.models import Application, Release

    app = Application.objects.get(name="MAC")
    _, raw = token_create(actor=Actor.system(via="bench"), kind=ApiToken.Kind.CI, name="bench", applications=[app])
    with connection.cursor() as cursor:
        cursor.execute(CREATE_TABLE)
    count = Release.objects.filter(application=app, version__startswith="1.0.").count()
    version = f"1.0.{max(1, count // 2)}"
    build = Release.objects.filter(application=app, version=version).values_list("build__number", flat=True).first()
    return raw, version, build or "1"  # unseeded: the reads answer 404, counted as failed


def measure(database_url: str, ports: tuple[int, int], seconds: int, log_dir: Path, log=print) -> list[dict]:
    wrk = wrk_or_none()
    if wrk is None:
        log("wrk is not installed: `apt-get install -y wrk` (Debian), then run again. API figures skipped.")
        return []
    token, version, build = prepare()
    run_id = str(int(time.time()))
    results: dict[str, dict] = {}
    rows = []
    with Server("portal.wsgi", ports[0], database_url, log_dir / "gunicorn-portal.log") as portal, \
            Server("bench.bare.wsgi", ports[1], database_url, log_dir / "gunicorn-bare.log") as bare:
        servers = {"portal": portal, "bare": bare}
        for endpoint in endpoints(version, build):
            base_url = f"http://127.0.0.1:{servers[endpoint.server].port}"
            url, probe = base_url + endpoint.path, base_url + ("/json" if endpoint.server == "bare" else "/api/v1/x")
            run_wrk(wrk, url, endpoint, 2, f"{run_id}w", token)  # warm up: connections, imports, caches
            drain(probe)
            with CpuMeter(servers[endpoint.server].process.pid) as cpu:
                result = run_wrk(wrk, url, endpoint, seconds, run_id, token)
            result["web_cpu_ms"], result["db_cpu_ms"] = cpu.per_request_ms(result["requests"])
            waited = drain(probe)
            if waited > 1:
                log(f"  ({endpoint.name}: {waited:.0f} s until the requests left queued were served)")
            key = "bare insert" if endpoint.path == "/insert" else "bare JSON" if endpoint.path == "/json" else ""
            if key:
                results[key] = result
            base = results.get(endpoint.compare_to)
            ratio = result["rate"] / base["rate"] if base else None
            rows.append({"name": endpoint.name, **result, "ratio": ratio,
                         "target": endpoint.measures or (f">= {endpoint.target} of {endpoint.compare_to}, p99 < 50 ms"
                                                         if endpoint.compare_to else "baseline")})
            log(f"  {endpoint.name}: {result['requests']:,} requests, {result['rate']:,.1f} req/s,"
                f" p50 {_fmt(result['p50_ms'])} ms, p99 {_fmt(result['p99_ms'])} ms, failed {result['failed']},"
                f" CPU per request {_fmt(result['web_cpu_ms'], 2)} ms web + {_fmt(result['db_cpu_ms'], 2)} ms database"
                + (f", {ratio:.2f} of {endpoint.compare_to}" if base else ""), flush=True)
    return rows
