import getpass
import sys

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from access.services import user_save
from audit.actors import Actor


class Command(BaseCommand):
    help = (
        "Create an administrator (a superuser) through the portal, on the audit chain: the first account of a "
        "new installation. The password is asked for twice on a terminal, or read as one line from standard "
        "input. (Django's createsuperuser writes no audit event: the exceptions report lists its account as "
        "made outside the portal.)"
    )

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--email", default="")

    def handle(self, *args, username: str, email: str, **options):
        users = get_user_model()
        if users.objects.filter(**{users.USERNAME_FIELD: username}).exists():
            raise CommandError(f"There is an account {username} already: change it in the admin.")
        user = users(**{users.USERNAME_FIELD: username}, email=email, is_staff=True, is_superuser=True)
        password = self._password()
        if not password:
            raise CommandError("An empty password is not accepted; nothing was created.")
        try:
            validate_password(password, user)
        except ValidationError as exc:
            raise CommandError("The password is not accepted: " + " ".join(exc.messages)) from None
        user.set_password(password)
        user_save(actor=Actor.command(), user=user)
        self.stdout.write(f"Administrator {username} created.")

    @staticmethod
    def _password() -> str:
        if not sys.stdin.isatty():
            return sys.stdin.readline().rstrip("\r\n")
        password = getpass.getpass("Password: ")
        if getpass.getpass("Password (again): ") != password:
            raise CommandError("The two passwords differ; nothing was created.")
        return password
