"""Two middleware stacks: the site's (sessions, CSRF, messages, the content security policy, static
files) and the API's. The API authenticates each request by its bearer token and answers JSON only,
so of the site's middleware it needs the security headers and its own JSON answers
(settings.API_MIDDLEWARE); the rest would cost every CI call a third of its time for nothing.
The API's documentation page is HTML with scripts: it keeps the site's stack (and its policy)."""

import io

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.handlers.wsgi import WSGIHandler

from portal.api import PREFIX, transfer_codings

DOCS = f"{PREFIX}docs"


def takes_api_stack(path_info: str) -> bool:
    return path_info.startswith(PREFIX) and not path_info.startswith(DOCS)


class ApiMiddleware:
    """For a handler class: load settings.API_MIDDLEWARE instead of settings.MIDDLEWARE."""

    def load_middleware(self, is_async=False):
        # Django's loader reads settings.MIDDLEWARE: lend it the API's list while the stack is built
        # (once, when the process starts and before it serves).
        site = settings.MIDDLEWARE
        settings.MIDDLEWARE = settings.API_MIDDLEWARE
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = site


class ApiHandler(ApiMiddleware, WSGIHandler):
    pass


class ChunkedBody:
    """The body of a request sent in chunks (Transfer-Encoding: chunked, no Content-Length), as CI tools
    that stream their request do: Django reads a body by its length only and would see none. Where the
    server ends the stream itself (`wsgi.input_terminated`, gunicorn), the request is given the size
    limit for its length and this stream for its body, which reads the chunks when the view first reads
    the body (after the token is checked, as a body with a length is), at most one byte beyond the limit
    (which then answers 413)."""

    def __init__(self, stream, limit: int):
        self._stream, self._limit, self._body = stream, limit, None

    def _read_all(self) -> io.BytesIO:
        if self._body is None:
            body = self._stream.read(self._limit + 1)
            if len(body) > self._limit:
                raise RequestDataTooBig("The request body is too large.")
            self._body = io.BytesIO(body)
        return self._body

    def read(self, size=-1):
        return self._read_all().read(size)

    def readline(self, size=-1):
        return self._read_all().readline(size)


def with_length(environ: dict) -> dict:
    """A chunked request's environ with a length and a ChunkedBody (see there); any other as it is."""
    if environ.get("CONTENT_LENGTH") or not environ.get("wsgi.input_terminated") \
            or transfer_codings(environ)[-1] != "chunked":
        return environ
    # With another coding before chunked (gzip, chunked) the body is read as sent, and the API's parser
    # refuses it by name (415) rather than seeing no body at all.
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return {**environ, "wsgi.input": ChunkedBody(environ["wsgi.input"], limit), "CONTENT_LENGTH": str(limit)}


class Dispatch:
    """A WSGI application (or a test client's handler) that hands each request to the stack its
    path takes."""

    def __init__(self, site, api):
        self.site, self.api = site, api

    def __call__(self, environ, *args, **kwargs):
        if takes_api_stack(environ.get("PATH_INFO", "")):
            return self.api(with_length(environ), *args, **kwargs)
        return self.site(environ, *args, **kwargs)
