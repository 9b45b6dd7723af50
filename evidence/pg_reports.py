"""PostgreSQL fast path of the `changes` and `audit` reports: the database writes the CSV itself.

`COPY (SELECT ...) TO STDOUT WITH (FORMAT csv, HEADER)` over SQL that formats exactly as the
generic Python path does (times in UTC ISO 8601, lists joined with ';' in code-point order, empty
strings and NULLs as empty cells, formula starters prefixed with ') and is streamed while hashed.
PostgreSQL sends one CopyData message per row, ending with LF; each becomes CRLF as in the Python
writer (newlines inside a value are inside its quotes and stay as they are). The test suite checks
that both paths give the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
from django.db import connection

from evidence.columns import AUDIT_COLUMNS, CHANGES_COLUMNS, DANGEROUS_FIRST, Period

_ESCAPED = {"\t": "\\t", "\r": "\\r", "'": "\\'"}
_STARTS = ", ".join(f"E'{_ESCAPED.get(c, c)}'" for c in DANGEROUS_FIRST)


def s(expr: str) -> str:
    """A text cell: formula starters neutralized, '' written as an empty (unquoted) cell."""
    return f"(CASE WHEN left({expr}, 1) IN ({_STARTS}) THEN '''' || {expr} ELSE NULLIF({expr}, '') END)"


def t(expr: str) -> str:
    return f"""to_char({expr} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""


def _json_list(expr: str) -> str:
    return s(f"(SELECT string_agg(x, ';' ORDER BY n) FROM jsonb_array_elements_text({expr})"
             " WITH ORDINALITY AS j(x, n))")


def _sorted_agg(column: str, source: str) -> str:
    return s(f'(SELECT string_agg({column}, \';\' ORDER BY {column} COLLATE "C") {source})')


def changes_sql(period: Period) -> tuple[str, list]:
    approved = "FROM environments_approval ap WHERE ap.deployment_id = d.id AND ap.decision = 'approve'"
    events = "FROM audit_auditevent ev WHERE ev.object_type = 'environments.deployment' AND ev.object_id = d.id::text"
    columns = [
        "d.id", s("a.name"), s("e.name"), s("r.version"), s("r.artifact_sha256"), s("b.number"), s("b.url"),
        "b.tests_passed", "b.tests_failed",
        _sorted_agg("i.key", "FROM releases_releaseissue i WHERE i.release_id = r.id"),
        _sorted_agg("m.identity", "FROM releases_implementer m WHERE m.release_id = r.id"),
        s("r.pull_request_url"), _json_list("r.pull_request_reviewers"), s("d.playbook_commit"),
        s("d.requested_by_label"), t("d.requested_at"),
        _sorted_agg("u.username", approved.replace(
            "FROM environments_approval ap", "FROM environments_approval ap JOIN auth_user u ON u.id = ap.approver_id"
        )),
        t(f"(SELECT max(ap.decided_at) {approved})"), "d.required_approvals",
        "(CASE WHEN d.emergency THEN 'true' ELSE 'false' END)", s("d.emergency_reason"), s("rv.username"),
        t("d.reviewed_at"), "d.promoted_from_id", t("pf.finished_at"), t("d.started_at"), t("d.finished_at"),
        s("d.state"), _json_list("d.sod_checks"), f"(SELECT min(ev.seq) {events})", f"(SELECT max(ev.seq) {events})",
        s("d.result_detail"), s("d.review_comment"), s("rep.version"),
        "(CASE WHEN rep.id > r.id THEN 'true' ELSE 'false' END)",
    ]
    select = ", ".join(f'{c} AS "{name}"' for c, name in zip(columns, CHANGES_COLUMNS, strict=True))
    sql = (
        f"SELECT {select} FROM environments_deployment d"
        " JOIN environments_environment e ON e.id = d.environment_id"
        " JOIN releases_release r ON r.id = d.release_id"
        " JOIN releases_application a ON a.id = r.application_id"
        " JOIN releases_build b ON b.id = r.build_id"
        " LEFT JOIN auth_user rv ON rv.id = d.reviewed_by_id"
        " LEFT JOIN environments_deployment pf ON pf.id = d.promoted_from_id"
        # what ran in the environment when the attempt started: the last success there before it
        " LEFT JOIN LATERAL (SELECT pr.id, pr.version FROM environments_deployment p"
        " JOIN releases_release pr ON pr.id = p.release_id WHERE p.environment_id = d.environment_id"
        " AND p.state = 'succeeded' AND p.finished_at < d.started_at"
        " ORDER BY p.finished_at DESC, p.id DESC LIMIT 1) rep ON true"
        " WHERE e.restricted AND d.requested_at >= %s AND d.requested_at < %s"
    )
    params: list = [period.since, period.until]
    if period.application:
        sql += " AND a.name = %s"
        params.append(period.application)
    return sql + " ORDER BY d.requested_at, d.id", params


def audit_sql(period: Period, up_to_seq: int) -> tuple[str, dict]:
    columns = ["seq", t("created_at"), "actor_id", *(s(c) for c in AUDIT_COLUMNS[3:])]  # every text cell as safe_cell
    select = ", ".join(f'{c} AS "{name}"' for c, name in zip(columns, AUDIT_COLUMNS, strict=True))
    # The run reports.audit_rows describes. Its first and last seq: where the chain's first event (or the
    # head, up_to_seq) lies in the period, that event's; else over the period's events as the time's index
    # finds them (`seq + 0`), cost as the period's size. A plain min(seq) or max(seq) PostgreSQL reads by
    # walking seq's index until an event of the period turns up: for max(seq) from the head back through
    # every event written since (0.57 s before the first row, for the first tenth of a million events).
    # A branch's subquery runs only when its CASE takes it.
    timed = "FROM audit_auditevent WHERE created_at >= %(since)s AND created_at < %(until)s AND seq <= %(head)s"
    first_at = "(SELECT created_at FROM audit_auditevent ORDER BY seq LIMIT 1)"
    head_at = "(SELECT created_at FROM audit_auditevent WHERE seq = %(head)s)"
    return (f"SELECT {select} FROM audit_auditevent WHERE seq BETWEEN"
            f" CASE WHEN {first_at} >= %(since)s AND {first_at} < %(until)s"
            f" THEN (SELECT min(seq) FROM audit_auditevent) ELSE (SELECT min(seq + 0) {timed}) END"
            f" AND CASE WHEN {head_at} >= %(since)s AND {head_at} < %(until)s"
            f" THEN %(head)s ELSE (SELECT max(seq + 0) {timed}) END ORDER BY seq",
            {"since": period.since, "until": period.until, "head": up_to_seq})


def copy_csv(sql: str, params: list | dict) -> Iterator[bytes]:
    """The rows of `sql` as CSV with CRLF line ends, header first, one bytes object per row."""
    connection.ensure_connection()
    raw = connection.connection
    literal = psycopg.ClientCursor(raw).mogrify(sql, params)
    with raw.cursor() as cursor, cursor.copy(f"COPY ({literal}) TO STDOUT WITH (FORMAT csv, HEADER true)") as copy:
        for block in copy:
            row = bytes(block)
            if not row.endswith(b"\n"):
                raise RuntimeError("COPY sent a partial row; the CSV fast path cannot be used here.")
            yield row[:-1] + b"\r\n"
