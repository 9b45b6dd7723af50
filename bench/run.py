"""The portal's benchmarks on PostgreSQL: `make bench` (see docs/benchmarks.md).

    make bench                                   # everything, on the database portal_bench
    make bench BENCH_ARGS="--only api,pages"     # some sections
    BENCH_DATABASE=other make bench              # another database (created and seeded when needed)

Seeds (or reuses) a database with 100,000 releases, 1,000,000 deployments and 1,000,000 audit
events, then measures, each comparison in the same run:
  api      wrk, 16 connections, against gunicorn (2 sync workers, persistent connections): the portal's
           API next to a bare Django app served the same way
  pages    query count and server time of admin pages and the change journey at 1,000,000 deployments
  appends  8 threads appending to the audit chain
  verify   verify_audit over the whole chain next to COPY of the same table; peak memory
  dispatch the real deploy worker (qcluster), ansible-runner and a one-task playbook: from the last
           approval, and from one deployment's end, to the next ansible-playbook process starting, per
           broker (ORM, Redis), next to ansible-runner alone; needs no seed (bench/dispatch_bench.py)
  rolling  a 3-host rolling upgrade through HAProxy under wrk load: requests per second, failed requests
Sections other than dispatch need the seeded database. Prints a table per section and writes the
figures and the command into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import seed  # noqa: E402

SECTIONS = ("api", "pages", "appends", "verify", "dispatch", "rolling")
COMMAND_ENV = ("BENCH_DATABASE", "BENCH_SERVER", "BENCH_REDIS_URL")  # written into the docs with the command
NO_SEED = {"dispatch"}  # sections that run on the bench database as it is (migrated, seeded or not)
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench results: written by bench/run.py -->", "<!-- end of bench results -->"


def setup_django() -> None:
    os.environ["DATABASE_URL"] = seed.database_url()
    os.environ.setdefault("SECRET_KEY", "benchmark-only")
    os.environ.setdefault("PORTAL_AUDIT_SEAL_KEY", "benchmark-only-seal-key")  # every append sealed, as in production
    os.environ["ALLOWED_HOSTS"] = "127.0.0.1,localhost,testserver"
    os.environ.setdefault("PORTAL_LOG_LEVEL", "WARNING")
    os.environ.setdefault("PORTAL_SSL_REDIRECT", "0")  # plain HTTP in process, as behind a proxy that ends TLS
    os.environ["DJANGO_SETTINGS_MODULE"] = "portal.settings"
    import django

    django.setup()


def log(*args, **kwargs) -> None:
    print(*args, **kwargs, file=sys.stderr)


def table(headers: list[str], rows: list[list[str]]) -> tuple[str, str]:
    """The same rows as aligned text (for the terminal) and as a Markdown table (for the docs)."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    text = "\n".join(
        "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in [headers, *rows]
    )
    markdown = "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                         + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])
    return text, markdown


def api_section(args, token_holder: dict) -> tuple[str, list[str], list[list[str]], str]:
    from bench import api_bench

    rows = api_bench.measure(seed.database_url(), (args.port, args.port + 1), args.seconds, ROOT / "var", log=log)
    if not rows:
        return ("API", [], [], "wrk is not installed: `apt-get install -y wrk`, then run again.")
    return (
        "API: wrk -t2 -c16, gunicorn 2 sync workers, persistent connections",
        ["endpoint", "requests", "req/s", "p50 ms", "p99 ms", "failed", "ratio", "CPU ms/req web + db", "target"],
        [[r["name"], f"{r['requests']:,}", f"{r['rate']:,.1f}", _ms(r["p50_ms"]), _ms(r["p99_ms"]), str(r["failed"]),
          "" if r["ratio"] is None else f"{r['ratio']:.2f}",
          f"{_ms(r['web_cpu_ms'], 2)} + {_ms(r['db_cpu_ms'], 2)}", r["target"]] for r in rows],
        f"{args.seconds} s per endpoint after a 2 s warm-up, each run starting once the workers' backlog of the one"
        " before is served; `failed`: non-2xx answers, socket errors and timeouts (10 s); requests still waiting when"
        " a run ends are not counted; `-`: no request answered in time. Ratio: to the bare view of the same kind"
        " (writes: bare insert, reads: bare JSON). CPU ms/req: the CPU time the gunicorn processes (web) and all"
        " PostgreSQL processes (db) spent during the run, from /proc, per answered request; with 16 clients on"
        " 2 cores, CPU is what runs out (the load tool's own share is not counted).",
    )


