"""What the reports are about (a period, an application) and the columns they have: shared by the
generic reports and their PostgreSQL COPY fast path."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from core.times import iso


@dataclass(frozen=True)
class Period:
    since: dt.datetime
    until: dt.datetime
    application: str | None = None

    def as_dict(self) -> dict:
        return {"since": iso(self.since), "until": iso(self.until), "application": self.application}


CHANGES_COLUMNS = [
    "deployment_id", "application", "environment", "version", "artifact_sha256", "build_number", "build_url",
    "tests_passed", "tests_failed", "issue_keys", "implementers", "pull_request_url", "code_reviewers",
    "playbook_commit", "requested_by", "requested_at", "approvers", "approved_at", "required_approvals",
    "emergency", "emergency_reason", "reviewed_by", "reviewed_at", "promoted_from_deployment_id",
    "promoted_from_finished_at", "started_at", "finished_at", "result", "sod_checks", "audit_seq_first",
    "audit_seq_last", "result_detail", "review_comment", "replaced_version", "rollback",
]

AUDIT_COLUMNS = ["seq", "created_at", "actor_id", "actor_username", "actor_email", "via", "action", "object_type",
                 "object_id", "object_repr", "code", "canonical", "prev_hash", "hash", "seal"]

# A cell starting with one of these gets a leading "'": a spreadsheet shows it as text instead of
# evaluating it. "'" itself is among them, so that the prefix can always be told from the value ("'=x"
# stays "''=x", not "=x" once read back).
DANGEROUS_FIRST = ("=", "+", "-", "@", "\t", "\r", "'")
