"""The JSON API under /api/v1/: assembles the apps' routers and maps every failure to
{"code", "detail"} with a 4xx status. Nothing a client sends may produce a 500, and every answer
is JSON and in the OpenAPI document (Django's own 404 and 405 pages included)."""

import json
import logging
from http import HTTPStatus

from django.core.exceptions import DisallowedHost, ObjectDoesNotExist, RequestDataTooBig
from django.db import InterfaceError, OperationalError, connection
from django.http import Http404, JsonResponse
from django.urls import Resolver404, resolve
from django.views import defaults
from ninja import NinjaAPI, Status
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.parser import Parser
from pydantic import BaseModel

from core.decisions import NotFound, PolicyRefusal
from edge.api import BearerToken, unknown_bearer
from environments.api import router as environments_router
from releases.api import router as releases_router

logger = logging.getLogger(__name__)

PREFIX = "/api/v1/"
_UNAUTHENTICATED = "A valid bearer token is required: Authorization: Bearer <token>."

class RepeatedName(ValueError):
    """A JSON object naming a member twice."""


def _once_each(pairs):
    members = {}
    for name, value in pairs:
        if name in members:
            raise RepeatedName(name)
        members[name] = value
    return members


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


class UnreadCoding(ValueError):
    """A body sent compressed (a content coding, or a transfer coding besides chunked): not read."""


def transfer_codings(meta: dict) -> list[str]:
    """A request's transfer codings in the order applied (`gzip, chunked`: ["gzip", "chunked"]); [""]
    without the header."""
    return [part.strip() for part in meta.get("HTTP_TRANSFER_ENCODING", "").lower().split(",")]


def _coding(request) -> str:
    """The header naming a coding the API does not read, as sent, or ""."""
    content = request.META.get("HTTP_CONTENT_ENCODING", "").strip()
    if content and content.lower() != "identity":
        return f"Content-Encoding: {content}"
    if transfer_codings(request.META) not in ([""], ["chunked"]):
        return f"Transfer-Encoding: {request.META['HTTP_TRANSFER_ENCODING'].strip()}"
    return ""


class StrictJson(Parser):
    """JSON as RFC 8259 interoperates: an object names each member once (a second "status" would
    otherwise silently win over the first) and NaN or Infinity is no number. A compressed body is
    refused by name (415) rather than read as something else."""

    def parse_body(self, request):
        if coding := _coding(request):
            raise UnreadCoding(coding)
        return json.loads(request.body, object_pairs_hook=_once_each, parse_constant=_no_constant)


api = NinjaAPI(
    parser=StrictJson(),
    title="Release Portal API",
    version="1",
    description="CI registers builds and releases and requests deployments; people approve with personal tokens. "
    "Every answer is JSON; a failure is {\"code\", \"detail\"} with a 4xx status: 400 INVALID_JSON (a body that "
    "is not JSON), 401 UNAUTHENTICATED, 403 and 409 for the rules (who you are; the state of things), 404 "
    "NOT_FOUND, 413 TOO_LARGE (a body over the size limit), 415 UNSUPPORTED_ENCODING (a compressed body), 422 "
    "INVALID naming each field (or a rule about the content, e.g. UNKNOWN_BUILD). Text fields are stripped of "
    "surrounding whitespace and refuse NUL characters. "
    "503 UNAVAILABLE: the portal's database does not answer (try again shortly; the same registration again is "
    "answered unchanged).",
    auth=BearerToken(),
    urls_namespace="api-v1",
)
api.add_router("", releases_router)
api.add_router("", environments_router)

_UNAVAILABLE = "The portal's database does not answer: try again shortly."
# What a lost database connection raises (not a rule's or a row's error: those are IntegrityError & co).
_CONNECTION_ERRORS = (OperationalError, InterfaceError)


class Health(BaseModel):
    status: str
    database: str


@api.get("/health", auth=None, response={200: Health, 503: Health}, summary="Whether the portal can serve",
         description="For a load balancer's health check (no token): 200 when the database answers, 503 when "
         "it does not. Send the Host header the portal is served under (ALLOWED_HOSTS).")
def health(request):
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except _CONNECTION_ERRORS:
        logger.warning("health check: the database does not answer")  # one line per probe, no traceback
        return Status(503, {"status": "unavailable", "database": "does not answer"})
    return {"status": "ok", "database": "ok"}


def _error(request, status: int, code: str, detail: str, **extra):
    return api.create_response(request, {"code": code, "detail": detail, **extra}, status=status)


@api.exception_handler(PolicyRefusal)
def _refused(request, exc: PolicyRefusal):
    return api.create_response(request, exc.refusal.as_dict(), status=exc.refusal.status)


@api.exception_handler(NotFound)
@api.exception_handler(Http404)
def _not_found(request, exc):
    return _error(request, 404, "NOT_FOUND", str(exc) or "Not found.")


@api.exception_handler(ObjectDoesNotExist)
def _no_such_row(request, exc):
    """A service asked for a row that does not exist (e.g. an unknown deployment id)."""
    model = type(exc).__qualname__.split(".")[0].lower() or "object"
    return _error(request, 404, "NOT_FOUND", f"No such {model}.")


