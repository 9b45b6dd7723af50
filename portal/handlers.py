"""Two middleware stacks: the site's (sessions, CSRF, messages, the content security policy, static
files) and the API's. The API authenticates each request by its bearer token and answers JSON only,
so of the site's middleware it needs the security headers and its own JSON answers
(settings.API_MIDDLEWARE); the rest would cost every CI call a third of its time for nothing.
The API's documentation page is HTML with scripts: it keeps the site's stack (and its policy)."""

import io

from django.conf import settings
from django.core.handlers.wsgi import WSGIHandler

from portal.api import PREFIX

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


def with_length(environ: dict) -> dict:
    """A body sent in chunks (Transfer-Encoding: chunked, no Content-Length), as CI tools that stream
    their request do: Django reads a body by its length only and would see none. Where the server ends
    the stream itself (`wsgi.input_terminated`, gunicorn), the body is read here, at most one byte
    beyond the size limit (which then answers 413)."""
    if (environ.get("CONTENT_LENGTH") or not environ.get("wsgi.input_terminated")
            or "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower()):
        return environ
    body = environ["wsgi.input"].read(settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)
    return {**environ, "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body))}


class Dispatch:
    """A WSGI application (or a test client's handler) that hands each request to the stack its
    path takes."""

    def __init__(self, site, api):
        self.site, self.api = site, api

    def __call__(self, environ, *args, **kwargs):
        if takes_api_stack(environ.get("PATH_INFO", "")):
            return self.api(with_length(environ), *args, **kwargs)
        return self.site(environ, *args, **kwargs)
