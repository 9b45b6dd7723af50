"""Notifications reach a real HTTP server on loopback, in each receiver's API shape; a failing
receiver is retried with backoff and never affects the deployment."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django_q.brokers import get_broker
from django_q.signing import SignedPackage

from environments import notifications, services, tasks
from environments.models import Deployment, NotificationChannel, NotificationDelivery

Kind = NotificationChannel.Kind


class Receiver:
    """Records every POST; answers 500 to the first `fail_first[path]` requests on a path."""

    def __init__(self, fail_first=None):
        self.requests, self.fail_first, self.seen = [], dict(fail_first or {}), {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.requests.append((self.path, dict(self.headers), body))
                prefix = "/" + self.path.split("/")[1]
                receiver.seen[prefix] = receiver.seen.get(prefix, 0) + 1
                status = 500 if receiver.seen[prefix] <= receiver.fail_first.get(prefix, 0) else 201
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver(fail_first={"/chat": 2})
    yield r
    r.close()


@pytest.fixture
def channels(world, receiver, settings):
    settings.PORTAL_NOTIFY_BACKOFF = [0.05, 0.1]
    make = NotificationChannel.objects.create
    return {
        "jira": make(application=world.app, kind=Kind.ISSUE_TRACKER, url=f"{receiver.url}/jira/",
                     credential="portal-bot:jira-secret"),
        "chat": make(application=world.app, kind=Kind.CHAT, url=f"{receiver.url}/chat/hook"),
        "grafana": make(application=world.app, kind=Kind.MONITORING, url=f"{receiver.url}/grafana",
                        credential="glsa_grafana-secret"),
    }


def deployed(world):
    release = world.release(issue_keys=["BIZPLAT-11", "BIZPLAT-12"])
    return world.deploy(release, world.qa)


def test_each_receiver_gets_its_own_shape(world, channels, receiver):
    deployment = deployed(world)
    for channel in channels.values():
        assert tasks.send_notification(channel.pk, deployment.pk) is True

    jira = [r for r in receiver.requests if r[0].startswith("/jira")]
    assert [p for p, _, _ in jira] == ["/jira/rest/api/2/issue/BIZPLAT-11/comment",
                                       "/jira/rest/api/2/issue/BIZPLAT-12/comment"]
    assert f"was deployed to QA (deployment #{deployment.pk}" in jira[0][2]["body"]
    assert jira[0][1]["Authorization"] == "Basic " + base64.b64encode(b"portal-bot:jira-secret").decode()
    chat = [r for r in receiver.requests if r[0] == "/chat/hook"]
    assert chat[-1][2] == {"text": notifications.summary(deployment)}
    (path, headers, body), = [r for r in receiver.requests if r[0].startswith("/grafana")]
    assert path == "/grafana/api/annotations" and headers["Authorization"] == "Bearer glsa_grafana-secret"
    assert body["tags"] == ["application:MAC", "environment:QA", f"version:{deployment.release.version}"]
    assert isinstance(body["time"], int)


def test_failing_receiver_is_retried_and_every_attempt_recorded(world, channels, receiver):
    deployment = deployed(world)
    assert tasks.send_notification(channels["chat"].pk, deployment.pk) is True
    attempts = list(NotificationDelivery.objects.filter(channel=channels["chat"]).values_list(
        "attempt", "status_code", "delivered"))
    assert attempts == [(1, 500, False), (2, 500, False), (3, 201, True)]
    deployment.refresh_from_db()
    assert deployment.state == Deployment.State.SUCCEEDED


def test_unreachable_receiver_never_raises(world, channels, receiver, settings):
    deployment = deployed(world)
    dead = NotificationChannel.objects.create(application=world.app, kind=Kind.CHAT, url="http://127.0.0.1:9/x")
    assert tasks.send_notification(dead.pk, deployment.pk) is False
    errors = list(NotificationDelivery.objects.filter(channel=dead).values_list("error", flat=True))
    assert len(errors) == 3 and all("ConnectionError" in e for e in errors)


def test_finishing_a_deployment_queues_one_task_per_channel_without_credentials(
    world, channels, django_capture_on_commit_callbacks
):
    release = world.release()
    deployment = services.deployment_request(actor=world.ci, release=release, environment=world.qa)
    services.deployment_start(deployment_id=deployment.pk)
    broker = get_broker()  # the configured one: ORM, or Redis with PORTAL_QUEUE_BROKER=redis
    broker.purge_queue()
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_record_result(deployment_id=deployment.pk, state="succeeded")
    queued = []
    while batch := broker.dequeue():
        queued += [SignedPackage.loads(package) for _, package in batch]
    assert sorted(t["args"] for t in queued) == sorted((c.pk, deployment.pk) for c in channels.values())
    assert {t["func"] for t in queued} == {"environments.tasks.send_notification"}
    assert "secret" not in repr(queued)


def test_issue_tracker_and_monitoring_only_announce_success(world, channels, receiver):
    release = world.release()
    failed = world.deploy(release, world.qa, result=Deployment.State.FAILED)
    for channel in channels.values():
        tasks.send_notification(channel.pk, failed.pk)
    assert [p for p, _, _ in receiver.requests if not p.startswith("/chat")] == []
    assert "failed to deploy to QA" in receiver.requests[-1][2]["text"]


def test_a_superseded_deployment_is_announced_once_per_enabled_channel(
    world, channels, django_capture_on_commit_callbacks
):
    """Latest wins for automatic deployments: the one superseded while waiting is announced to each
    enabled channel of its application (a disabled one hears nothing), in the transaction that
    supersedes it."""
    NotificationChannel.objects.create(application=world.app, kind=Kind.CHAT, url="http://127.0.0.1:9/off",
                                       enabled=False)
    running, waiting, newest = (world.release() for _ in range(3))
    services.deployment_request(actor=world.ci, release=running, environment=world.qa)  # starts: QA was free
    superseded = services.deployment_request(actor=world.ci, release=waiting, environment=world.qa)
    assert superseded.state == Deployment.State.QUEUED
    broker = get_broker()
    broker.purge_queue()
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_request(actor=world.ci, release=newest, environment=world.qa)
    queued = []
    while batch := broker.dequeue():
        queued += [SignedPackage.loads(package) for _, package in batch]
    notified = sorted(t["args"] for t in queued if t["func"] == "environments.tasks.send_notification")
    assert notified == sorted((c.pk, superseded.pk) for c in channels.values())
    superseded.refresh_from_db()
    assert superseded.state == Deployment.State.SUPERSEDED
