"""The two bare views: insert one row with one statement (from a JSON body), and a small JSON answer."""

import json

from django.db import connection
from django.http import JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

TABLE = "bench_bare_row"
CREATE_TABLE = (f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigserial PRIMARY KEY, number text NOT NULL,"
                " body jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now())")


@csrf_exempt
def insert(request):
    body = json.loads(request.body)
    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO {TABLE} (number, body) VALUES (%s, %s) RETURNING id",
                       [body["number"], json.dumps(body)])
        row_id = cursor.fetchone()[0]
    return JsonResponse({"id": row_id, "number": body["number"]}, status=201)


def small_json(request):
    return JsonResponse({"application": "MAC", "environments": [{"name": "QA", "current_version": "1.0.1"}]})


urlpatterns = [
    path("insert", insert),
    path("json", small_json),
]
