"""Who did something: a person, a CI token, or the portal itself.

Every service takes an explicit `actor`; nothing reads the user from thread-local state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    @classmethod
    def system(cls, via: str = "system") -> Actor:
        return cls(via=via)

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
