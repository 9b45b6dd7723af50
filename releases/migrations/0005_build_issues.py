import django.db.models.deletion
from django.db import migrations, models

from audit.triggers import migration_operation
from releases.models import issue_keys_in


def backfill(apps, schema_editor):
    """The builds registered before: their branches' issue keys."""
    Build = apps.get_model("releases", "Build")
    BuildIssue = apps.get_model("releases", "BuildIssue")
    batch = []
    builds = Build.objects.select_related("application").only("id", "branch", "application__issue_key_prefix")
    for build in builds.iterator(chunk_size=2000):
        batch += [BuildIssue(build_id=build.id, key=k)
                  for k in issue_keys_in(build.application.issue_key_prefix, build.branch)]
        if len(batch) >= 2000:
            BuildIssue.objects.bulk_create(batch)
            batch = []
    BuildIssue.objects.bulk_create(batch)


class Migration(migrations.Migration):
    """Builds carry the issue keys named in their branches; the rows are append-only evidence."""

    dependencies = [
        ('releases', '0004_release_evidence_append_only'),
    ]

    operations = [
        migrations.CreateModel(
            name='BuildIssue',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('key', models.CharField(db_index=True, max_length=64)),
                ('build', models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='issues', to='releases.build')),
            ],
            options={
                'constraints': [models.UniqueConstraint(fields=('build', 'key'), name='buildissue_unique_key')],
            },
        ),
        migrations.RunPython(backfill, migrations.RunPython.noop),
        migration_operation("releases_buildissue"),
    ]
