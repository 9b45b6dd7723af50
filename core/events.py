"""One small dispatcher between layers that must not import each other.

A lower service publishes what happens ("release.registering"); the app that acts on it subscribes
once, when Django starts (its AppConfig.ready). Subscribers run synchronously, in the publisher's
transaction, in the order they subscribed: a release's automatic deployments are requested in the
same transaction that registers it. Only explicit, named events; no model signals.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

# Published in the registration's transaction before its audit event: a subscriber locks what it will
# change once the release is registered (the chain's lock comes after every row lock) and returns what
# to do then, which the registration runs after its audit event.
RELEASE_REGISTERING = "release.registering"

_subscribers: dict[str, list[Callable]] = defaultdict(list)


def subscribe(event: str, handler: Callable) -> None:
    if handler not in _subscribers[event]:
        _subscribers[event].append(handler)


def publish(event: str, **payload) -> list[Callable[[], object]]:
    """Run the event's subscribers; returns what they asked to run once the publisher has written its audit
    event (in their order)."""
    then = [handler(**payload) for handler in _subscribers[event]]
    return [step for step in then if step is not None]
