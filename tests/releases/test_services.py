import pytest
from django.db import DatabaseError, connection, transaction

from audit.models import AuditEvent
from core.decisions import PolicyRefusal
from releases import services
from releases.models import Build, BuildIssue, ImmutableError, Release
from tests.conftest import SYSTEM, ci_actor, person


def register_build(world, number="7", status="in_progress", **kw):
    return services.build_register(actor=world.ci, application="MAC", number=number, commit="abc123",
                                   branch="main", status=status, **kw)


def test_build_registration_is_idempotent_and_audited(world):
    build, created = register_build(world)
    assert created and build.status == "in_progress"
    assert AuditEvent.objects.filter(action="build.register", object_id=str(build.pk)).count() == 1
    again, created = register_build(world)
    assert not created and again.pk == build.pk
    done, created = register_build(world, status="successful", tests=services.TestCounts(10, 0, 1))
    assert not created and (done.status, done.tests_passed) == ("successful", 10)
    assert AuditEvent.objects.filter(action="build.update", object_id=str(build.pk)).count() == 1


@pytest.mark.parametrize(("branch", "keys"), [
    ("feature/BIZPLAT-64951-rounding", ["BIZPLAT-64951"]),
    ("BIZPLAT-12/fix", ["BIZPLAT-12"]),
    ("bugfix/bizplat-7-x", ["BIZPLAT-7"]),
    ("feature/BIZPLAT-3-and-BIZPLAT-4", ["BIZPLAT-3", "BIZPLAT-4"]),
    ("main", []),
    ("feature/XBIZPLAT-5-other-project", []),
    ("feature/BIZPLAT-x", []),
])
def test_builds_take_issue_keys_from_their_branch_names(world, branch, keys):
    build, _ = services.build_register(actor=world.ci, application="MAC", number="1", commit="abc123",
                                       branch=branch, status="successful")
    assert sorted(BuildIssue.objects.filter(build=build).values_list("key", flat=True)) == keys
    assert AuditEvent.objects.get(action="build.register", object_id=str(build.pk)).data["issue_keys"] == keys


def test_the_same_build_number_from_another_branch_or_commit_is_refused_even_in_progress(world):
    """CI servers count builds per job or branch: build 7 of a feature branch is not build 7 of main.
    Its report is refused (BUILD_CONFLICT, on record, naming both), and the build in progress keeps its
    commit, branch and issue keys; its status, URL and tests still update."""
    build, _ = register_build(world)
    for other in ({"branch": "feature/BIZPLAT-8-x"}, {"commit": "fff999"}):
        with pytest.raises(PolicyRefusal) as info:
            services.build_register(actor=world.ci, application="MAC", number="7", status="in_progress",
                                    **{"commit": "abc123", "branch": "main", **other})
        assert info.value.refusal.code == "BUILD_CONFLICT"
    assert info.value.refusal.detail == (
        "MAC build 7 is commit abc123 on main; this report names commit fff999 on main. A build number names one "
        "CI run: send a number unique across the application's jobs and branches.")
    build.refresh_from_db()
    assert (build.commit, build.branch, list(build.issues.all())) == ("abc123", "main", [])
    assert AuditEvent.objects.filter(action="build.update.refused", code="BUILD_CONFLICT").count() == 2
    updated, created = register_build(world, status="successful", url="https://ci.example.com/7")
    assert (created, updated.status, updated.url) == (False, "successful", "https://ci.example.com/7")


def test_build_issue_keys_are_append_only(world):
    world.build(branch="feature/BIZPLAT-9-x")
    for sql in ("UPDATE releases_buildissue SET key = 'BIZPLAT-10'", "DELETE FROM releases_buildissue"):
        with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute(sql)
    assert list(BuildIssue.objects.values_list("key", flat=True)) == ["BIZPLAT-9"]


def test_finished_build_never_changes(world):
    register_build(world, status="failed")
    with pytest.raises(PolicyRefusal) as info:
        register_build(world, status="successful")
    assert info.value.refusal.code == "BUILD_FINISHED"
    assert Build.objects.get(number="7").status == "failed"
    assert AuditEvent.objects.filter(action="build.update.refused", code="BUILD_FINISHED").exists()
    same, created = register_build(world, status="failed")  # the same report again is fine
    assert not created


