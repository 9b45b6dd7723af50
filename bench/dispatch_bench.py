"""Dispatch latency: how long the portal takes to start a deployment's playbook.

Two figures, each with the real deploy engine (`manage.py qcluster`, as `make run` starts it, with the
settings' own broker and worker count), the real ansible-runner and a trivial playbook from a local Git
repository (the way an environment takes its deploy scripts):
  approval  from the last approval's service call returning (committed, the task handed to the broker)
            to the ansible-playbook process starting;
  next      from one deployment's end (its finished_at, written in the transaction that records the end
            and starts the next one, a few milliseconds before it commits) to the next queued deployment
            of the same environment starting its ansible-playbook process.
And, measured in the same child process just before: ansible-runner alone, from run() being called to
ansible-playbook starting, for the same playbook and arguments (the floor no portal can go under).

"The ansible-playbook process starting" is the kernel's own record: the start time of the process
(/proc/PID/stat, field 22: when it was forked, in clock ticks of 10 ms since boot), read while it runs,
with PID taken from the deployment's progress (the first runner event names it) and checked to be an
ansible-playbook process. The playbook holds half a second after its first task so it is still there.

Each broker runs in a child process of its own (django-q2 reads its settings once):
    python bench/dispatch_bench.py --broker orm --samples 10    # prints one JSON object
run.py's `dispatch` section starts them (bench database as it is: seeded or not, only migrated).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

APPLICATION, ISSUE_PREFIX, ENVIRONMENT = "Bench dispatch", "DISP", "Production"
QUEUE_NAME = "bench-dispatch"
PLAYBOOK_NAME = "dispatch.yml"
PLAYBOOK = """\
# The dispatch benchmark's playbook: one quick task, then a short hold so the benchmark can read the
# process's start time while it still runs.
- hosts: all
  gather_facts: false
  tasks:
    - name: Say which version
      ansible.builtin.debug:
        msg: "{{ application }} {{ version }}"
    - name: Hold half a second
      ansible.builtin.debug:
        msg: "{{ lookup('ansible.builtin.pipe', 'sleep 0.5') }}"
"""
TICK = os.sysconf("SC_CLK_TCK")
POLL = 0.02  # how often the benchmark looks for the playbook's process, in seconds


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# --- the parent side (run.py) ----------------------------------------------------------------------

def redis_url() -> str:
    return os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_answers() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(redis_url(), socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


def prepare_database(database_url: str, server_url: str, name: str) -> None:
    """The bench database exists and is migrated (created empty when missing: this section needs no seed)."""
    import psycopg
    from django.core.management import call_command

    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    call_command("migrate", verbosity=0)


def make_playbook_repo(work: Path) -> Path:
    repo = work / "playbooks-repo"
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)

    def git(*args):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True)

    git("init", "--quiet", "--initial-branch=main")
    git("config", "user.email", "bench@example.com")
    git("config", "user.name", "bench")
    (repo / PLAYBOOK_NAME).write_text(PLAYBOOK)
    git("add", ".")
    git("commit", "--quiet", "-m", "The dispatch benchmark's playbook")
    return repo


def measure(database_url: str, work: Path, samples: int, brokers: tuple[str, ...], log=log) -> list[dict]:
    """One child process per broker; returns what each printed (or why it was not measured)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    repo = make_playbook_repo(work)
    results = []
    for broker in brokers:
        if broker == "redis" and not redis_answers():
            log(f"  redis: no server answers at {redis_url()}: skipped")
            results.append({"broker": broker, "skipped": f"no Redis server at {redis_url()}"})
            continue
        env = {**os.environ, "DATABASE_URL": database_url, "PORTAL_QUEUE_BROKER": broker,
               "PORTAL_QUEUE_NAME": QUEUE_NAME, "REDIS_URL": redis_url(), "PORTAL_LOG_LEVEL": "WARNING",
               "DJANGO_SETTINGS_MODULE": "portal.settings",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("PORTAL_WORKERS", None)  # the settings' worker count, as `make run` has it
        t0 = time.monotonic()
        child = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--broker", broker, "--samples", str(samples),
             "--work", str(work / broker), "--repo", str(repo)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
        )
        try:
            out, _ = child.communicate(timeout=900)
        finally:
            if child.poll() is None:  # SIGTERM: the child stops its worker on the way out
                child.terminate()
                child.wait(timeout=60)
        if child.returncode:
            raise RuntimeError(f"the {broker} dispatch benchmark failed (exit {child.returncode})")
        result = json.loads(out.strip().splitlines()[-1])
        log(f"  {broker}: measured in {time.monotonic() - t0:.0f} s")
        results.append(result)
    return results


