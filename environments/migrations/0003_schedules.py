from django.db import migrations


def create_schedules(apps, schema_editor):
    Schedule = apps.get_model("django_q", "Schedule")
    for name, func, minutes in [
        ("reap stale deployments", "environments.tasks.reap_stale_deployments", 1),
        ("expire pending approvals", "environments.tasks.expire_pending_approvals", 5),
    ]:
        Schedule.objects.update_or_create(
            name=name, defaults={"func": func, "schedule_type": "I", "minutes": minutes, "repeats": -1}
        )


def remove_schedules(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(
        name__in=["reap stale deployments", "expire pending approvals"]
    ).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("environments", "0002_deploy_engine"),
        ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more"),
    ]

    operations = [migrations.RunPython(create_schedules, remove_schedules)]
