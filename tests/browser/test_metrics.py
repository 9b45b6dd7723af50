"""Delivery metrics and the freeze calendar in a browser, with nothing but the portal reachable: the
charts are SVG drawn by the portal itself, and the page loads nothing from the internet. The numbers
come from the demo's history (other browser tests may add to it, never take from it)."""

import csv
import io


def test_the_metrics_page_draws_its_charts_offline(carol_page, screenshot, db):
    page = carol_page
    refused_by_policy = []
    page.on("console", lambda message: refused_by_policy.append(message.text)
            if "Content Security Policy" in message.text else None)
    page.goto("/admin/")
    page.get_by_role("link", name="Delivery metrics").click()
    page.wait_for_url("**/environments/environment/metrics/")
    assert page.locator("#metrics-form select[name=environment]").input_value() == "Production"
    charts = page.locator("figure.metrics-chart svg[role=img]")
    assert charts.count() == 6
    for chart in charts.all():
        box = chart.bounding_box()
        assert box["width"] > 300 and box["height"] > 100  # drawn, at a readable size
    assert page.locator("#chart-frequency rect.bar-ok").count() >= 5  # the demo's weeks of history
    assert page.locator("#chart-frequency rect.bar-failed").count() >= 2
    assert page.locator("#chart-emergency-share rect.bar-emergency").count() >= 1
    total = page.locator("#metrics-table tr.total td")
    succeeded = total.nth(1).inner_text()  # other browser tests may have deployed meanwhile: 15 or more
    assert total.first.inner_text() == "total" and int(succeeded) >= 15
    assert "Month-end close" in page.locator("#freeze-calendar").inner_text()
    assert page.offline.blocked == [] and refused_by_policy == []
    screenshot(page, "metrics")

    with page.expect_download() as download:
        page.locator("#metrics-csv").click()
    rows = list(csv.DictReader(io.StringIO(open(download.value.path(), encoding="utf-8").read())))
    assert rows[-1]["week"] == "total" and rows[-1]["deployments_succeeded"] == succeeded  # the same numbers
    assert {r["environment"] for r in rows} == {"Production"}


def test_the_freeze_calendar_lists_the_coming_freezes(carol_page, screenshot, db):
    page = carol_page
    page.goto("/admin/environments/freezewindow/")
    calendar = page.locator("#freeze-calendar")
    days = calendar.locator("li.freeze-day")
    assert days.count() >= 2  # the quarter-end close and the month-end close in the next 30 days
    text = calendar.inner_text()
    assert "Europe/Berlin) · Production · Month-end close" in text and "Quarter-end close" in text
    assert page.locator("#result_list").get_by_text("Every Friday 16:00 to Monday 06:00, Europe/Berlin").count() == 1
    assert page.offline.blocked == []
    screenshot(page, "freeze-calendar")
