"""One small dispatcher between layers that must not import each other.

A lower service publishes what happened ("release.registered"); the app that acts on it subscribes
once, when Django starts (its AppConfig.ready). Subscribers run synchronously, in the publisher's
transaction, in the order they subscribed: a release's automatic deployments are requested in the
same transaction that registers it. Only explicit, named events; no model signals.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

# Published in the registration's transaction before its audit event ("registering": a subscriber
# locks what it will change once the release is registered, since the chain's lock comes after every
# row lock) and after it ("registered": a subscriber acts).
RELEASE_REGISTERING = "release.registering"
RELEASE_REGISTERED = "release.registered"

_subscribers: dict[str, list[Callable]] = defaultdict(list)


def subscribe(event: str, handler: Callable) -> None:
    if handler not in _subscribers[event]:
        _subscribers[event].append(handler)


def publish(event: str, **payload) -> None:
    for handler in _subscribers[event]:
        handler(**payload)
