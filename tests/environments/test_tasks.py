"""The worker runs only the portal's own tasks. Attacks through the task queue, run through
django-q2's own code in this process: the scheduler makes tasks of due schedules, the pusher takes
them off the broker, a worker runs them, the monitor saves the results."""

import datetime as dt
import importlib
import os
import subprocess
import sys
from multiprocessing import Event, Value
from pathlib import Path

import pytest
from django.apps import apps as django_apps
from django.urls import reverse
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.models import OrmQ, Schedule, Task
from django_q.monitor import monitor
from django_q.pusher import pusher
from django_q.queues import Queue
from django_q.scheduler import scheduler
from django_q.tasks import async_task
from django_q.worker import worker

from audit import chain
from audit.models import AuditEvent
from environments import broker

LEGIT = "environments.tasks.expire_pending_approvals"
ROOT = Path(__file__).resolve().parents[2]


def run_cluster_once(broker) -> None:
    """One pass of the cluster over everything queued."""
    task_queue, result_queue, stop = Queue(), Queue(), Event()
    stop.set()  # the pusher takes one batch per call
    while broker.queue_size():
        pusher(task_queue, stop, broker=broker)
    task_queue.put("STOP")
    worker(task_queue, result_queue, Value("f", -1))
    result_queue.put("STOP")
    monitor(result_queue, broker=broker)


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim"
    path.write_text("keep me")
    return path


def refused_funcs() -> list[str]:
    return sorted(e.data["func"] for e in AuditEvent.objects.filter(action="task.refused"))


def test_the_broker_is_the_portals(db):
    assert isinstance(get_broker(), broker.PortalTasksOnly)


def test_the_portals_schedules_are_on_its_list(db):
    """The schedules migration 0003 creates run; a list that forgot one would refuse it every time.
    (Created again here: a transactional test before this one may have emptied the table.)"""
    importlib.import_module("environments.migrations.0003_schedules").create_schedules(django_apps, None)
    funcs = set(Schedule.objects.values_list("func", flat=True))
    assert funcs == {"environments.tasks.reap_stale_deployments", "environments.tasks.expire_pending_approvals"}
    assert funcs <= broker.PORTAL_TASKS


def test_scheduled_calls_of_any_function_are_refused_audited_and_never_run(transactional_audit_db, tmp_path,
                                                                             victim):
    marker = tmp_path / "pwned"
    due = timezone.now() - dt.timedelta(minutes=1)
    Schedule.objects.all().delete()
    for name, func, args in [
        ("cleanup", "os.remove", repr(str(victim))),
        ("grant myself", "builtins.exec", repr(f"open({str(marker)!r}, 'w').write('pwned')")),
        ("expiry", LEGIT, None),
    ]:
        Schedule.objects.create(name=name, func=func, args=args, schedule_type=Schedule.ONCE, next_run=due)
    broker = get_broker()
    scheduler(broker=broker)
    run_cluster_once(broker)

    assert victim.exists() and not marker.exists()
    assert refused_funcs() == ["builtins.exec", "os.remove"]
    event = AuditEvent.objects.filter(action="task.refused", data__func="os.remove").get()
    assert (event.code, event.actor_username, event.via, event.data["group"]) == (
        "NOT_A_PORTAL_TASK", "system", "task", "cleanup")
    assert event.data["detail"] == "The worker runs only the portal's own tasks; os.remove is not one of them."
    assert list(Task.objects.values_list("func", "success")) == [(LEGIT, True)]  # the portal's own still runs
    assert not OrmQ.objects.exists()  # refused tasks leave the queue
    assert chain.verify().ok


def test_queued_callables_and_hooks_are_refused(transactional_audit_db, victim):
    """What a resubmit or a shell can put in the queue: a dotted path, a pickled function, a hook."""
    async_task("builtins.exec", "import os")
    async_task(os.remove, str(victim))
    async_task(LEGIT, hook="os.remove")
    async_task(LEGIT)
    run_cluster_once(get_broker())

    assert victim.exists()
    assert refused_funcs() == ["builtins.exec", LEGIT, "posix.remove"]
    hooked = AuditEvent.objects.get(action="task.refused", data__func=LEGIT)
    assert hooked.data["hook"] == "os.remove" and "with the result hook os.remove" in hooked.data["detail"]
    assert list(Task.objects.values_list("func", "success")) == [(LEGIT, True)]


def test_task_queue_admin_pages_are_gone(client, make_user):
    client.force_login(make_user("root", superuser=True))
    for name in ("schedule_add", "schedule_changelist", "failure_changelist", "success_changelist",
                 "ormq_changelist"):
        url = reverse("admin:index") + "django_q/" + name.split("_")[0] + "/"
        if name.endswith("_add"):
            url += "add/"
        assert client.get(url).status_code == 404, url
    assert b"django_q" not in client.get(reverse("admin:index")).content


def test_a_worker_loads_the_deploy_engine_as_it_starts_and_the_web_server_never():
    """The first deployment a worker process runs does not wait for Ansible to load; a process that only
    sets up Django (the web server) does not load it at all."""
    code = (
        "import sys, django\n"
        "django.setup()\n"
        "import portal.urls\n"
        "assert 'ansible_runner' not in sys.modules, 'a web process loads Ansible'\n"
        "from multiprocessing import Value\n"
        "from django_q.queues import Queue\n"
        "from django_q.worker import worker\n"
        "tasks = Queue()\n"
        "tasks.put('STOP')\n"
        "worker(tasks, Queue(), Value('f', -1))\n"
        "assert {'environments.tasks', 'ansible_runner'} <= set(sys.modules), 'the worker did not load the engine'\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "portal.settings", "SECRET_KEY": "test-only"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