def test_release_registration_repeat_and_conflict(world):
    release = world.release("2.0.0")
    assert AuditEvent.objects.filter(action="release.register", object_id=str(release.pk)).count() == 1
    build = release.build.number
    kwargs = dict(actor=world.ci, application="MAC", version="2.0.0", build=build,
                  artifact_url=release.artifact_url, artifact_sha256=release.artifact_sha256.upper(),
                  issue_keys=["bizplat-1"], implementers=["ALICE@example.com"])
    again, created = services.release_register(**kwargs)
    assert not created and again.pk == release.pk
    with pytest.raises(PolicyRefusal) as info:
        services.release_register(**{**kwargs, "artifact_sha256": "0" * 64})
    assert (info.value.refusal.code, info.value.refusal.status) == ("RELEASE_CONFLICT", 409)
    assert info.value.refusal.detail == ("MAC 2.0.0 is already registered with other content; a version names one "
                                         "artifact only (this registration differs in artifact_sha256).")
    assert Release.objects.get(pk=release.pk).artifact_sha256 == release.artifact_sha256
    with pytest.raises(PolicyRefusal) as info:
        services.release_register(**{**kwargs, "issue_keys": ["BIZPLAT-2"], "pull_request": services.PullRequest(
            "https://vcs/pr/9", "alice")})
    assert info.value.refusal.detail.endswith(
        "(this registration differs in issue_keys, pull_request, pull_request.author, pull_request.reviewers, "
        "pull_request.url).")


def test_unknown_build_is_refused(world):
    with pytest.raises(PolicyRefusal) as info:
        services.release_register(actor=world.ci, application="MAC", version="9", build="nope",
                                  artifact_url="file:///x", artifact_sha256="a" * 64, issue_keys=[], implementers=[])
    assert info.value.refusal.code == "UNKNOWN_BUILD"


def test_ci_token_registers_only_for_its_applications(world):
    from releases.models import Application

    other = Application.objects.create(name="HAMS", issue_key_prefix="HAMS")
    with pytest.raises(PolicyRefusal) as info:
        services.build_register(actor=ci_actor(other), application="MAC", number="1", commit="a", branch="b",
                                status="successful")
    assert info.value.refusal.code == "TOKEN_SCOPE"


def test_people_need_the_model_permission_to_register(world):
    with pytest.raises(PolicyRefusal) as info:
        services.build_register(actor=person(world.dave), application="MAC", number="1", commit="a", branch="b",
                                status="successful")
    assert info.value.refusal.code == "NOT_PERMITTED"


def test_release_cannot_be_edited_after_registration(world):
    release = world.release()
    release.artifact_url = "file:///elsewhere"
    with pytest.raises(ImmutableError):
        release.save()
    with pytest.raises(ImmutableError):
        release.delete()
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("UPDATE releases_release SET artifact_url = 'file:///elsewhere'")
    assert Release.objects.get(pk=release.pk).artifact_url.startswith("file:///artifacts/")


def test_sha256_must_be_64_hex_in_the_database(world):
    from django.db import IntegrityError

    build = world.build()
    with pytest.raises(IntegrityError), transaction.atomic():
        Release.objects.create(application=world.app, version="x", build=build, artifact_url="u",
                               artifact_sha256="not-a-sha", registration_digest="d", registered_by="t")


def test_implementers_are_resolved_to_users_by_alias(world):
    services.vcs_alias_add(actor=SYSTEM, user=world.carol, identity="CSmith")
    release = world.release(implementers=["csmith", "unknown@example.com"])
    resolved = dict(release.implementers.values_list("identity", "user_id"))
    assert resolved == {"csmith": world.carol.pk, "unknown@example.com": None}
    assert AuditEvent.objects.filter(action="vcs_alias.add").exists()


def test_an_application_change_is_audited_from_and_to(world):
    from audit.models import AuditEvent
    from releases.services import application_save

    world.app.issue_key_prefix = "FIN"
    application_save(actor=SYSTEM, application=world.app)
    event = AuditEvent.objects.filter(action="application.change").get()
    assert event.data["changed"] == {"issue_key_prefix": ["BIZPLAT", "FIN"]}
