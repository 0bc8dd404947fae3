"""Web hardening (issue 17): ids are validated before they reach the database, and the
dashboard cannot be driven by another site (login CSRF, cross-site buttons, GET sign-out).

Everything runs against a real service (uvicorn on a loopback port) and a real index, SQLite
and PostgreSQL. The browser's view of the same flows is in ``test_dashboard.py`` (Chromium).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import httpx
import pytest
from pydicom.uid import generate_uid

from dicom_ai.api.dashboard import COOKIE_NAME
from dicom_ai.config import Settings, load_settings
from dicom_ai.service import Service
from storage import apikeys, jobs
from storage.db import Database

#: Too large for any id column (2**31: PostgreSQL INTEGER; 2**63, 2**64: any 64-bit integer),
#: negative, or not a number at all.
BAD_IDS = (str(2**31), str(2**63), str(2**64), "-1", "abc")
#: The largest id an INTEGER column holds: valid, merely absent.
LAST_ID = 2**31 - 1

#: Every route with an integer id in its path ({id} is replaced).
ID_ROUTES = (
    ("GET", "/api/jobs/{id}"),
    ("GET", "/api/batches/{id}"),
    ("POST", "/api/jobs/{id}/rerun"),
    ("POST", "/api/results/{id}/resend"),
    ("POST", "/api/outbox/{id}/retry"),
    ("POST", "/api/batches/{id}/cancel"),
    ("GET", "/dashboard/thumbnails/heatmap/{id}.png"),
    ("GET", "/dashboard/thumbnails/source/{id}.png"),
    ("POST", "/dashboard/jobs/{id}/rerun"),
    ("POST", "/dashboard/outbox/{id}/retry"),
)
#: Every integer query parameter: keyset cursors, page sizes, id filters, the page's notice.
LISTS = ("/api/studies", "/api/series", "/api/jobs", "/api/findings", "/api/outbox",
         "/api/batches", "/api/audit")
ID_QUERIES = (
    *((path, "after") for path in LISTS),
    *((path, "limit") for path in LISTS),
    ("/api/findings", "job_id"),
    ("/api/outbox", "job_id"),
    ("/dashboard", "id"),
    ("/dashboard", "new"),
    ("/dashboard", "code"),
)


def _settings(make_settings: Callable[..., Settings]) -> Settings:
    """No workers (jobs stay as they are); a route, so a job can be re-run."""
    base = make_settings(workers={"processes": 0}).model_dump()
    return load_settings(None, **{
        **base,
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}],
        "routes": [{"name": "chest", "match": {"Modality": "CR"}, "model": "chest-nodule",
                    "destinations": ["pacs"]}],
    })


def _keys(url: str) -> dict[str, str]:
    db = Database(url)
    now = datetime.now(UTC)
    try:
        with db.write_session() as session:
            return {role: apikeys.create_key(session, name=role, role=role, now=now).token
                    for role in ("operator", "read")}
    finally:
        db.dispose()


#: A running service: its base URL, its keys by role, its settings.
Web = tuple[str, dict[str, str], Settings]


@pytest.fixture
def web(make_settings: Callable[..., Settings],
        start_service: Callable[[Settings], Service]) -> Web:
    """A running service: its base URL, an operator and a read key, its settings."""
    settings = _settings(make_settings)
    service = start_service(settings)
    assert service.api_address is not None
    return f"http://127.0.0.1:{service.api_address[1]}", _keys(settings.storage.url), settings


# -- ids ----------------------------------------------------------------------------------------
def test_ids_out_of_range_answer_422(web: Web) -> None:
    """Every integer path or query parameter answers 422 for 2**31, 2**63, 2**64, -1, "abc".

    Before the fix SQLite raised OverflowError (Python int too large to convert to SQLite
    INTEGER) and PostgreSQL "integer out of range": HTTP 500.
    """
    base, keys, _ = web
    operator = {"Authorization": f"Bearer {keys['operator']}"}
    wrong: list[tuple[str, str, int]] = []
    # A fresh connection per request: a server error may close a kept-alive one.
    with httpx.Client(base_url=base, timeout=30, headers={**operator, "Connection": "close"},
                      limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for method, template in ID_ROUTES:
            for bad in BAD_IDS:
                path = template.replace("{id}", bad)
                answer = client.request(method, path)
                if answer.status_code != 422:
                    wrong.append((method, path, answer.status_code))
            # The largest id a column holds is valid: merely absent (the dashboard's buttons
            # redirect to the page with the failure's code).
            absent = client.request(method, template.replace("{id}", str(LAST_ID)))
            where = absent.headers.get("location", "")
            if absent.status_code != 404 and not (absent.status_code == 303
                                                  and where.endswith("&code=404")):
                wrong.append((method, template, absent.status_code))
        for path, name in ID_QUERIES:
            for bad in BAD_IDS:
                answer = client.get(path, params={name: bad})
                if answer.status_code != 422:
                    wrong.append(("GET", f"{path}?{name}={bad}", answer.status_code))
        # A cursor at the top of the range is a valid (empty or full) page.
        for path in LISTS:
            answer = client.get(path, params={"after": LAST_ID, "order": "asc"})
            if answer.status_code != 200:
                wrong.append(("GET", f"{path}?after={LAST_ID}", answer.status_code))
    assert wrong == [], "\n".join(" ".join(map(str, w)) for w in wrong)


# -- the dashboard's sign-in, sign-out and buttons ----------------------------------------------
def _set_cookie(answer: httpx.Response) -> str:
    """The dashboard's Set-Cookie header ("" when none)."""
    found = [v for v in answer.headers.get_list("set-cookie")
             if v.startswith(f"{COOKIE_NAME}=")]
    assert len(found) <= 1
    return found[0] if found else ""