# --- the child side: one broker ----------------------------------------------------------------------

def stats(values: list[float]) -> dict:
    """Median, 90th percentile (nearest rank) and max, in milliseconds."""
    if not values:
        return {"n": 0, "median": None, "p90": None, "max": None}
    ordered = sorted(values)
    return {"n": len(values), "median": statistics.median(ordered) * 1000,
            "p90": ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)] * 1000, "max": ordered[-1] * 1000}


def process_start(pid: int | None) -> float | None:
    """When process `pid` was created, as a wall-clock time (the middle of its 10 ms tick), or None
    if it is gone or is not ansible-playbook."""
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if b"ansible-playbook" not in cmdline:
        return None
    ticks = int(stat.rsplit(")", 1)[1].split()[19])
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - (ticks + 0.5) / TICK
    return time.time() - age


def bare_runner(work: Path, repo: Path, samples: int) -> list[float]:
    """ansible-runner alone: run() called -> ansible-playbook created. The same arguments as the engine's,
    in a private data directory prepared beforehand; each run is stopped once its process is seen."""
    import ansible_runner

    from environments import deploy

    private = work / "bare"
    shutil.copytree(repo, private / "project", ignore=shutil.ignore_patterns(".git"))
    inventory = private / "inventory" / "hosts"
    inventory.parent.mkdir(parents=True)
    inventory.write_text(deploy.local_inventory())
    values = []
    for _ in range(samples):
        shutil.rmtree(private / "artifacts", ignore_errors=True)
        found: dict[str, float] = {}
        done = threading.Event()
        watcher = threading.Thread(target=_first_playbook_child, args=(found, done))
        watcher.start()
        t0 = time.time()
        try:
            ansible_runner.run(
                private_data_dir=str(private), playbook=PLAYBOOK_NAME, inventory=str(inventory),
                extravars={"application": APPLICATION, "version": "0"}, ident="run", quiet=True,
                suppress_env_files=True,
                envvars={"ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "0",
                         "ANSIBLE_DEPRECATION_WARNINGS": "0",
                         "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")},
            )
        finally:
            done.set()
            watcher.join()
        if "start" in found:
            values.append(found["start"] - t0)
    return values


def _first_playbook_child(found: dict, done: threading.Event) -> None:
    """The runner's child: the first process this one forks that runs ansible-playbook; its start
    time goes into `found` and it is killed (only its start is measured)."""
    me = os.getpid()
    while not done.is_set():
        for thread in Path(f"/proc/{me}/task").iterdir():
            try:
                children = (thread / "children").read_text().split()
            except OSError:
                continue
            for pid in map(int, children):
                start = process_start(pid)
                if start is not None:
                    found["start"] = start
                    os.killpg(pid, signal.SIGKILL)
                    return
        time.sleep(0.001)


