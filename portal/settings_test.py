"""Settings for the test suite: the production settings with a test-only key and sync queue."""

import os

os.environ.setdefault("SECRET_KEY", "test-only-secret-key")

from portal.settings import *  # noqa: E402,F403
from portal.settings import Q_CLUSTER  # noqa: E402

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
Q_CLUSTER = {**Q_CLUSTER, "sync": True}