def _attributes(set_cookie: str) -> dict[str, str]:
    parts = [p.strip() for p in set_cookie.split(";")]
    return {k.lower(): v for k, _, v in (p.partition("=") for p in parts[1:])}


def _sign_in(client: httpx.Client, token: str, **headers: str) -> httpx.Response:
    return client.post("/dashboard/login", data={"key": token}, headers=headers)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_key_in_a_get_query_signs_nobody_in(web: Web) -> None:
    """``GET /dashboard?key=`` (a link or an image of another site) sets no cookie."""
    base, keys, _ = web
    with httpx.Client(base_url=base, timeout=30) as client:
        linked = client.get("/dashboard", params={"key": keys["operator"]},
                            headers={"Sec-Fetch-Site": "cross-site"})
        assert linked.status_code == 401
        assert _set_cookie(linked) == ""
        assert keys["operator"] not in linked.text, "the key is not echoed"
        assert '<form method="post" action="/dashboard/login"' in linked.text
        # Same-site navigation with the key in the address: not accepted either.
        typed = client.get("/dashboard", params={"key": keys["operator"]},
                           headers={"Sec-Fetch-Site": "none"})
        assert typed.status_code == 401
        assert _set_cookie(typed) == ""
        assert "not accepted" in typed.text


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_get_never_signs_out(web: Web) -> None:
    """``GET /dashboard?logout=1`` (an ``<img>`` on another site) keeps the session."""
    base, keys, _ = web
    cookie = {"Cookie": f"{COOKIE_NAME}={keys['read']}"}
    with httpx.Client(base_url=base, timeout=30) as client:
        logout = client.get("/dashboard", params={"logout": "1"}, headers=cookie)
        assert logout.status_code == 200
        assert _set_cookie(logout) == ""
        assert "(read-only)" in logout.text


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sign_in_and_out_are_same_origin_posts(
        web: Web) -> None:
    """A form POST of this origin signs in (HttpOnly, SameSite=Strict cookie); another
    site's, or one that says nothing of its origin, is refused and sets nothing."""
    base, keys, _ = web
    token = keys["read"]
    host = base.removeprefix("http://")
    with httpx.Client(base_url=base, timeout=30) as client:
        refused = {
            "cross-site": {"Sec-Fetch-Site": "cross-site"},
            "same-site": {"Sec-Fetch-Site": "same-site", "Origin": base},
            "other origin": {"Origin": "http://evil.example"},
            "other port": {"Origin": "http://127.0.0.1:1"},
            "opaque origin": {"Origin": "null"},
            "other referer": {"Referer": "http://evil.example/page"},
            "nothing": {},
        }
        for why, headers in refused.items():
            answer = _sign_in(client, token, **headers)
            assert answer.status_code == 403, why
            assert _set_cookie(answer) == "", why
        for why, headers in {"fetch metadata": {"Sec-Fetch-Site": "same-origin"},
                             "origin": {"Origin": base},
                             "referer": {"Referer": f"{base}/dashboard"}}.items():
            answer = _sign_in(client, token, **headers)
            assert answer.status_code == 303, why
            assert answer.headers["location"] == "/dashboard"
            value, attributes = _set_cookie(answer), _attributes(_set_cookie(answer))
            assert value.startswith(f"{COOKIE_NAME}={token};"), why
            assert "httponly" in attributes
            assert attributes["samesite"].lower() == "strict"
            assert attributes["path"] == "/dashboard"
            assert "secure" not in attributes, "plain HTTP"
        # A wrong key: 401, nothing set; an oversized body: refused before it is read whole.
        wrong = _sign_in(client, "dak_wrong", Origin=base)
        assert wrong.status_code == 401
        assert _set_cookie(wrong) == ""
        huge = client.post("/dashboard/login", content=b"key=" + b"x" * 100_000,
                           headers={"Origin": base,
                                    "Content-Type": "application/x-www-form-urlencoded"})
        assert huge.status_code == 413
        chunked = client.post("/dashboard/login", content=iter([b"key=" + b"x" * 60_000] * 20),
                              headers={"Origin": base,
                                       "Content-Type": "application/x-www-form-urlencoded"})
        assert chunked.status_code == 413, "no Content-Length: cut off while reading"
        assert _sign_in(client, token, Origin=base).status_code == 303, "still serving"
        # Behind a TLS proxy (X-Forwarded-Proto from loopback) the cookie is Secure.
        tls = _sign_in(client, token, Origin=f"https://{host}", **{"X-Forwarded-Proto": "https"})
        assert tls.status_code == 303
        assert "secure" in _attributes(_set_cookie(tls))

        # Sign-out: a POST of this origin forgets the key; another site's cannot.
        cookie = {"Cookie": f"{COOKIE_NAME}={token}"}
        for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {}):
            kept = client.post("/dashboard/logout", headers={**cookie, **headers})
            assert kept.status_code == 403, headers
            assert _set_cookie(kept) == ""
        out = client.post("/dashboard/logout", headers={**cookie, "Origin": base})
        assert out.status_code == 200
        assert _attributes(_set_cookie(out))["max-age"] == "0"
        assert _set_cookie(out).startswith(f'{COOKIE_NAME}="";')
        assert '<form method="post" action="/dashboard/login"' in out.text


