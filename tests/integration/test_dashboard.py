"""The web dashboard in a real headless Chromium (Selenium), after a real push through the loop.

The service runs the bundled chest-nodule model in its worker process and sends to a dcmtk
storescp and to a destination that is down (so a delivery fails and the page shows a Retry
button). The browser signs in with the page's form (a POST of the key), must see the study,
the finding's probability and a heat-map thumbnail that really loaded, and never the patient's
name; it clicks Retry, signs out with the Sign out button and signs in again with a read key.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from dicom_ai.api.dashboard import COOKIE_NAME, REFRESH_SECONDS, THUMBNAIL_PX
from dicom_ai.config import Settings
from dicom_ai.service import Service
from dicom_ai.training.synth import synthesize
from storage import apikeys, jobs
from storage.db import Database
from storage.repository import InstanceRecord, index_instance
from tests.conftest import missing, need_binary
from tests.integration.test_loop import db_jobs, dicom_files, loop_settings, push
from tests.peers import StoreSCP, free_port, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# The page reloads itself; an element found before a reload goes stale, so look again.
_AGAIN = (NoSuchElementException, StaleElementReferenceException)


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Debian Chromium driven by chromedriver."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if shutil.which(path) is None:
            missing(f"{path} not found (apt-get install {package})")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,2000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=ChromeService(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: webdriver.Chrome, check: Callable[[webdriver.Chrome], Any],
          timeout: float = 15) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=_AGAIN).until(check)


def _loaded_width(driver: webdriver.Chrome, selector: str) -> int:
    """naturalWidth of a loaded image (0 while loading or when it failed)."""
    element = driver.find_element(By.CSS_SELECTOR, selector)
    width = driver.execute_script(
        "return arguments[0].complete ? arguments[0].naturalWidth : 0;", element)
    return int(width or 0)


def _click(driver: webdriver.Chrome, selector: str) -> bool:
    driver.find_element(By.CSS_SELECTOR, selector).click()
    return True


def _sign_in(driver: webdriver.Chrome, base: str, token: str) -> None:
    """Open the page, type the key into the sign-in form and submit it, as a user does."""
    driver.get(f"{base}/dashboard")
    field = driver.find_element(By.CSS_SELECTOR, '#sign-in input[name="key"]')
    assert field.get_attribute("type") == "password"
    field.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, '#sign-in button[type="submit"]').click()
    _wait(driver, lambda d: d.find_elements(By.ID, "counts"))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_dashboard_shows_the_pushed_study_its_finding_and_heatmap(
    tmp_path: Path, db_url: str, start_service: Callable[[Settings], Service],
    browser: webdriver.Chrome,
) -> None:
    """Push, wait for the job, then look at the page in Chromium: study, finding, thumbnails."""
    need_binary("storescu")
    need_binary("storescp")
    synth = tmp_path / "synth"
    synthesize(synth, studies=1, seed=23, modality="CR", positive_fraction=1.0, difficulty=0.2,
               compress=False)
    files = dicom_files(synth)
    pushed = dcmread(files[0], stop_before_pixels=True)
    study_uid, patient_name = str(pushed.StudyInstanceUID), str(pushed.PatientName)
    assert patient_name.startswith("SYNTH^")

    with StoreSCP(tmp_path / "scp") as scp:
        settings = loop_settings(tmp_path, db_url, [
            {"name": "dcmtk", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port},
            {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": free_port()},
        ])
        service = start_service(settings)
        assert service.api_address is not None
        base = f"http://127.0.0.1:{service.api_address[1]}"
        push(service, files)
        done = wait_until(lambda: [j for j in db_jobs(db_url) if j.state == "done"], 60,
                          "the job to be done")
        job_id = done[0].id

        db = Database(db_url)
        try:
            with db.write_session() as session:
                operator = apikeys.create_key(session, name="ops", role="operator",
                                              now=done[0].finished_at).token
                read = apikeys.create_key(session, name="viewer", role="read",
                                          now=done[0].finished_at).token
            with db.sessions() as session:
                (finding,) = jobs.findings_of_study(session, study_uid)
        finally:
            db.dispose()
        assert finding.heatmap_path is not None

        with httpx.Client(base_url=base, timeout=30) as client:
            # Without a key: 401 with the sign-in form; a wrong key too; thumbnails too.
            page = client.get("/dashboard")
            assert page.status_code == 401
            assert '<form method="post" action="/dashboard/login"' in page.text
            assert client.post("/dashboard/login", data={"key": "dak_wrong"},
                               headers={"Origin": base}).status_code == 401
            heat_src = f"/dashboard/thumbnails/heatmap/{finding.id}.png"
            assert client.get(heat_src).status_code == 401
            # A read key may look but not act.
            as_read = {"Authorization": f"Bearer {read}"}
            assert client.post(f"/dashboard/jobs/{job_id}/rerun",
                               headers=as_read).status_code == 403
            # The down destination's deliveries fail: the page will offer Retry.
            failing = wait_until(
                lambda: client.get("/api/outbox", params={"failing": "true"},
                                   headers=as_read).json()["items"], 30, "a failing delivery")

            # -- the browser ------------------------------------------------------------------
            _sign_in(browser, base, operator)
            assert browser.current_url == f"{base}/dashboard", "redirected after the POST"
            assert operator not in browser.current_url
            cookie = browser.get_cookie(COOKIE_NAME)
            assert cookie is not None
            assert cookie["httpOnly"]
            assert cookie["sameSite"] == "Strict"
            source = browser.page_source
            assert study_uid in source
            assert patient_name not in source
            assert str(pushed.PatientID) not in source
            assert f'content="{REFRESH_SECONDS}; url=dashboard"' in source
            studies_row = browser.find_element(
                By.CSS_SELECTOR, f'#studies tr[data-study-uid="{study_uid}"]')
            assert "complete" in studies_row.text
            assert "CR" in studies_row.text
            assert f"chest → job {job_id}" in studies_row.text
            row = f'#findings tr[data-finding-id="{finding.id}"]'
            probability = browser.find_element(By.CSS_SELECTOR, f"{row} td.probability").text
            assert probability == f"{finding.probability:.3f}"
            assert "chest-nodule 1.0.0" in browser.find_element(By.CSS_SELECTOR, row).text
            # Both thumbnails really loaded, side by side.
            heat_width = _wait(browser, lambda d: _loaded_width(d, f"{row} img.heatmap"))
            source_width = _wait(browser, lambda d: _loaded_width(d, f"{row} img.source"))
            assert heat_width == source_width == THUMBNAIL_PX
            src = browser.find_element(By.CSS_SELECTOR, f"{row} img.heatmap").get_attribute("src")
            assert src == f"{base}{heat_src}"
            png = client.get(heat_src, headers={"X-API-Key": read})
            assert png.status_code == 200
            assert png.headers["content-type"] == "image/png"
            assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
            assert "max-age" in png.headers["cache-control"]
            # Models with their evaluation metrics.
            models = browser.find_element(By.CSS_SELECTOR, '#models tr[data-model="chest-nodule"]')
            assert "roc_auc" in models.text
            assert "active" in models.text

            # The operator's Retry button (a form POST with the cookie) comes back with a notice.
            outbox_id = failing[0]["id"]
            button = f'#failing-deliveries tr[data-outbox-id="{outbox_id}"] button'
            _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, button).is_enabled())
            _wait(browser, lambda d: _click(d, button))
            notice = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, ".notice").text)
            assert notice == f"Delivery {outbox_id} is tried now."

            # Sign out (a POST of the page's button): the cookie is gone, the form is back.
            _wait(browser, lambda d: _click(d, "#sign-out"))
            _wait(browser, lambda d: "Signed out" in d.page_source)
            assert browser.get_cookie(COOKIE_NAME) is None
            browser.get(f"{base}/dashboard")
            assert browser.find_elements(By.CSS_SELECTOR, "#sign-in")
            assert not browser.find_elements(By.ID, "counts")

            # Signed in with a read key, the buttons are there but disabled.
            _sign_in(browser, base, read)
            disabled = _wait(browser, lambda d: d.find_element(
                By.CSS_SELECTOR, "#failing-deliveries button"))
            assert not disabled.is_enabled()
            assert "(read-only)" in browser.page_source


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_patient_names_only_with_the_operator_setting(
    make_settings: Callable[..., Settings], start_service: Callable[[Settings], Service],
) -> None:
    """With ``api.show_patient_names`` the studies table has the patient's name and ID."""
    settings = make_settings(workers={"processes": 0}, api={"show_patient_names": True})
    service = start_service(settings)
    assert service.api_address is not None
    db = Database(settings.storage.url)
    now = datetime.now(UTC)
    study_uid = generate_uid()
    try:
        with db.write_session() as session:
            index_instance(session, InstanceRecord(
                study_instance_uid=study_uid, series_instance_uid=generate_uid(),
                sop_instance_uid=generate_uid(), sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1", patient_name="DOE^JANE<b>",
                patient_id="PID-4711", modality="CR"), path="instances/x.dcm",
                size_bytes=10, calling_ae_title="CR1", now=now, replace=False)
            token = apikeys.create_key(session, name="viewer", role="read", now=now).token
    finally:
        db.dispose()
    page = httpx.get(f"http://127.0.0.1:{service.api_address[1]}/dashboard",
                     headers={"X-API-Key": token}, timeout=30)
    assert page.status_code == 200
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert study_uid in page.text
    assert "DOE^JANE&lt;b&gt;" in page.text, "shown, and escaped"
    assert "PID-4711" in page.text
    assert "<script" not in page.text