def _ms(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def pages_section(args, token_holder: dict):
    from bench import pages_bench

    rows = pages_bench.measure(_token(token_holder), log=log)
    return (
        "Pages at 1,000,000 deployments (in process, logged in as a superuser)",
        ["page", "status", "queries", "median ms", "max ms", "slowest query ms", "target"],
        [[r["name"], str(r["status"]), str(r["queries"]), f"{r['median_ms']:.0f}", f"{r['max_ms']:.0f}",
          f"{r['slowest_query_ms']:.0f}", f"< {pages_bench.TARGET_MS} ms, fixed queries"] for r in rows],
        f"Server time of the whole request (median of up to {pages_bench.REPEATS} after one warm-up request; a page"
        f" over {pages_bench.SLOW_SECONDS:.0f} s is timed once).",
    )


def appends_section(args, token_holder: dict):
    from bench import chain_bench

    chain_bench.checkpoint()  # the sections before wrote: their dirty pages are not flushed during this one
    measured = {}
    for mode in ("floor", "processes", "threads", "floor again"):
        r = chain_bench.appends(writers=args.writers, per_writer=args.appends, mode=mode.split()[0])
        if r["errors"]:
            log("  append errors:", *r["errors"][:5], sep="\n    ")
        log(f"  {r['events']:,} events by {r['writers']} {mode} in {r['seconds']:.1f} s: {r['rate']:,.0f}/s,"
            f" CPU per event {r['writers_cpu_ms']:.2f} ms writers + {r['db_cpu_ms']:.2f} ms database", flush=True)
        measured[mode] = r
    floor = max(measured["floor"]["rate"], measured["floor again"]["rate"])
    rows = []
    for mode, r in measured.items():  # in the order measured: floor, processes, threads, floor again
        if mode.startswith("floor"):
            name, ratio, target = (f"floor: {r['writers']} processes, serialized plain INSERT"
                                   f" ({'before' if mode == 'floor' else 'after'})"), "", "baseline"
        else:
            name, ratio = f"{r['writers']} {mode}", f"{r['rate'] / floor:.2f}"
            target = ">= 1,000/s, verify passes after"
        rows.append([name, f"{r['events']:,}", f"{r['seconds']:.1f}", f"{r['rate']:,.0f}", ratio,
                     f"{r['writers_cpu_ms']:.2f} + {r['db_cpu_ms']:.2f}", str(len(r["errors"])), target])
    return (
        "Audit appends (PostgreSQL, one transaction per event)",
        ["writers", "events", "seconds", "events/s", "of floor", "CPU ms/event writers + db", "errors", "target"],
        rows,
        "Each writer has its own connection; processes write as gunicorn's workers do, threads share one"
        " interpreter lock. verify_audit below runs over the chain these appends extended. The floor: the same"
        " writers serialized by an advisory lock taken in the same round trip as a plain INSERT of a row of about the"
        " same size, then the commit (no chain, no hash, one index): what this machine's disk and scheduler allow for"
        " serialized commits. It is measured before and after the appends, after a CHECKPOINT, and the faster of the"
        " two counts: the disk's speed here changes from one minute to the next. CPU ms/event: the CPU the writers"
        " (their connecting included) and all PostgreSQL processes spent during the run, from /proc, per event; eight"
        " writers and their eight backends share two cores.",
    )


def verify_section(args, token_holder: dict):
    from bench import chain_bench

    runs = chain_bench.verify_vs_copy()
    for r in runs:
        log(f"  verify {r['count']:,} events (seals {r['seals']}) in {r['seconds']:.1f} s ({r['rate']:,.0f}/s), COPY"
            f" {r['copy_rate']:,.0f} rows/s, peak {r['peak_mb']:.0f} MB: {r['line'][:40]}", flush=True)
    return (
        "verify_audit over the whole chain, next to COPY of the same table",
        ["events", "seals", "verify s", "verify events/s", "COPY s", "COPY rows/s", "ratio", "MB at 10%", "peak MB",
         "worker peak MB", "idle MB", "result", "target"],
        [[f"{r['count']:,}", r["seals"], f"{r['seconds']:.1f}", f"{r['rate']:,.0f}", f"{r['copy_seconds']:.1f}",
          f"{r['copy_rate']:,.0f}", f"{r['rate'] / r['copy_rate']:.2f}", f"{r['early_mb']:.0f}", f"{r['peak_mb']:.0f}",
          f"{r['workers_mb']:.0f}", f"{r['idle_mb']:.0f}", "OK" if r["ok"] else "FAILED",
          ">= 0.25 of COPY, memory flat" if r["seals"] == "checked" else "what reading the seals costs"]
         for r in runs],
        "verify_audit runs in a fresh process: `MB at 10%` is its largest RSS in the first tenth of the run, `peak MB`"
        " its VmHWM (flat memory: the two are the same); it splits the chain into one range per core, each verified"
        " by a worker process of its own (`worker peak MB`: the largest worker's peak, pages shared with the parent"
        " included); `idle MB` is the peak of a process that sets up Django and"
        " reads one event. Seals `checked`: with the seal key, as production runs it; `not read`: the same"
        " command without the key, right after. COPY: `COPY audit_auditevent TO STDOUT`, read to the end, just"
        " before and just after the two runs; the faster of the two counts.",
    )


def rolling_section(args, token_holder: dict):
    from bench import api_bench, rolling_bench

    wrk = api_bench.wrk_or_none()
    r = rolling_bench.measure(args.port + 9, wrk, log=log) if wrk else None
    title = "Rolling upgrade under load (3 hosts behind HAProxy, tests/deploy/test_rolling.py's setup)"
    if r is None:
        return (title, [], [], "Not measured: needs haproxy and wrk (apt-get install -y haproxy wrk).")
    return (
        title,
        ["roll", "roll s", "hosts upgraded", "requests", "req/s", "p50 ms", "p99 ms", "failed", "target"],
        [[r["state"], f"{r['roll_seconds']:.1f}", f"{r['hosts_upgraded']}/{r['hosts']}", f"{r['requests']:,}",
          f"{r['rate']:,.0f}", _ms(r["p50_ms"]), _ms(r["p99_ms"]), str(r["failed"]), "0 failed"]],
        f"wrk -t1 -c{rolling_bench.CONNECTIONS} through HAProxy from 1 s before the roll to 1 s after it; the roll is"
        " the real deploy engine running the bundled rolling_upgrade.yml (drain, upgrade, health check, enable,"
        " one host at a time).",
    )


def dispatch_section(args, token_holder: dict):
    from bench import dispatch_bench

    dispatch_bench.prepare_database(seed.database_url(), seed.server_url(), seed.database_name())
    brokers = tuple(b.strip() for b in args.dispatch_brokers.split(",") if b.strip())
    results = dispatch_bench.measure(seed.database_url(), ROOT / "var" / "bench-dispatch", args.dispatch_samples,
                                     brokers, log=log)
    rows, notes = [], []
    for r in results:
        if "skipped" in r:
            rows.append(["(not measured)", r["broker"], "0", "-", "-", "-", "-", "-", r["skipped"]])
            continue
        broker = f"ORM, poll {r['poll']} s" if r["broker"] == "orm" else "Redis"
        for figure, s, claim, start, target in (
            ("ansible-runner alone: run() called -> ansible-playbook started", r["bare"], None, None,
             "baseline (same child)"),
            ("last approval returned -> ansible-playbook started", r["approval"]["latency"],
             r["approval"]["to_claim"], r["approval"]["claim_to_start"], "median < 1,000 ms"),
            ("one deployment's end -> the next one's ansible-playbook started", r["previous"]["latency"],
             r["previous"]["to_claim"], r["previous"]["claim_to_start"], "median < 1,000 ms"),
        ):
            rows.append([figure, broker, str(s["n"]), _ms0(s["median"]), _ms0(s["p90"]), _ms0(s["max"]),
                         _ms0(claim and claim["median"]), _ms0(start and start["median"]), target])
        first = r["first_after_worker_start_ms"]
        connections = "new" if not r["conn_max_age"] else f"kept {r['conn_max_age']} s"
        notes.append(f"{broker}: {r['workers']} worker processes, {connections} database connections,"
                     " first deployment once the cluster said it runs"
                     f" {_ms0(first)} ms (not counted), {r['deployments_in_database']:,} deployments in the database"
                     + (f", {r['approval']['skipped']} approval(s) not seen" if r["approval"]["skipped"] else "")
                     + (f", {r['previous']['skipped']} pair(s) left out" if r["previous"]["skipped"] else ""))
    return (
        "Dispatch latency (real qcluster worker and ansible-runner, a one-task playbook from a Git repository)",
        ["figure", "broker", "samples", "median ms", "p90 ms", "max ms", "to the claim, median ms",
         "claim to start, median ms", "target"],
        rows,
        "Start: the ansible-playbook process's creation as the kernel records it (/proc/PID/stat, 10 ms ticks,"
        " taken at the middle of its tick: a figure is within 5 ms either way, so the baseline of a few"
        " milliseconds may read a little below zero);"
        " an end: the deployment's finished_at, written just before the commit that also starts the next one."
        " `claim`: the engine's claim of the deployment (its audit event), which splits the figure into the"
        " broker's and worker's share and the engine's own preparation (Git checkout, runner set-up). "
        + "; ".join(notes) + ".",
    )


def _ms0(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _token(holder: dict) -> str:
    if "token" not in holder:
        from access.models import ApiToken
        from access.services import token_create
        from audit.actors import Actor
        from releases.models import Application

        _, holder["token"] = token_create(actor=Actor.system(via="bench"), kind=ApiToken.Kind.CI, name="bench-pages",
                                          applications=[Application.objects.get(name="MAC")])
    return holder["token"]


RUNNERS = {"api": api_section, "pages": pages_section, "appends": appends_section, "verify": verify_section,
           "dispatch": dispatch_section, "rolling": rolling_section}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:")))
    try:
        pg = subprocess.run(["psql", seed.database_url(), "-Atc", "SHOW server_version"], capture_output=True,
                            text=True, timeout=10).stdout.strip()
    except OSError:
        pg = "?"
    return (f"{os.cpu_count()} cores ({cpu}), {mem_kb / 1024 / 1024:.0f} GB RAM, {platform.system()}"
            f" {platform.release()}, Python {platform.python_version()}, PostgreSQL {pg}")


def write_docs(command: str, sections: list[tuple[str, list[str]]], seconds: float, load: tuple[float, float],
               whole: bool, started: dt.datetime | None = None) -> None:
    """Write the measured sections into docs/benchmarks.md. A whole run rewrites the results; a run of
    some sections (--only) replaces those sections and keeps the others as they were measured, each
    section saying when and with which command it was."""
    text = DOCS.read_text() if DOCS.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    old, tail = rest.split(END, 1)
    header, *old_blocks = old.split("\n### ")
    kept = {} if whole else {block.split("\n", 1)[0]: f"### {block.rstrip()}\n" for block in old_blocks}
    new = {title: "\n".join([f"### {title}", *lines]) for title, lines in sections}
    if whole:
        when = (started or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d %H:%M UTC")
        header = "\n".join(["", f"Last whole run: {when}, `{command}`, {seconds / 60:.1f} minutes (after seeding).", "",
                             f"Machine: {machine()}; load average {load[0]:.1f} at the start, {load[1]:.1f} at the"
                             " end (the machine is shared: figures of one run are compared with each other).", "", ""])
    # Each section where it was (measured again, or kept), then the sections measured for the first time.
    blocks = [new.pop(title, block) for title, block in kept.items()] + list(new.values())
    DOCS.write_text(head + BEGIN + header.rstrip("\n") + "\n\n" + "\n".join(b.rstrip() + "\n" for b in blocks) + END
                    + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ", ".join(SECTIONS))
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per endpoint")
    parser.add_argument("--port", type=int, default=int(os.environ.get("BENCH_PORT", "8121")),
                        help="the portal's gunicorn; the bare app uses the next port")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--appends", type=int, default=500, help="events per writer")
    parser.add_argument("--releases", type=int, default=100_000)
    parser.add_argument("--deployments", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--dispatch-samples", type=int, default=10, help="samples of each dispatch figure")
    parser.add_argument("--dispatch-brokers", default="orm,redis",
                        help="brokers of the dispatch section (Redis: BENCH_REDIS_URL; skipped when none answers)")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        setup_django()
        from bench import chain_bench

        {"verify": chain_bench.verify_in_this_process, "idle": chain_bench.idle_in_this_process}[args.child]()
        return
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    setup_django()
    (ROOT / "var").mkdir(exist_ok=True)  # the servers' logs; a fresh clone on PostgreSQL has no var/
    if set(wanted) - NO_SEED:
        seed.ensure(args.releases, args.deployments, args.events, log=log)
    command = " ".join([*(f"{name}={shlex.quote(os.environ[name])}" for name in COMMAND_ENV
                          if os.environ.get(name)), "make bench"]
                       + ([f"BENCH_ARGS={shlex.quote(' '.join(sys.argv[1:]))}"] if sys.argv[1:] else []))
    t0, load_at_start, started_at = time.monotonic(), os.getloadavg()[0], dt.datetime.now(dt.UTC)
    sections, holder = [], {}
    for name in SECTIONS:
        if name not in wanted:
            continue
        log(f"\n== {name}", flush=True)
        started, section_load = dt.datetime.now(dt.UTC), os.getloadavg()[0]
        title, headers, rows, note = RUNNERS[name](args, holder)
        print(f"\n{title}")
        measured = (f"Measured {started:%Y-%m-%d %H:%M} UTC by `{command}`; load average {section_load:.1f}"
                    f" at its start, {os.getloadavg()[0]:.1f} at its end.")
        if rows:
            text, markdown = table(headers, rows)
            print(text)
            sections.append((title, ["", measured, "", markdown, "", note, ""]))
        else:
            sections.append((title, ["", measured, "", note, ""]))
        print(note, flush=True)
    seconds = time.monotonic() - t0
    print(f"\nmeasured in {seconds / 60:.1f} minutes; load average {load_at_start:.1f} at the start,"
          f" {os.getloadavg()[0]:.1f} at the end")
    if not args.no_docs:
        write_docs(command, sections, seconds, (load_at_start, os.getloadavg()[0]),
                   whole=set(wanted) == set(SECTIONS), started=started_at)
        print(f"figures written to {DOCS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
