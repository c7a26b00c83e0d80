"""The web console in a real browser: Debian's Chromium, headless, driven by selenium through
chromium-driver, against a real API, real Celery workers and redis-server. Every page is
screenshotted into test-artifacts/console/ (PNG)."""

import json
import shutil
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import HYMENOPTERA, REPO, start_stack

pytestmark = pytest.mark.e2e

ARTIFACTS = REPO / "test-artifacts" / "console"
BEE = sorted((HYMENOPTERA / "val" / "bees").iterdir())[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url):
    stack = start_stack(tmp_path_factory, redis_url)
    yield stack
    stack.stop()


class Browser:
    def __init__(self, url: str):
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100"):
            options.add_argument(argument)
        # The console's own messages and every network request (to check no URL carries a key).
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        self.driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        self.url = url
        self.requested: list[str] = []
        ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def find(self, css: str, timeout: float = 30):
        return WebDriverWait(self.driver, timeout).until(lambda d: d.find_element(By.CSS_SELECTOR, css))

    def wait(self, condition, timeout: float = 60, what: str = ""):
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(lambda d: condition())
        except TimeoutException:
            self.screenshot("timed-out")
            page = self.driver.find_element(By.TAG_NAME, "body").text
            raise AssertionError(f"waiting for {what}: the page says\n{page}\nconsole: {self.driver.get_log('browser')}") from None

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def text(self, css: str) -> str:
        return self.find(css).text

    def screenshot(self, name: str) -> Path:
        """The whole page, not only what the window shows."""
        path = ARTIFACTS / f"{name}.png"
        height = self.js("return document.documentElement.scrollHeight")
        self.driver.set_window_size(1280, max(height, 800))
        self.driver.save_screenshot(str(path))
        self.driver.set_window_size(1280, 1100)
        assert path.stat().st_size > 10_000, "an empty screenshot"
        return path

    def sign_in(self, key: str) -> None:
        self.driver.get(self.url + "/")  # redirected to the console
        self.find("#api-key").send_keys(key)
        self.find("#sign-in").click()

    def drop(self, target_css: str, path: Path, folder: bool = False) -> None:
        """Drag and drop `path` onto the element, as a user drags files from their desktop: the
        files go through a file input (the only way a test can hand the browser local files), then
        into the drop event's DataTransfer."""
        source = self.js(
            "const input = document.createElement('input'); input.type = 'file'; input.multiple = true;"
            "input.webkitdirectory = arguments[0]; document.body.append(input); return input;", folder)
        source.send_keys(str(path))
        # A folder's files reach the input as chromedriver reads them: all of them before the drop.
        expected = sum(1 for f in path.rglob("*") if f.is_file()) if folder else 1
        self.wait(lambda: self.js("return arguments[0].files.length", source) == expected, 60, f"{expected} files to load")
        self.js(
            "const [target, input] = arguments; const transfer = new DataTransfer();"
            "for (const file of input.files) transfer.items.add(file);"
            "for (const type of ['dragenter', 'dragover', 'drop'])"
            "  target.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: transfer}));"
            "input.remove();", self.find(target_css), source)

    def console_errors(self) -> list[dict]:
        return [entry for entry in self.driver.get_log("browser") if entry["level"] == "SEVERE"]

    def request_urls(self) -> list[str]:
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                self.requested.append(message["params"]["request"]["url"])
        return self.requested

    def quit(self) -> None:
        self.driver.quit()


@pytest.fixture
def browser(stack):
    browser = Browser(stack.url)
    yield browser
    browser.quit()


def key_of(stack) -> str:
    return stack.http.headers["Authorization"].removeprefix("Bearer ")


