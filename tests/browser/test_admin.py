"""The admin as people see it in a browser."""


def test_auditor_sees_everything_and_can_change_nothing(dave_page, screenshot):
    page = dave_page
    page.goto("/admin/")
    assert page.locator("#user-tools").inner_text().upper().startswith("WELCOME, DAVE")
    assert page.locator("#releases-release").get_by_role("link", name="Releases").is_visible()
    assert page.locator("#environments-deployment").get_by_role("link", name="Deployments").is_visible()
    assert page.get_by_role("link", name="SOX reports").is_visible()
    assert page.locator("a.addlink").count() == 0  # no "Add" anywhere
    assert page.locator("a.changelink").count() == 0  # "View", never "Change"
    assert page.get_by_role("link", name="Add", exact=True).count() == 0
    assert page.offline.blocked == []
    screenshot(page, "admin-index-auditor")
