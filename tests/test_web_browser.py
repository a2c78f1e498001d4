"""A real browser on the web app: headless Chromium (Debian's ``chromium`` +
``chromium-driver``, installed by scripts/setup.sh where apt is available)
loads the page served by ``facetron web``, runs one generation on the tiny
model against the session's tritonserver (1 image, 2 steps) and saves a
screenshot (PNG) in the test's tmp folder; set FACETRON_SCREENSHOT_DIR to
keep a copy (the README's docs/web_app.png was taken this way).

Before that, the login: a visitor who is not logged in gets the login page
and nothing else (no page, no API, no file); a logged-in user cannot fetch
another user's photo by its path under the work folder.

Without a browser the tests are skipped on a developer machine and FAILS in
CI (``CI=true``): the browser is part of the environment setup installs."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from web_fixtures import register_ready_user, start_web, stop_web, write_logins

USER = "browser-user"
PASSWORD = "browser-password"
OTHER, OTHER_PASSWORD = "other-user", "other-password"
# 3 candidates: on the tiny model a fused face is found again in some pictures, not all (the server scores each
# returned picture from a fresh detection); the page must show those that pass
STEPS, NUM_IMAGES, SEED = 2, 3, 7  # seed 7: its fused faces are found again in the tiny model's noise (scanned)


def _browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver) or skip/fail with the reason."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [n for n, p in (("chromium", chromium), ("chromedriver (chromium-driver)", driver)) if not p]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium Python package")
    if missing:
        reason = f"no headless browser: {', '.join(missing)} not installed (scripts/setup.sh installs them)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI: {reason}")
        pytest.skip(reason)
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = _browser_paths()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1700", "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def web(triton, users_dir: Path, tmp_path_factory):
    root = tmp_path_factory.mktemp("web_browser")
    register_ready_user(users_dir, USER, root / "user")
    logins = write_logins(root / "logins", {USER: PASSWORD})
    proc, url = start_web(triton.grpc_url, users_dir, root / "work", root / "web.log", "--steps", str(STEPS),
                          credentials=logins)
    yield url
    stop_web(proc)


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """``facetron web`` behind two logins, each user with a photo where prepare stages uploads (no Triton:
    the login and file checks come before any call to it)."""
    from PIL import Image

    from facetron.triton.server import free_port
    from facetron.web.app import WebConfig
    from facetron.web.photos import stage_photos

    root = tmp_path_factory.mktemp("web_locked")
    work = root / "work"
    config = WebConfig(server="127.0.0.1:1", work_dir=work)
    photos = {}
    for user in (USER, OTHER):
        Image.new("RGB", (64, 64), (90, 120, 200)).save(root / f"{user}.png")
        photos[user] = stage_photos([root / f"{user}.png"], config.user_dir(user) / "photos") / f"{user}.png"
    logins = write_logins(root / "logins", {USER: PASSWORD, OTHER: OTHER_PASSWORD})
    proc, url = start_web(f"127.0.0.1:{free_port()}", root / "users", work, root / "web.log", credentials=logins)
    yield url, photos
    stop_web(proc)


def _fetch_status(driver, url: str) -> tuple[int, str]:
    """(HTTP status, first bytes of the body) of a GET from the page, with its cookies."""
    return tuple(driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {credentials: 'same-origin'})"
        ".then(async r => done([r.status, (await r.text()).slice(0, 200)])).catch(e => done([-1, String(e)]));",
        url))


def _log_in(driver, user: str, password: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 60)
    box = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "input[type='password']")))
    name = driver.find_element(By.CSS_SELECTOR, "input[type='text'], input:not([type])")
    name.send_keys(user)
    box.send_keys(password, Keys.ENTER)
    wait.until(EC.presence_of_element_located((By.ID, "user-id")))


def test_a_visitor_who_is_not_logged_in_gets_the_login_page_only(browser, locked) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    url, photos = locked
    browser.delete_all_cookies()
    browser.get(url)
    WebDriverWait(browser, 60).until(EC.presence_of_element_located((By.CSS_SELECTOR, "input[type='password']")))
    assert not browser.find_elements(By.ID, "generate-btn") and not browser.find_elements(By.ID, "user-id")
    for path in ("gradio_api/info", "config", f"gradio_api/file={photos[OTHER]}", f"gradio_api/file={photos[USER]}"):
        status, body = _fetch_status(browser, url + path)
        assert status == 401, (path, status, body)


def test_a_user_cannot_fetch_another_users_photo_by_path(browser, locked) -> None:
    from selenium.webdriver.common.by import By

    url, photos = locked
    browser.delete_all_cookies()
    browser.get(url)
    _log_in(browser, USER, PASSWORD)
    from selenium.webdriver.support.ui import WebDriverWait

    field = browser.find_element(By.CSS_SELECTOR, "#user-id textarea, #user-id input")
    WebDriverWait(browser, 30).until(lambda d: field.get_attribute("value") == USER)  # filled in at load
    assert not field.is_enabled()  # the login, read-only
    assert _fetch_status(browser, url + "config")[0] == 200  # logged in
    for path in (photos[OTHER], photos[USER]):  # nothing under the work folder is served by path
        status, body = _fetch_status(browser, url + f"gradio_api/file={path}")
        assert status == 403 and "File not allowed" in body, (path, status, body)
    browser.delete_all_cookies()


def _set_number(driver, elem_id: str, value: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


@pytest.mark.triton
def test_browser_generates_one_portrait(browser, web, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    t0 = time.perf_counter()
    browser.delete_all_cookies()
    browser.get(web)
    _log_in(browser, USER, PASSWORD)
    wait = WebDriverWait(browser, 60)
    wait.until(EC.text_to_be_present_in_element((By.ID, "server-status"), "ready"))
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#user-id textarea, #user-id input")
               .get_attribute("value") == USER)  # the session's user, filled in at load
    tab = next(b for b in browser.find_elements(By.CSS_SELECTOR, "button[role='tab']") if "generate" in b.text)
    tab.click()
    wait.until(EC.element_to_be_clickable((By.ID, "generate-btn")))
    _set_number(browser, "num-images", NUM_IMAGES)
    _set_number(browser, "steps", STEPS)
    _set_number(browser, "seed", SEED)
    _set_number(browser, "fusion-strength", 1)  # the tiny model's face region is noise: a full blend is found again
    from facetron.assets import asset_path  # template mode: the tiny model makes no faces of its own

    browser.find_element(By.CSS_SELECTOR, "#template input[type='file']").send_keys(str(asset_path("photo_astronaut")))
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#template img")))
    browser.find_element(By.ID, "generate-btn").click()
    WebDriverWait(browser, 240).until(
        EC.presence_of_element_located((By.CSS_SELECTOR, "#gallery img")),
        message=f"no portrait in the gallery; status: {browser.find_element(By.ID, 'generate-status').text!r}")
    WebDriverWait(browser, 30).until(EC.text_to_be_present_in_element((By.ID, "generate-status"), "portrait(s)"))
    status = browser.find_element(By.ID, "generate-status").text
    m = re.search(r"(\d+) portrait\(s\) of (\d+) candidate\(s\)", status)
    assert m and int(m.group(1)) >= 1 and int(m.group(2)) == NUM_IMAGES, status
    gallery_text = browser.find_element(By.ID, "gallery").text
    assert f"seed {SEED}" in gallery_text and "similarity" in gallery_text, gallery_text
    time.sleep(0.5)  # let the gallery image paint before the screenshot
    shot = tmp_path / "web_app.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    keep = os.environ.get("FACETRON_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(keep) / "web_app.png")
    print(f"browser check: {time.perf_counter() - t0:.1f} s, screenshot {shot}")
