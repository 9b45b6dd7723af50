"""ApiToken moves from the portal app (which now only assembles) to access: the table stays as it is
(portal_apitoken); only Django's idea of which app owns it changes."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies = [
        ("portal", "0001_initial"),
        ("releases", "0001_initial"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="ApiToken",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False,
                                                   verbose_name="ID")),
                        ("kind", models.CharField(choices=[("ci", "CI"), ("personal", "Personal")], max_length=10)),
                        ("name", models.CharField(max_length=100)),
                        ("key_prefix", models.CharField(help_text="First characters of the token, to recognise it.",
                                                        max_length=12)),
                        ("key_hash", models.CharField(max_length=64, unique=True)),
                        ("created_by_label", models.CharField(max_length=200)),
                        ("created_at", models.DateTimeField(auto_now_add=True)),
                        ("revoked_at", models.DateTimeField(blank=True, null=True)),
                        ("applications", models.ManyToManyField(blank=True, related_name="ci_tokens",
                                                                to="releases.application")),
                        ("user", models.ForeignKey(blank=True, help_text="The person a personal token acts as.",
                                                   null=True, on_delete=django.db.models.deletion.PROTECT,
                                                   related_name="api_tokens", to=settings.AUTH_USER_MODEL)),
                    ],
                    options={
                        "verbose_name": "API token",
                        "db_table": "portal_apitoken",
                        "constraints": [
                            models.CheckConstraint(condition=models.Q(("kind", "ci"), ("user__isnull", False),
                                                                      _connector="OR"),
                                                   name="apitoken_personal_has_user"),
                            models.CheckConstraint(condition=models.Q(("kind__in", ["ci", "personal"])),
                                                   name="apitoken_kind_valid"),
                        ],
                    },
                ),
            ],
            database_operations=[],
        ),
    ]
