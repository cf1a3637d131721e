"""A real headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven by Selenium), and a console process in front of a server pair.

Where no browser is installed the browser tests are skipped, saying so;
under CI (``CI=true``, where ``.ci/run`` installs it) a missing browser
fails them instead, so they can never pass by not running.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import procs as procs  # the same fixture
from tests.integration.procs import HOST, Processes, ServerProcess, free_ports

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
#: As the machine's notes say: no background traffic out of a closed network.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1360,900",
)


def missing_browser() -> str | None:
    """Why no browser test can run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "no Chromium here: apt-get install chromium chromium-driver"
    return None


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    reason = missing_browser()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser tests: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
        # the page threw nowhere (an uncaught error stops what it was doing)
        thrown = [
            entry["message"]
            for entry in driver.get_log("browser")
            if entry["source"] == "javascript" and entry["level"] == "SEVERE"
        ]
        assert not thrown, f"the page threw: {thrown}"
    finally:
        driver.quit()


def start_console(
    procs: Processes, servers: list[str], *extra: str, name: str = "console"
) -> tuple[ServerProcess, str]:
    """``trioclone console`` for ``servers``; returns it and its URL."""
    port = free_ports(1)[0]
    args = [sys.executable, "-m", "trioclone", "--log-level", "INFO", "console"]
    args += ["--port", str(port), "--bind", HOST, *extra]
    for server in servers:
        args += ["--server", server]
    console = procs.run(name, args, port=port)
    if not console.wait_for_log("console at ", 20):
        raise TimeoutError("the console never listened:\n" + console.log()[-2000:])
    return console, f"http://{HOST}:{port}/"
