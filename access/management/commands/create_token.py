from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from access.models import ApiToken
from access.services import token_create
from audit.actors import Actor
from releases.models import Application


class Command(BaseCommand):
    help = (
        "Create an API token and print it as the last line (it is shown only once). "
        "--user NAME for a personal token, or --ci --application APP --name NAME for a CI token."
    )

    def add_arguments(self, parser):
        parser.add_argument("--user", help="Personal token acting as this user.")
        parser.add_argument("--ci", action="store_true", help="CI token, scoped to --application.")
        parser.add_argument("--application", action="append", default=[], help="Application(s) of a CI token.")
        parser.add_argument("--name", help="What the token is for (default: the user name or 'ci').")

    def handle(self, *args, **options):
        actor = Actor.system(via="command")
        if options["ci"] == bool(options["user"]):
            raise CommandError("Give either --user NAME or --ci --application APP --name NAME.")
        if options["ci"]:
            if not options["application"]:
                raise CommandError("A CI token needs --application APP.")
            apps = list(Application.objects.filter(name__in=options["application"]))
            missing = set(options["application"]) - {a.name for a in apps}
            if missing:
                raise CommandError(f"Unknown application(s): {', '.join(sorted(missing))}.")
            token, raw = token_create(actor=actor, kind=ApiToken.Kind.CI, name=options["name"] or "ci",
                                      applications=apps)
            self.stdout.write(f"CI token {token.name!r} for {', '.join(a.name for a in apps)}:")
        else:
            user = get_user_model().objects.filter(username=options["user"]).first()
            if user is None:
                raise CommandError(f"No user named {options['user']!r}.")
            token, raw = token_create(actor=actor, kind=ApiToken.Kind.PERSONAL, name=options["name"] or user.username,
                                      user=user)
            self.stdout.write(f"Personal token {token.name!r} acting as {user.username}:")
        self.stdout.write(raw)