class World:
    """The benchmark's own application and restricted environment (one approval), its two releasers."""

    def __init__(self, repo: Path):
        from django.contrib.auth import get_user_model
        from django.contrib.auth.models import Group

        from audit.actors import Actor
        from environments import services
        from environments.models import Deployment, Environment
        from releases.models import Application

        self.system = Actor.system(via="bench")
        self.app, _ = Application.objects.get_or_create(name=APPLICATION, defaults={"issue_key_prefix": ISSUE_PREFIX})
        environment = Environment.objects.filter(application=self.app, name=ENVIRONMENT).first()
        creating = environment is None
        environment = environment or Environment(application=self.app, name=ENVIRONMENT, restricted=True,
                                                 required_approvals=1)
        environment.playbook_repo, environment.playbook_ref, environment.playbook = str(repo), "main", PLAYBOOK_NAME
        environment.inventory = ""
        self.environment = services.environment_save(actor=self.system, environment=environment)
        group, _ = Group.objects.get_or_create(name="bench-dispatch-releasers")
        if creating:
            for codename in ("deploy_environment", "approve_environment"):
                services.environment_grant(actor=self.system, environment=self.environment, codename=codename,
                                           group=group)
        users = []
        for name in ("bench-dispatch-requester", "bench-dispatch-approver"):
            user, _ = get_user_model().objects.get_or_create(
                username=name, defaults={"email": f"{name}@example.com", "is_staff": True})
            user.groups.add(group)
            users.append(user)
        self.requester, self.approver = (Actor.person(u, via="bench") for u in users)
        # whatever an interrupted run left open on this environment ends now
        for deployment in Deployment.objects.filter(environment=self.environment,
                                                    state__in=Deployment.OPEN_STATES).order_by("id"):
            if deployment.state == Deployment.State.RUNNING:
                services.deployment_record_result(deployment_id=deployment.pk, state=Deployment.State.INTERRUPTED,
                                                  actor=self.system, detail="Left by an interrupted benchmark.")
            else:
                services.deployment_cancel(actor=self.system, deployment_id=deployment.pk, comment="benchmark tidy")

    def requested(self):
        """A new release, and its deployment awaiting approval."""
        import hashlib

        from environments import services
        from releases.services import build_register, release_register

        number = f"{time.time_ns()}"
        build, _ = build_register(actor=self.system, application=APPLICATION, number=number, commit="d15" * 13 + "0",
                                  branch=f"feature/{ISSUE_PREFIX}-1-dispatch", status="successful")
        release, _ = release_register(
            actor=self.system, application=APPLICATION, version=f"1.{number}", build=build.number,
            artifact_url=f"file:///dev/null#{number}", artifact_sha256=hashlib.sha256(number.encode()).hexdigest(),
            issue_keys=[f"{ISSUE_PREFIX}-1"], implementers=["dev@example.com"],
        )
        deployment = services.deployment_request(actor=self.requester, release=release, environment=self.environment)
        assert deployment.state == "awaiting_approval", deployment.state
        return deployment

    def approve(self, deployment_id: int) -> float:
        """Approve (the last approval needed); returns the wall-clock time the service call returned."""
        from environments import services

        services.deployment_approve(actor=self.approver, deployment_id=deployment_id, comment="bench")
        return time.time()


def log_samples(what: str, latencies: list[float], to_claim: list[float]) -> None:
    log(f"  {os.environ.get('PORTAL_QUEUE_BROKER', 'orm')}, {what}, ms (to the claim):",
        ", ".join(f"{a * 1000:.0f} ({c * 1000:.0f})" for a, c in zip(latencies, to_claim, strict=True)))


def claimed_at(deployment_ids) -> dict[int, float]:
    from audit.models import AuditEvent

    rows = AuditEvent.objects.filter(action="deployment.claim", object_type="environments.deployment",
                                     object_id__in=[str(i) for i in deployment_ids]).values_list("object_id",
                                                                                                  "created_at")
    return {int(pk): at.timestamp() for pk, at in rows}


def watch(deployment_ids: list[int], timeout: float = 120.0) -> dict[int, float]:
    """Until every deployment ended: each one's ansible-playbook start time, read while it runs."""
    from environments.models import Deployment

    starts: dict[int, float] = {}
    open_ids = set(deployment_ids)
    deadline = time.monotonic() + timeout
    while open_ids:
        if time.monotonic() > deadline:
            raise RuntimeError(f"deployments {sorted(open_ids)} did not end in {timeout:.0f} s")
        for pk, state, progress in Deployment.objects.filter(pk__in=open_ids).values_list("pk", "state", "progress"):
            if state == Deployment.State.RUNNING and pk not in starts:
                start = process_start((progress or {}).get("pid"))
                if start is not None:
                    starts[pk] = start
            elif state not in Deployment.OPEN_STATES:
                if state != Deployment.State.SUCCEEDED:
                    raise RuntimeError(f"deployment {pk} ended {state}")
                open_ids.discard(pk)
        time.sleep(POLL)
    return starts


