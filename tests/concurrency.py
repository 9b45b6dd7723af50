"""Helpers for tests of writers at once on PostgreSQL (threads, each with its own connection)."""

import threading
import time

from django.db import connection, connections, transaction

from core.decisions import PolicyRefusal

THREADS = 20


def waiting_on_a_lock(count: int, seconds: float = 30) -> None:
    """Until `count` other sessions of this database wait for a lock."""
    deadline = time.monotonic() + seconds
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND wait_event_type = 'Lock'")
            if cursor.fetchone()[0] >= count:
                return
            time.sleep(0.02)
    raise AssertionError(f"{count} session(s) never waited for a lock")


def held_open_while_another_waits(first, second, then=None) -> tuple:
    """first() in a transaction held open once it returned; then second() in another thread, as a
    request runs it (its services' own transactions); once that one waits for a lock, the first's
    transaction runs then() (if given) and commits. Both outcomes: a value, or the exception raised."""
    done, release = threading.Event(), threading.Event()
    outcomes: dict = {}

    def run(name, work, hold):
        try:
            if not hold:
                outcomes[name] = work()  # as a request runs it: its services' own transactions
                return
            with transaction.atomic():
                outcomes[name] = work()
                done.set()
                release.wait(30)
                if then is not None:
                    then()
        except Exception as exc:  # noqa: BLE001 - the outcome the test looks at
            outcomes[name] = exc
        finally:
            done.set()
            connections.close_all()

    threads = [threading.Thread(target=run, args=("first", first, True)),
               threading.Thread(target=run, args=("second", second, False))]
    threads[0].start()
    assert done.wait(30)
    threads[1].start()
    try:
        waiting_on_a_lock(1)
    finally:
        release.set()
        for t in threads:
            t.join(60)
    return outcomes["first"], outcomes["second"]


def run_at_once(work, count=THREADS):
    """Run work(i) in `count` threads released together; returns each outcome (code or 'ok')."""
    barrier = threading.Barrier(count)
    outcomes: list = [None] * count

    def worker(i):
        try:
            barrier.wait()
            outcomes[i] = work(i)
        except PolicyRefusal as exc:
            outcomes[i] = exc.refusal.code
        except Exception as exc:  # anything else is a lost request
            outcomes[i] = f"ERROR {type(exc).__name__}: {exc}"
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return outcomes