def test_upload_train_inspect_and_try_a_model(stack, browser):
    key = key_of(stack)
    browser.sign_in(key)
    browser.find("#upload-title")
    assert browser.driver.current_url.endswith("/console/#/datasets")
    assert browser.js("return sessionStorage.getItem('visiontune.apiKey')") == key
    assert browser.js("return localStorage.length") == 0

    # Drop the hymenoptera folder itself: the console packs its 398 files into a tar and uploads it.
    browser.drop("#dataset-drop", HYMENOPTERA, folder=True)
    browser.wait(lambda: "#/datasets/ds_" in browser.driver.current_url, 120, "the upload to finish")
    browser.wait(lambda: browser.js("return document.querySelector('#dataset-status .badge')?.dataset.status") == "ready",
                 120, "the dataset to be ready")  # fmt: skip
    counts = browser.text("#class-counts")
    assert "ants" in counts and "bees" in counts and "124 / 70" in counts and "121 / 83" in counts
    browser.wait(lambda: browser.js(
        "return [...document.querySelectorAll('#thumbnails img')].filter(i => i.complete && i.naturalWidth > 0).length") == 8,
        30, "four thumbnails per class")  # fmt: skip
    browser.screenshot("02-dataset")

    # Train a linear probe on it, and watch the curve while it runs.
    browser.find("a[href^='#/train?dataset=']").click()
    browser.wait(lambda: browser.js("return document.querySelectorAll('#backbone-list input[type=radio]').length") == 2,
                 30, "the backbones with weights here")  # fmt: skip
    assert browser.js("return document.querySelector('#backbone-list input:checked').value") == "mobilenetv2_100"
    assert browser.js("return document.querySelector('#train-strategy').value") == "auto"  # preselected
    browser.js("document.querySelector('#train-strategy').value = 'linear_probe'")
    browser.find("#hp-epochs").send_keys("40")
    browser.screenshot("03-train")
    browser.find("#start-training").click()
    browser.wait(lambda: "#/jobs/job_" in browser.driver.current_url, 30, "the job page")

    snapshot = "return {status: document.querySelector('#job-status .badge')?.dataset.status," \
               " points: Number(document.querySelector('#job-curves')?.dataset.points || 0)}"  # fmt: skip
    seen_running_with_points = False
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        state = browser.js(snapshot)
        if state["status"] == "running" and state["points"] >= 1 and not seen_running_with_points:
            seen_running_with_points = True
            browser.screenshot("04-job-running")
        if state["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.05)
    assert state["status"] == "succeeded", browser.text("#job-result")
    assert seen_running_with_points, "the curve should have had a point while the job was still running"
    assert state["points"] >= 1 and "epoch" in browser.text("#job-events")
    browser.screenshot("05-job-done")

    # The model's page: accuracy, a 2x2 confusion matrix over all 153 validation images.
    browser.find("#job-model").click()
    accuracy = float(browser.find("#model-accuracy").get_attribute("data-value"))
    assert accuracy >= 0.93
    cells = [int(cell.text) for cell in browser.driver.find_elements(By.CSS_SELECTOR, "#confusion-matrix tbody td")]
    assert len(cells) == 4 and sum(cells) == int(browser.text("#model-val-images")) == 153
    wrong = round((1 - accuracy) * 153)
    browser.wait(lambda: browser.js(
        "return [...document.querySelectorAll('#confidently-wrong img')].filter(i => i.complete && i.naturalWidth > 0).length")
        == min(wrong, 8), 30, "the confidently wrong images")  # fmt: skip
    assert "true:" in browser.text("#confidently-wrong") or wrong == 0
    browser.screenshot("06-model")

    # Try it: drop a bee.
    browser.drop("#predict-drop", BEE)
    browser.find("#predictions .prediction", 60)
    assert browser.js("return document.querySelector('#predictions .prediction').dataset.top") == "bees"
    assert "Server time" in browser.text("#predict-timing")
    browser.screenshot("07-predict")

    # Point an alias at it. (Exports, the other buttons there, take a worker's while: test_redis_flow.py.)
    browser.find("#alias-name").send_keys("production")
    browser.find("#alias-form button[type=submit]").click()
    browser.wait(lambda: "now points at version 1" in browser.text("#model-action-status"), 30, "the alias")
    model_id = browser.driver.current_url.rsplit("/", 1)[1]
    assert stack.http.get("/v1/models/hymenoptera-mobilenetv2_100@production").json()["id"] == model_id

    assert browser.console_errors() == []
    urls = browser.request_urls()
    assert any("/v1/jobs/" in url for url in urls) and not any(key in url for url in urls)

    browser.find("#sign-out").click()
    browser.find("#api-key")
    assert browser.js("return sessionStorage.length + localStorage.length") == 0


def test_an_archive_dropped_is_uploaded_as_it_is_and_swept(stack, browser, small_hymenoptera_zip):
    """A small archive (the point is the path): uploaded as it is, then a sweep of the two backbones
    with weights here, whose ranked table fills in."""
    browser.sign_in(key_of(stack))
    browser.drop("#dataset-drop", small_hymenoptera_zip)
    browser.wait(lambda: browser.js("return document.querySelector('#dataset-status .badge')?.dataset.status") == "ready",
                 120, "the dataset to be ready")  # fmt: skip
    assert "12 / 8" in browser.text("#class-counts")
    assert browser.find("h1").text.startswith("small")  # named after the archive
    dataset_id = browser.driver.current_url.rsplit("/", 1)[1]

    browser.driver.get(stack.url + "/console/#/sweeps")
    browser.find(f"#sweep-dataset option[value='{dataset_id}']").click()
    assert len(browser.driver.find_elements(By.CSS_SELECTOR, "input[name=sweep-backbone]:checked")) == 2
    browser.find("#start-sweep").click()
    ranks = "return [...document.querySelectorAll('#sweep-table tbody tr')].map(r => r.cells[0].textContent)"
    browser.wait(lambda: browser.js(ranks) == ["1", "2"], 300, "both rows of the sweep to be ranked")
    assert sorted(browser.js("return [...document.querySelectorAll('#sweep-table tbody tr')].map(r => r.cells[1].textContent)")) == [
        "mobilenetv2_100", "tf_efficientnet_lite0"]
    browser.screenshot("08-sweep")

    # A long job, cancelled from its page.
    browser.driver.get(f"{stack.url}/console/#/train?dataset={dataset_id}")
    browser.find("#backbone-list input:checked")
    browser.js("document.querySelector('#train-strategy').value = 'full'")
    browser.find("#hp-epochs").send_keys("200")
    browser.find("#start-training").click()
    status = "return document.querySelector('#job-status .badge')?.dataset.status"
    browser.wait(lambda: browser.js(status) == "running", 120, "the job to run")
    browser.find("#cancel-job").click()
    browser.driver.switch_to.alert.accept()  # "Cancel this job?"
    browser.wait(lambda: browser.js(status) == "cancelled", 60, "the job to be cancelled")
    assert not browser.find("#cancel-job").is_displayed()
    assert browser.console_errors() == []


def test_a_wrong_or_revoked_key_is_refused_and_never_put_in_a_url(stack, browser):
    browser.sign_in("vt_00000000_" + "x" * 43)
    error = browser.find("#signin-error")
    browser.wait(lambda: "not accepted" in error.text, 10, "the error")
    browser.screenshot("01-signin-refused")
    assert browser.js("return sessionStorage.length + localStorage.length") == 0

    # A key revoked while it is in use: the next call signs the console out, with the reason.
    created = stack.http.post("/v1/keys", json={"name": "console", "scopes": ["read"]}).json()
    browser.find("#api-key").clear()
    browser.find("#api-key").send_keys(created["key"])
    browser.find("#sign-in").click()
    browser.find("#upload-title")
    assert stack.http.delete(f"/v1/keys/{created['id']}").status_code == 200
    browser.driver.get(stack.url + "/console/#/models")
    browser.wait(lambda: "Signed out" in browser.text("#flash"), 10, "the signed-out message")
    browser.find("#api-key")
    assert browser.js("return sessionStorage.length") == 0

    urls = browser.request_urls()
    assert any(url.endswith("/v1/me") for url in urls)
    assert not any(created["key"] in url or "x" * 43 in url for url in urls)
    # The only errors in the console: the refused calls themselves (Chromium logs every 401).
    assert all("401" in entry["message"] for entry in browser.console_errors())


def test_console_pages_carry_a_strict_content_security_policy(stack):
    for path in ("/console/", "/console/js/main.js", "/console/console.css"):
        response = stack.http.get(path, headers={"Authorization": ""})  # static files: no key needed
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
    assert stack.http.get("/", follow_redirects=False).headers["location"] == "/console/"
