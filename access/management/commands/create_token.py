import os
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from access.models import ApiToken
from access.services import token_actor, token_create
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
        parser.add_argument(
            "--reuse-file", metavar="FILE",
            help="Keep the output in FILE (readable by its owner only) and print it again instead of creating a "
                 "new token while the token in it is still valid for the same user or name and applications.",
        )

    def handle(self, *args, **options):
        if options["ci"] == bool(options["user"]):
            raise CommandError("Give either --user NAME or --ci --application APP --name NAME.")
        reuse = Path(options["reuse_file"]) if options["reuse_file"] else None
        if reuse is not None and reuse.exists() and self._still_valid(reuse.read_text(), options):
            self.stdout.write(reuse.read_text(), ending="")
            return
        lines = self._create(options)
        if reuse is not None:
            reuse.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(reuse, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write("".join(f"{line}\n" for line in lines))
        for line in lines:
            self.stdout.write(line)

    @staticmethod
    def _still_valid(text: str, options) -> bool:
        lines = text.strip().splitlines()
        actor = token_actor(lines[-1].strip()) if lines else None
        if actor is None:
            return False
        if options["ci"]:
            wanted = set(Application.objects.filter(name__in=options["application"]).values_list("pk", flat=True))
            return (actor.is_ci and actor.token_name == (options["name"] or "ci")
                    and set(actor.token_applications) == wanted and len(wanted) == len(set(options["application"])))
        return (not actor.is_ci and actor.user.get_username() == options["user"]
                and actor.token_name == (options["name"] or options["user"]))

    def _create(self, options) -> list[str]:
        actor = Actor.command()
        if options["ci"]:
            if not options["application"]:
                raise CommandError("A CI token needs --application APP.")
            apps = list(Application.objects.filter(name__in=options["application"]))
            missing = set(options["application"]) - {a.name for a in apps}
            if missing:
                raise CommandError(f"Unknown application(s): {', '.join(sorted(missing))}.")
            token, raw = token_create(actor=actor, kind=ApiToken.Kind.CI, name=options["name"] or "ci",
                                      applications=apps)
            return [f"CI token {token.name!r} for {', '.join(a.name for a in apps)}:", raw]
        user = get_user_model().objects.filter(username=options["user"]).first()
        if user is None:
            raise CommandError(f"No user named {options['user']!r}.")
        token, raw = token_create(actor=actor, kind=ApiToken.Kind.PERSONAL, name=options["name"] or user.username,
                                  user=user)
        return [f"Personal token {token.name!r} acting as {user.username}:", raw]
