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


def test_on_a_narrow_window_the_sidebar_starts_closed_and_stays_as_the_person_leaves_it(new_page, screenshot):
    """At 1,000 pixels Django's navigation sidebar would take a third of the deployments list with its
    filters: it starts closed there; opened, it stays open from page to page (and closed, closed)."""
    page = new_page("bob")
    page.set_viewport_size({"width": 1000, "height": 800})
    page.goto("/admin/environments/deployment/")
    main, sidebar = page.locator("#main"), page.locator("#nav-sidebar")
    assert "shifted" not in main.get_attribute("class")
    assert sidebar.get_attribute("aria-expanded") == "false" and not sidebar.is_visible()
    assert page.locator("#changelist-filter").is_visible()
    screenshot(page, "deployments-1000px", full_page=False)

    page.click("#toggle-nav-sidebar")
    assert sidebar.is_visible() and sidebar.get_attribute("aria-expanded") == "true"
    page.goto("/admin/releases/release/")
    assert "shifted" in main.get_attribute("class") and sidebar.is_visible()
    page.click("#toggle-nav-sidebar")
    page.goto("/admin/environments/deployment/")
    assert "shifted" not in main.get_attribute("class") and not sidebar.is_visible()


def test_on_a_wide_window_the_sidebar_starts_open(bob_page):
    bob_page.goto("/admin/environments/deployment/")
    assert "shifted" in bob_page.locator("#main").get_attribute("class")
    assert bob_page.locator("#nav-sidebar").is_visible()
