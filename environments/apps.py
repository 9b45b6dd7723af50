from importlib import import_module

from django.apps import AppConfig

TASKS_MODULE = "environments.tasks"  # what the deploy worker runs; it loads Ansible and ansible-runner


def load_tasks(sender, **kwargs) -> None:
    """django-q2's post_spawn: a worker process loads the tasks (Ansible and ansible-runner, about half a
    second) as it starts, not when its first deployment arrives, whose playbook would start that much later
    (docs/benchmarks.md, "Dispatch latency"). Loaded by name and only here: the web server never needs them."""
    import_module(TASKS_MODULE)


class EnvironmentsConfig(AppConfig):
    name = "environments"

    def ready(self):
        from django_q.signals import post_spawn

        from core import events
        from environments import services

        # A new release goes on to the auto-deploy environments that start its promotion path.
        events.subscribe(events.RELEASE_REGISTERING, services.release_registering)
        post_spawn.connect(load_tasks, dispatch_uid="environments.load_tasks")