class Worker:
    """`manage.py qcluster`, in its own process group, with the settings' log level (INFO), stopped the
    way serve.py stops it."""

    def __init__(self, work: Path):
        self.log_path = work / "qcluster.log"
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen([sys.executable, "manage.py", "qcluster"], cwd=ROOT,
                                        env={**os.environ, "PORTAL_LOG_LEVEL": "INFO"}, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait_running(self, timeout: float = 60.0) -> None:
        """Until the cluster says it runs (its workers, pusher and monitor are up)."""
        deadline = time.monotonic() + timeout
        while b"] running." not in self.log_path.read_bytes():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"the worker did not start: see {self.log_path}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        self.log.close()


def after_approval(world: World, samples: int) -> dict:
    latencies, to_claim, claim_to_start, skipped = [], [], [], 0
    while len(latencies) < samples:
        deployment = world.requested()
        time.sleep(random.uniform(0, 0.5))  # not in step with the broker's poll
        approved = world.approve(deployment.pk)
        start = watch([deployment.pk]).get(deployment.pk)
        if start is None:  # the process ended before the benchmark saw it (a very loaded machine)
            skipped += 1
            if skipped > samples:
                raise RuntimeError("the playbook processes end before the benchmark sees them")
            continue
        claim = claimed_at([deployment.pk])[deployment.pk]
        latencies.append(start - approved)
        to_claim.append(claim - approved)
        claim_to_start.append(start - claim)
    log_samples("after approval", latencies, to_claim)
    return {"latency": stats(latencies), "to_claim": stats(to_claim), "claim_to_start": stats(claim_to_start),
            "skipped": skipped}


def after_previous(world: World, samples: int) -> dict:
    from environments.models import Deployment

    deployments = [world.requested() for _ in range(samples + 1)]
    for deployment in deployments:
        world.approve(deployment.pk)  # the first starts, the others wait their turn
    ids = [d.pk for d in deployments]
    starts = watch(ids, timeout=60.0 + 15 * len(ids))
    claims = claimed_at(ids)
    rows = list(Deployment.objects.filter(pk__in=ids).order_by("started_at")
                .values_list("pk", "queued_at", "finished_at"))
    latencies, to_claim, claim_to_start, skipped = [], [], [], 0
    for (_, _, finished), (pk, queued, _) in zip(rows, rows[1:], strict=False):
        if queued >= finished or pk not in starts:  # it did not wait for the one before (or was not seen)
            skipped += 1
            continue
        latencies.append(starts[pk] - finished.timestamp())
        to_claim.append(claims[pk] - finished.timestamp())
        claim_to_start.append(starts[pk] - claims[pk])
    log_samples("after the previous end", latencies, to_claim)
    return {"latency": stats(latencies), "to_claim": stats(to_claim), "claim_to_start": stats(claim_to_start),
            "skipped": skipped}


def child(broker: str, samples: int, work: Path, repo: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    os.environ["PORTAL_DEPLOY_DIR"] = str(work / "deployments")
    os.environ["PORTAL_DEPLOY_ROOT"] = str(work / "deploy")
    import django

    django.setup()
    from django.conf import settings
    from django.db import connection
    from django_q.brokers import get_broker

    phases, t = {}, time.monotonic()

    def phase(name: str) -> None:
        nonlocal t
        phases[name], t = time.monotonic() - t, time.monotonic()

    bare = bare_runner(work, repo, samples)
    world = World(repo)
    get_broker().purge_queue()  # tasks an interrupted run left behind
    poll = settings.Q_CLUSTER.get("poll") if broker == "orm" else None
    phase("baseline and set-up")
    worker = Worker(work)
    try:
        worker.wait_running()
        phase("worker start")
        warm = world.requested()
        approved = world.approve(warm.pk)
        first = watch([warm.pk], timeout=180).get(warm.pk)
        phase("first deployment")
        approval = after_approval(world, samples)
        phase("after approval")
        previous = after_previous(world, samples)
        phase("after the previous end")
    finally:
        worker.stop()
    phase("worker stop")
    log(f"  {broker}: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items()))
    with connection.cursor() as c:
        c.execute("SELECT count(*) FROM environments_deployment")
        deployments = c.fetchone()[0]
    return {"broker": broker, "poll": poll, "workers": settings.Q_CLUSTER["workers"],
            "conn_max_age": settings.DATABASES["default"]["CONN_MAX_AGE"], "deployments_in_database": deployments,
            "bare": stats(bare), "first_after_worker_start_ms": None if first is None else (first - approved) * 1000,
            "approval": approval, "previous": previous}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", choices=("orm", "redis"), required=True)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--repo", type=Path, required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the worker (finally) when told to stop
    print(json.dumps(child(args.broker, args.samples, args.work, args.repo)))


if __name__ == "__main__":
    main()
