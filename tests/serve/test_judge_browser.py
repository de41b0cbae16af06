"""The judging page in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by
Selenium, keys and all; the database is read directly with sqlite3 afterwards."""

from __future__ import annotations

import shutil
import sqlite3
import time

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (the judge extra)")

from _judge_helpers import TOKENS, judge_app, make_desk  # noqa: E402
from _serve_helpers import running  # noqa: E402

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (BROWSER and DRIVER), reason="no chromium/chromedriver on this machine "
                                "(apt-get install chromium chromium-driver; .ci/run does it)")


def _browser(width=1280, height=800):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def _settled(driver, done_before, timeout=10.0):
    """Wait until the page has finished one more call than ``done_before``; return its state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = driver.execute_script("return window.mirip")
        if state and state["done"] > done_before and not state["pending"]:
            return state
        time.sleep(0.02)
    raise AssertionError(f"the page did not answer; its state: {driver.execute_script('return window.mirip')}")


def _pair(driver):
    return tuple(driver.find_element("id", i).get_attribute("textContent") for i in ("nameA", "nameB"))


def test_keys_write_exactly_the_judgments_made(tmp_path):
    from selenium.webdriver.common.keys import Keys

    desk = make_desk(tmp_path)
    with running(judge_app(desk), ready=False) as url:
        driver = _browser()
        try:
            driver.get(url + "/judge?token=" + TOKENS["ana"])
            state = _settled(driver, 0)
            assert driver.current_url.endswith("/judge")  # the token left the address bar for a cookie
            assert driver.find_element("id", "judge").text == "ana"
            body = driver.find_element("tag name", "body")
            assert not driver.find_element("id", "nameA").is_displayed() or \
                driver.find_element("id", "nameA").value_of_css_property("visibility") == "hidden"
            made = []
            for key, winner in [(Keys.ARROW_LEFT, "a"), (Keys.ARROW_RIGHT, "b"), (Keys.ARROW_DOWN, "tie"),
                                (Keys.SPACE, None), (Keys.ARROW_LEFT, "a"), ("z", "undo")]:
                a, b = _pair(driver)
                body.send_keys(key)
                state = _settled(driver, state["done"])
                if winner == "undo":
                    undone = made.pop()
                    assert set(_pair(driver)) == set(undone[1:3])  # the undone pair is shown again
                elif winner is not None:
                    made.append(("ana", a, b, winner))
            assert driver.find_element("id", "session").text == "3"
            second = _browser()  # a second judge at the same time
            try:
                second.get(url + "/judge?token=" + TOKENS["bo"])
                _settled(second, 0)
                assert set(_pair(second)) != set(_pair(driver))
            finally:
                second.quit()
            driver.find_element("id", "btnA").click()  # a click works like the key
            state = _settled(driver, state["done"])
            assert driver.find_element("id", "session").text == "4"
            driver.refresh()  # a new page session: its count starts again
            state = _settled(driver, 0)
            assert driver.find_element("id", "session").text == "0"
            body = driver.find_element("tag name", "body")
            body.send_keys("z")  # undoes the click's judgment, made before the reload: nothing to uncount here
            state = _settled(driver, state["done"])
            assert driver.find_element("id", "session").text == "0"
            a, b = _pair(driver)
            body.send_keys(Keys.ARROW_RIGHT)
            state = _settled(driver, state["done"])
            assert driver.find_element("id", "session").text == "1"
        finally:
            driver.quit()
    con = sqlite3.connect(str(tmp_path / "judgments.sqlite"))
    rows = con.execute("SELECT judge, a, b, winner FROM judgments ORDER BY id").fetchall()
    con.close()
    assert rows == made + [("ana", a, b, "b")]  # the click's judgment undone after the reload