@api.exception_handler(AuthenticationError)
def _unauthenticated(request, exc):
    return _unauthenticated_answer(request)


def _unauthenticated_answer(request):
    answer = _error(request, 401, "UNAUTHENTICATED", _UNAUTHENTICATED)
    answer["WWW-Authenticate"] = 'Bearer realm="api"'  # RFC 6750: how to authenticate
    return answer


def _field(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "body_params", "query", "path")]
    return ".".join(parts) or "body"


def _message(error: dict) -> str:
    """pydantic's message, as a client reads it: a rule's own sentence without "Value error, ", and no
    class names of the portal's."""
    if error.get("type") in ("model_type", "model_attributes_type", "dict_type"):
        return "Input should be a JSON object"
    message = error.get("msg", "invalid")
    return message.removeprefix("Value error, ")


@api.exception_handler(ValidationError)
def _invalid(request, exc: ValidationError):
    errors = [{"field": _field(e.get("loc", ())), "message": _message(e)} for e in exc.errors]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "The request body is not valid."
    return _error(request, 422, "INVALID", detail, errors=errors)


@api.exception_handler(HttpError)
def _http_error(request, exc: HttpError):
    if exc.status_code == 400:
        if isinstance(exc.__cause__, UnreadCoding):
            return _error(request, 415, "UNSUPPORTED_ENCODING", f"The request body is sent compressed "
                          f"({exc.__cause__.args[0]}): send it as plain JSON (chunked or with a length).")
        if isinstance(exc.__cause__, RepeatedName):
            name = exc.__cause__.args[0]
            return _error(request, 400, "INVALID_JSON", f"The request body names {name!r} twice in one object; "
                                                        "each name once.")
        return _error(request, 400, "INVALID_JSON", "The request body is not valid JSON.")
    return _error(request, exc.status_code, "ERROR", str(exc))


@api.exception_handler(RequestDataTooBig)
def _too_big(request, exc):
    return _error(request, 413, "TOO_LARGE", "The request body is too large.")


@api.exception_handler(Exception)
def _unexpected(request, exc):
    if isinstance(exc, _CONNECTION_ERRORS):
        logger.error("The database does not answer: %s", exc)
        return _error(request, 503, "UNAVAILABLE", _UNAVAILABLE)
    logger.exception("Unexpected error in the API")
    return _error(request, 500, "INTERNAL", "Unexpected error; it has been logged.")


def bad_request(request, exception, template_name="400.html"):
    """settings' handler400: a request Django refuses before any view (a Host header the portal does not
    serve, say) is answered {"code", "detail"} under /api/v1/ too, saying what was wrong."""
    if not request.path_info.startswith(PREFIX):
        return defaults.bad_request(request, exception, template_name)
    detail = str(exception) if isinstance(exception, DisallowedHost) else "The request is not valid."
    return JsonResponse({"code": "BAD_REQUEST", "detail": detail}, status=400)


def _routes(path: str) -> bool:
    try:
        resolve(path)
    except Resolver404:
        return False
    return True


_CODES = {400: "BAD_REQUEST", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "TOO_LARGE"}


class JsonAnswersMiddleware:
    """Under /api/v1/, an error page Django or django-ninja writes itself (no route for the path, e.g.
    a path parameter holding a slash; a method the path does not have) is answered as {"code", "detail"}
    too, keeping the `Allow` header of a 405. A request whose bearer token stands for nobody is
    answered 401 whatever the view answered (edge.api.Bearer: the token may be looked up together
    with the view's own reads). HEAD is answered as GET without its body; a path that exists without
    its trailing slash says so."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.method != "HEAD" or not request.path_info.startswith(PREFIX):
            return self._answer(request)
        request.method = "GET"  # wherever GET is served (RFC 9110): GET's status and headers, no body
        response = self._answer(request)
        if not response.streaming:
            response["Content-Length"] = str(len(response.content))
            response.content = b""
        return response

    def _answer(self, request):
        response = self.get_response(request)
        try:
            unknown = unknown_bearer(request)
        except _CONNECTION_ERRORS as exc:  # the token could not be looked up: nothing was shown or done
            logger.error("The database does not answer: %s", exc)
            return _error(request, 503, "UNAVAILABLE", _UNAVAILABLE)
        if unknown:
            return _unauthenticated_answer(request)
        if (response.status_code < 400 or not request.path_info.startswith(PREFIX)
                or response.get("Content-Type", "").startswith("application/json")):
            return response
        status = response.status_code
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Error"
        detail = f"{reason}."
        if status == 404 and request.path_info.endswith("/") and _routes(request.path_info[:-1]):
            detail = f"Not Found: the API's paths end without a slash ({request.path_info[:-1]})."
        answer = JsonResponse({"code": _CODES.get(status, "ERROR"), "detail": detail}, status=status)
        if response.has_header("Allow"):
            answer["Allow"] = response["Allow"]
        return answer
