"""Settings of the Release Portal, read from the environment.

DATABASE_URL   database (default: SQLite under var/)
SECRET_KEY     required unless PORTAL_DEMO=1 or PORTAL_DEBUG=1
PORTAL_DEBUG   1 turns Django's DEBUG on (never in production)
PORTAL_DEMO    1 for the local demo (`make run`): a throwaway secret key (and audit seal key) is allowed
PORTAL_AUDIT_SEAL_KEY, PORTAL_AUDIT_SEAL_KEY_FILE  the key that seals the audit events the portal writes
PORTAL_AUDIT_RETIRED_SEAL_KEYS_FILE  the seal keys it replaced, oldest first, one per line
ALLOWED_HOSTS  comma-separated host names (default: localhost,127.0.0.1)

HTTPS (secure by default; off in demo and debug mode, which serve plain http on loopback):
PORTAL_SSL_REDIRECT            1/0: redirect http to https (default 1)
PORTAL_HSTS_SECONDS            Strict-Transport-Security max-age (default one year; 0 turns it off)
PORTAL_HSTS_INCLUDE_SUBDOMAINS 1/0 (default 1)
PORTAL_HSTS_PRELOAD            1/0 (default 1)
PORTAL_TLS_PROXY               1 when a TLS-terminating proxy sets X-Forwarded-Proto (and strips it from clients)
"""

import os
from pathlib import Path

import dj_database_url
from csp.constants import NONE, SELF
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("PORTAL_VAR_DIR", BASE_DIR / "var"))


def _flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return value in {"1", "true", "yes", "on"} if value else default


DEBUG = _flag("PORTAL_DEBUG")
DEMO = _flag("PORTAL_DEMO")

SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not (DEBUG or DEMO):
        raise ImproperlyConfigured("SECRET_KEY must be set (or PORTAL_DEMO=1 for the local demo).")
    SECRET_KEY = "insecure-demo-key-do-not-use-in-production"

ALLOWED_HOSTS = [h.strip() for h in os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1").split(",") if h.strip()]
CSRF_TRUSTED_ORIGINS = [
    o.strip() for o in os.environ.get("CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()
]

INSTALLED_APPS = [
    "edge.apps.PortalAdminConfig",  # django.contrib.admin with the portal's site (the release board)
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "guardian",
    "auditlog",
    "django_q",
    "ninja",  # Swagger UI from its bundled static files (no CDN)
    "csp",
    "audit",
    "releases",
    "environments",
    "access",
    "portal",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "audit.middleware.FieldHistoryActorMiddleware",
    "portal.api.JsonAnswersMiddleware",
]

# Under /api/v1/ (but its documentation page): bearer tokens, JSON answers (portal.handlers). The
# common middleware checks the Host header against ALLOWED_HOSTS on every request.
API_MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "portal.api.JsonAnswersMiddleware",
]

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = "portal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
            "libraries": {"portal": "edge.templatetags"},
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", f"sqlite:///{VAR_DIR / 'portal.sqlite3'}"),
        conn_max_age=int(os.environ.get("DATABASE_CONN_MAX_AGE", "0")),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    VAR_DIR.mkdir(parents=True, exist_ok=True)  # the default database lives there; a fresh clone has no var/
    # IMMEDIATE: every transaction takes the write lock when it begins, so two writers can never
    # interleave between reading the audit chain head and appending to it.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }

AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "guardian.backends.ObjectPermissionBackend",
]
# A password set in the admin or by create_admin: Django's own checks (not like the account's name or
# e-mail, at least 12 characters, not a common password, not only digits). The demo's users have their
# names as passwords: demo_data sets them directly, as it may only in demo mode.
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 12}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
GUARDIAN_RAISE_403 = False
ANONYMOUS_USER_NAME = None  # no guardian anonymous user: every actor is a real person or a CI token

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
FORMAT_MODULE_PATH = ["portal.formats"]  # dates and times as 2026-11-30 14:05:00 (UTC)

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

LOGIN_URL = "admin:login"

# Bodies larger than this are refused with 413 before any parsing.
DATA_UPLOAD_MAX_MEMORY_SIZE = 256 * 1024

# HTTPS only, except for the demo and debugging on loopback.
_PLAIN_HTTP = DEBUG or DEMO
SESSION_COOKIE_SECURE = not _PLAIN_HTTP
CSRF_COOKIE_SECURE = not _PLAIN_HTTP
SECURE_SSL_REDIRECT = _flag("PORTAL_SSL_REDIRECT", default=not _PLAIN_HTTP)
# A load balancer probes the health check over plain HTTP on the internal network: it answers there
# (it holds nothing but whether the database answers) instead of redirecting the probe to HTTPS.
SECURE_REDIRECT_EXEMPT = [r"^api/v1/health$"]
SECURE_HSTS_SECONDS = int(os.environ.get("PORTAL_HSTS_SECONDS", "0" if _PLAIN_HTTP else str(365 * 24 * 3600)))
SECURE_HSTS_INCLUDE_SUBDOMAINS = _flag("PORTAL_HSTS_INCLUDE_SUBDOMAINS", default=True)
SECURE_HSTS_PRELOAD = _flag("PORTAL_HSTS_PRELOAD", default=True)
if _flag("PORTAL_TLS_PROXY"):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# Content security policy (django-csp): the admin, the portal's pages and the bundled Swagger UI load
# everything from the portal itself; no inline script or style, no CDN, no framing.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "img-src": [SELF, "data:"],  # Swagger UI's stylesheet embeds its icons as data: URIs
        "font-src": [SELF],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    },
}