def _a_job(url: str) -> int:
    """A job on the configured route (the Re-run button works on any job)."""
    db = Database(url)
    try:
        with db.write_session() as session:
            return jobs.create_job(session, study_instance_uid=generate_uid(),
                                   series_instance_uids=[generate_uid()], route="chest",
                                   model_name="chest-nodule", max_attempts=1, event_id=None,
                                   now=datetime.now(UTC)).id
    finally:
        db.dispose()


def _job_count(url: str) -> int:
    db = Database(url)
    try:
        with db.sessions() as session:
            return len(jobs.list_jobs(session, limit=1000))
    finally:
        db.dispose()


def test_buttons_refuse_other_sites(web: Web) -> None:
    """With the cookie, a button's POST needs this origin (Sec-Fetch-Site, else Origin or
    Referer); a key in a header (a script, not a browser's ambient cookie) needs neither."""
    base, keys, settings = web
    url = settings.storage.url
    job_id = _a_job(url)
    before = _job_count(url)
    cookie = {"Cookie": f"{COOKIE_NAME}={keys['operator']}"}
    button = f"/dashboard/jobs/{job_id}/rerun"
    with httpx.Client(base_url=base, timeout=30) as client:
        for headers in ({"Origin": "http://evil.example"},
                        {"Referer": "http://evil.example/x"},
                        {"Sec-Fetch-Site": "cross-site", "Origin": base},
                        {"Origin": "null"}, {}):
            answer = client.post(button, headers={**cookie, **headers})
            assert answer.status_code == 403, headers
        retry = client.post("/dashboard/outbox/1/retry",
                            headers={**cookie, "Origin": "http://evil.example"})
        assert retry.status_code == 403
        assert _job_count(url) == before, "nothing was re-run"

        done = client.post(button, headers={**cookie, "Origin": base})
        assert done.status_code == 303
        assert done.headers["location"].startswith(f"/dashboard?done=rerun&id={job_id}")
        assert _job_count(url) == before + 1
        scripted = client.post(button, headers={"X-API-Key": keys["operator"]})
        assert scripted.status_code == 303
        assert _job_count(url) == before + 2
        # The API's own actions: a bearer key without browser headers works; a browser
        # request of another site is refused even with a key.
        api = f"/api/jobs/{job_id}/rerun"
        bearer = {"Authorization": f"Bearer {keys['operator']}"}
        assert client.post(api, headers=bearer).status_code == 201
        assert client.post(api, headers={**bearer, "Origin": "http://evil.example"}
                           ).status_code == 403
        assert _job_count(url) == before + 3
