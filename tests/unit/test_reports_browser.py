"""Every kind of page in a real headless Chromium at desktop and phone width: nothing runs off
the page (wide tables scroll in their own box), every picture loads, none is smoothed, and nothing
is fetched from the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import report_pages as P
from browser import Browser, find_chromium

WIDTHS = (1280, 390)


@pytest.fixture(scope="module")
def browser():
    binary = find_chromium()
    if binary is None:
        why = "no chromium (apt-get install chromium; .ci/run installs it)"
        if os.environ.get("MEDDIFF_REQUIRE_BROWSER"):
            pytest.fail(why)
        pytest.skip(why)
    b = Browser(binary)
    yield b
    b.close()


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return P.all_pages(tmp_path_factory.mktemp("pages"))


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("kind", ["index", "thor", "gallery", "evaluation", "study"])
def test_page_fits_the_window(browser: Browser, pages: dict[str, Path], kind: str, width: int):
    m = browser.open(pages[kind], width)
    assert m["innerWidth"] == width
    assert m["scrollWidth"] <= width, f"{kind} at {width} px runs off the page: {m['offenders']}"
    assert m["offenders"] == []
    assert m["broken"] == [] and m["smoothed"] == 0 and m["remote"] == []
    assert m["images"] > 0 or kind == "index"
