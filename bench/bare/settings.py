"""A bare Django app, served like the portal, that the API benchmark compares against: no apps,
no middleware, the same database and the same persistent connections (DATABASE_CONN_MAX_AGE)."""

import os

import dj_database_url

SECRET_KEY = os.environ.get("SECRET_KEY", "benchmark-only")
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "bench.bare.urls"
USE_TZ = True
DATABASES = {
    "default": dj_database_url.parse(os.environ["DATABASE_URL"],
                                     conn_max_age=int(os.environ.get("DATABASE_CONN_MAX_AGE", "0")))
}
