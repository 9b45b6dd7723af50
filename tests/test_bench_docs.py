"""`make bench` writes its figures into docs/benchmarks.md: a run of some sections (--only) replaces
those and keeps the others, so measuring one section again loses nothing."""

from bench import run


def test_a_partial_run_replaces_its_sections_and_keeps_the_others(tmp_path, monkeypatch):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nProse stays.\n\n" + run.BEGIN + "\nold header\n" + run.END + "\n\nMore prose.\n")
    monkeypatch.setattr(run, "DOCS", docs)
    monkeypatch.setattr(run, "machine", lambda: "a test machine")
    run.write_docs("make bench", [("API", ["", "api 1"]), ("Pages", ["", "pages 1"]), ("Appends", ["", "appends 1"])],
                   60.0, (1.0, 2.0), whole=True)
    run.write_docs("make bench BENCH_ARGS='--only pages'", [("Pages", ["", "pages 2"])], 10.0, (1.0, 1.0), whole=False)
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nProse stays.\n\n") and text.endswith(run.END + "\n\nMore prose.\n")
    assert "Last whole run:" in text and "`make bench`" in text and "a test machine" in text
    assert text.index("### API") < text.index("### Pages") < text.index("### Appends")
    assert "pages 2" in text and "pages 1" not in text and "api 1" in text and "appends 1" in text
    run.write_docs("make bench BENCH_ARGS='--only rolling'", [("Rolling", ["", "rolling 1"])], 10.0, (1.0, 1.0),
                   whole=False)
    assert docs.read_text().index("### Appends") < docs.read_text().index("### Rolling")
    run.write_docs("make bench", [("API", ["", "api 2"])], 60.0, (1.0, 2.0), whole=True)
    assert "api 2" in docs.read_text() and "### Pages" not in docs.read_text()  # a whole run starts afresh
