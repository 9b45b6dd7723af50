"""Who did something: a person, a CI token, or the portal itself.

Every service takes an explicit `actor`; nothing reads the user from thread-local state.
"""

from __future__ import annotations

import os
import pwd
import socket
from dataclasses import dataclass, field
from pathlib import Path

from django.contrib.auth.models import AbstractBaseUser


@dataclass(frozen=True)
class Actor:
    user: AbstractBaseUser | None = None
    via: str = "system"  # admin | api | command | task | system
    token_id: int | None = None
    token_name: str = ""
    token_kind: str = ""  # "ci" | "personal" | ""
    token_applications: frozenset[int] = field(default_factory=frozenset)
    remote_addr: str = ""
    os_account: str = ""  # a command's: the operating system account and host that ran it

    @classmethod
    def system(cls, via: str = "system") -> Actor:
        return cls(via=via)

    @classmethod
    def command(cls) -> Actor:
        """A management command run from a shell: the portal acts, and the chain records whose shell it was."""
        return cls(via="command", os_account=f"{_os_user()} on {socket.gethostname()}")

    @classmethod
    def person(cls, user, via: str) -> Actor:
        return cls(user=user, via=via)

    @property
    def is_ci(self) -> bool:
        return self.token_kind == "ci"

    @property
    def is_person(self) -> bool:
        return self.user is not None and not self.is_ci

    @property
    def is_system(self) -> bool:
        return self.user is None and not self.is_ci

    @property
    def label(self) -> str:
        if self.is_ci:
            return f"ci:{self.token_name}"
        if self.user is not None:
            return self.user.get_username()
        return "system"


def _os_user() -> str:
    """The account of the process's real user id (not $USER, which anyone sets), and the account that
    logged in to reach it, where the kernel keeps one (/proc/self/loginuid: set at login, kept through sudo
    and su, and not changed by the process; SUDO_USER is a variable anyone sets)."""
    uid = os.getuid()
    name = _account(uid)
    try:
        login = int(Path("/proc/self/loginuid").read_text().strip())
    except (OSError, ValueError):
        login = NO_LOGIN
    return f"{name} (logged in as {_account(login)})" if login not in (NO_LOGIN, uid) else name


NO_LOGIN = 4294967295  # (uid_t)-1: no login recorded (a service, a container)


def _account(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # no name for this uid (a container without a passwd entry)
        return f"uid {uid}"
