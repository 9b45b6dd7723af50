"""One instance of the demo application behind HAProxy (standard library only).

GET /        -> "<version> <name>" where version is read from <root>/current/VERSION
GET /health  -> 200 "ok", or 500 when the installed version is listed in <root>/FAIL_HEALTH
               (a release that is broken on this host, for tests)
"""

import argparse
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--name", default="app")
    args = parser.parse_args()
    root = Path(args.root)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            version = _read(root / "current" / "VERSION") or "none"
            if self.path == "/health":
                broken = version in _read(root / "FAIL_HEALTH").split()
                self._answer(500 if broken else 200, "unhealthy" if broken else "ok")
            else:
                self._answer(200, f"{version} {args.name}")

        def _answer(self, status, text):
            body = (text + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    (root / "app.pid").write_text(str(os.getpid()))
    server.serve_forever()


if __name__ == "__main__":
    main()
