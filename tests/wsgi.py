"""A request through the WSGI application a server runs (portal.wsgi: the site's and the API's
middleware stacks), with PATH_INFO exactly as given (no test-client normalisation)."""

import io
import wsgiref.util

from django.core import signals
from django.db import close_old_connections

from portal.wsgi import application


def serve(path: str, *, method: str = "GET", body: bytes = b"", script_name: str = "", **headers
          ) -> tuple[int, dict, bytes]:
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "SCRIPT_NAME": script_name,
               "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)),
               "CONTENT_TYPE": "application/json", "SERVER_NAME": "testserver",
               **{f"HTTP_{name.upper()}": value for name, value in headers.items()}}
    wsgiref.util.setup_testing_defaults(environ)
    answer = {}

    def start_response(status, response_headers, exc_info=None):
        answer["status"], answer["headers"] = int(status.split()[0]), dict(response_headers)

    # As Django's test client does: the test's transaction holds the connection the request uses.
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        response = application(environ, start_response)
        content = b"".join(response)
        response.close()
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)
    return answer["status"], answer["headers"], content