# django-auditlog: field history of settings models; the client address is REMOTE_ADDR (see audit.middleware).
AUDITLOG_INCLUDE_ALL_MODELS = False

# The portal's own knobs.
PORTAL_APPROVAL_EXPIRY_HOURS = int(os.environ.get("PORTAL_APPROVAL_EXPIRY_HOURS", "72"))
# An emergency deployment not reviewed within this many days is overdue (the board, the exceptions report).
PORTAL_REVIEW_DUE_DAYS = int(os.environ.get("PORTAL_REVIEW_DUE_DAYS", "5"))
# The lists of deployments and audit events count exactly up to this many rows; beyond it they say "about"
# (PostgreSQL's estimate of the whole table) or "more than" (a filtered list): see edge.lists.
PORTAL_EXACT_COUNT_LIMIT = int(os.environ.get("PORTAL_EXACT_COUNT_LIMIT", "10000"))
if PORTAL_EXACT_COUNT_LIMIT < 100:  # a list's page: below it the admin shows every row on one page, uncounted
    raise ImproperlyConfigured("PORTAL_EXACT_COUNT_LIMIT must be at least 100, the rows of a list's page.")

# The key that seals every audit event the portal appends (audit/seal.py): kept off the database and
# its backups, on every machine that serves or runs the portal. Without it events are not sealed
# (`check --deploy` warns). The keys it replaced, oldest first, one per line of
# PORTAL_AUDIT_RETIRED_SEAL_KEYS_FILE: the events they sealed still verify (docs/operating.md).
def _key_file(variable: str, *, may_be_empty: bool = False) -> bytes | None:
    if not (path := os.environ.get(variable, "").strip()):
        return None
    try:
        content = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ImproperlyConfigured(f"Cannot read {variable} {path}: {exc.strerror}.") from None
    if not content and not may_be_empty:
        raise ImproperlyConfigured(f"{variable} {path} is empty.")
    return content


def _seal_key() -> bytes | None:
    if value := os.environ.get("PORTAL_AUDIT_SEAL_KEY", "").strip():
        return value.encode()
    return _key_file("PORTAL_AUDIT_SEAL_KEY_FILE")


PORTAL_AUDIT_SEAL_KEY = _seal_key()
PORTAL_AUDIT_RETIRED_SEAL_KEYS = tuple(
    line.strip() for line in (_key_file("PORTAL_AUDIT_RETIRED_SEAL_KEYS_FILE", may_be_empty=True) or b"").splitlines()
    if line.strip())
DEMO_SEAL_KEY = b"insecure-demo-seal-key-do-not-use-in-production"  # public: `check --deploy` warns of it
if PORTAL_AUDIT_SEAL_KEY is None and (DEBUG or DEMO):
    PORTAL_AUDIT_SEAL_KEY = DEMO_SEAL_KEY

# The deploy engine.
PORTAL_DEPLOY_DIR = Path(os.environ.get("PORTAL_DEPLOY_DIR", VAR_DIR / "deployments"))  # runner private dirs
PORTAL_DEPLOY_ROOT = Path(os.environ.get("PORTAL_DEPLOY_ROOT", VAR_DIR / "deploy"))  # where the demo installs
PORTAL_DEPLOY_TIMEOUT = int(os.environ.get("PORTAL_DEPLOY_TIMEOUT", "3600"))  # seconds, one playbook run
PORTAL_DEPLOY_STALE_SECONDS = int(os.environ.get("PORTAL_DEPLOY_STALE_SECONDS", "120"))  # heartbeat age
# ... and of one whose worker process on this host is gone
PORTAL_DEPLOY_GONE_SECONDS = int(os.environ.get("PORTAL_DEPLOY_GONE_SECONDS", "30"))

# Notifications: attempts and the pause before each retry (seconds).
PORTAL_NOTIFY_BACKOFF = [float(x) for x in os.environ.get("PORTAL_NOTIFY_BACKOFF", "2,10,60").split(",")]
PORTAL_NOTIFY_TIMEOUT = float(os.environ.get("PORTAL_NOTIFY_TIMEOUT", "10"))

# django-q2. A deploy must never run twice: one attempt, failures acknowledged, and the retry
# interval longer than the task timeout plus its wait in the cluster. The ORM broker (default, on
# the portal's own database) delivers at least once; the Redis broker can lose a task whose worker
# dies. Either way the deploy task claims its deployment atomically and never re-runs one.
_q_timeout = PORTAL_DEPLOY_TIMEOUT + 300
Q_CLUSTER = {
    "name": os.environ.get("PORTAL_QUEUE_NAME", "portal"),
    "workers": int(os.environ.get("PORTAL_WORKERS", "2")),
    "timeout": _q_timeout,
    "retry": _q_timeout + 900,
    "max_attempts": 1,
    "ack_failures": True,
    "catch_up": False,
    "save_limit": 1000,
    "poll": 0.5,
}
# The broker classes refuse (and audit) any task that is not one of the portal's own.
if os.environ.get("PORTAL_QUEUE_BROKER", "orm") == "redis":
    Q_CLUSTER["redis"] = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    Q_CLUSTER["broker_class"] = "environments.broker.PortalRedisBroker"
else:
    Q_CLUSTER["orm"] = "default"
    Q_CLUSTER["broker_class"] = "environments.broker.PortalOrmBroker"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"line": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s",
                            "datefmt": "%Y-%m-%dT%H:%M:%S%z"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "line"}},
    "root": {"handlers": ["console"], "level": os.environ.get("PORTAL_LOG_LEVEL", "INFO")},
}
