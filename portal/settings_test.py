"""Settings for the test suite: the production settings with a test-only key and sync queue."""

import os

os.environ.setdefault("SECRET_KEY", "test-only-secret-key")
# Every event the suite writes is sealed, as in production (the processes tests start inherit it).
os.environ.setdefault("PORTAL_AUDIT_SEAL_KEY", "test-only-audit-seal-key")
# The test client and the servers tests start speak plain http on loopback.
os.environ.setdefault("PORTAL_SSL_REDIRECT", "0")
# Each test session has a queue of its own (a Redis list outlives the test database).
os.environ.setdefault("PORTAL_QUEUE_NAME", f"portal-test-{os.getpid()}")

from portal.settings import *  # noqa: E402,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
# Tests that run a worker use a file database the worker process can open too.
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":  # noqa: F405
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test-portal.sqlite3")}  # noqa: F405
