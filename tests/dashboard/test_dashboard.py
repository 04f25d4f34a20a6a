"""The dashboard: sessions, CSRF, escaping and headers over HTTP, then in Chromium."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from control_plane.sessions import COOKIE, SESSION_S
from db import queries
from tests.fake_agent import write_fake_model
from tests.harness import ADMIN_KEY, Api, app_state, make_settings, mark_measured, serve
from tests.harness import wait_status as wait_for_status

FAKE_AGENT = [sys.executable, str(Path(__file__).resolve().parents[1] / "fake_agent.py")]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
async def dapi(db_dsn: str, tmp_path: Path) -> AsyncIterator[Api]:
    models = tmp_path / "models"
    write_fake_model(models, "fake/ok", mode="ok", delay_s=0.01)
    write_fake_model(models, "fake/two", mode="ok", delay_s=0.01)
    settings = make_settings(
        db_dsn,
        tmp_path / "data",
        model_dirs=str(models),
        agent_command=FAKE_AGENT,
        start_timeout_s=10.0,
        include_packaged_models=False,
    )
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        for name in ("fake/ok", "fake/two"):
            await mark_measured(api, name, 50_000_000)
        yield api


async def sign_in(api: Api, jar: aiohttp.ClientSession, key: str = ADMIN_KEY) -> str:
    """Sign in; the CSRF token of the session's pages."""
    async with jar.post(
        api.base + "/dashboard/login", data={"key": key}, allow_redirects=False
    ) as resp:
        assert resp.status == 303, await resp.text()
        cookie = resp.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
        assert key not in cookie
    async with jar.get(api.base + "/dashboard") as resp:
        page = await resp.text()
    assert key not in page
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match
    return match[1]


async def test_sign_in_pages_and_headers(dapi: Api) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as jar:
        async with jar.get(dapi.base + "/dashboard") as resp:
            assert resp.status == 200 and 'name="key"' in await resp.text()  # the sign-in form
            csp = resp.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        await sign_in(dapi, jar)
        for path, needle in (
            ("/dashboard", "No live instances"),
            ("/dashboard/models", "fake/ok"),
            ("/dashboard/capacity", "cpu"),
            ("/dashboard/keys", "admin"),
        ):
            async with jar.get(dapi.base + path) as resp:
                assert resp.status == 200 and needle in await resp.text(), path
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
        async with jar.get(dapi.base + "/dashboard/static/app.js") as resp:
            assert resp.status == 200 and "EventSource" in await resp.text()
        async with jar.get(dapi.base + "/dashboard/static/..%2Fsessions.py") as resp:
            assert resp.status == 404


async def test_bad_sessions_and_csrf_are_refused(dapi: Api) -> None:
    state = app_state(dapi)
    status, user = await dapi.call("POST", "/admin/keys", {"name": "bob", "scope": "user"})
    assert status == 201
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as jar:
        # A user key, a wrong key, a form that is not a form.
        async with jar.post(dapi.base + "/dashboard/login", data={"key": user["key"]}) as resp:
            assert resp.status == 403 and "needs an admin key" in await resp.text()
        async with jar.post(dapi.base + "/dashboard/login", data={"key": "mlcp_nope"}) as resp:
            assert resp.status == 401
        async with jar.post(dapi.base + "/dashboard/login", json={"key": ADMIN_KEY}) as resp:
            assert resp.status == 415
        async with jar.post(
            dapi.base + "/dashboard/login", data=b"key=" + b"x" * 5000, headers=FORM
        ) as resp:
            assert resp.status == 413
        async with jar.post(dapi.base + "/dashboard/login", data=b"key=\xff", headers=FORM) as resp:
            assert resp.status == 400
    admin_id = next(k.id for k in await queries.list_keys(state.pool) if k.scope == "admin")
    good, _ = state.signer.issue(admin_id)
    expired, _ = state.signer.issue(admin_id, now=time.time() - SESSION_S - 60)
    forged = good[:-4] + ("0000" if not good.endswith("0000") else "1111")
    other_id = good.replace(f"{admin_id}.", "999.", 1)
    for cookie in (expired, forged, other_id, "garbage", "1.2.3.4.5", "x" * 400):
        async with aiohttp.ClientSession(cookies={COOKIE: cookie}) as jar:
            async with jar.get(dapi.base + "/dashboard") as resp:
                text = await resp.text()
                assert resp.status == 401 and 'name="key"' in text, cookie
            async with jar.post(
                dapi.base + "/dashboard/stop", data={"model": "fake/ok", "csrf": "x"}
            ) as resp:
                assert resp.status == 401
            async with jar.get(dapi.base + "/events?follow=0") as resp:
                assert resp.status == 401
    # A valid session: actions need its CSRF token.
    status, _ = await dapi.call("POST", "/model/load", {"model": "fake/ok"})
    assert status == 200
    await wait_for_status(dapi, "fake/ok", "RUNNING")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as jar:
        csrf = await sign_in(dapi, jar)
        for data in ({"model": "fake/ok"}, {"model": "fake/ok", "csrf": "wrong"}):
            async with jar.post(dapi.base + "/dashboard/stop", data=data) as resp:
                assert resp.status == 403 and "CSRF" in await resp.text()
        assert (await wait_for_status(dapi, "fake/ok", "RUNNING"))["status"] == "RUNNING"
        async with jar.post(
            dapi.base + "/dashboard/stop", data={"model": "no/such", "csrf": csrf}
        ) as resp:
            assert resp.status == 404
        async with jar.post(
            dapi.base + "/dashboard/logout", data={"csrf": csrf}, allow_redirects=False
        ) as resp:
            assert resp.status == 303
        async with jar.post(
            dapi.base + "/dashboard/stop", data={"model": "fake/ok", "csrf": csrf}
        ) as resp:
            assert resp.status in (200, 401)  # signed out: the sign-in page, nothing stopped
        assert (await wait_for_status(dapi, "fake/ok", "RUNNING"))["status"] == "RUNNING"


async def test_html_in_names_is_escaped(dapi: Api) -> None:
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    status, _ = await dapi.call("POST", "/admin/keys", {"name": evil, "scope": "user"})
    assert status == 201
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as jar:
        await sign_in(dapi, jar)
        async with jar.get(dapi.base + "/dashboard/keys") as resp:
            page = await resp.text()
    assert evil not in page and "&lt;script&gt;" in page and "<img src=x" not in page


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make test installs it)")
async def test_dashboard_in_chromium(dapi: Api, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(dapi.base + "/dashboard")
            await page.fill('input[name="key"]', ADMIN_KEY)
            await page.click('button[type="submit"]')
            await page.wait_for_selector("text=No live instances")
            await page.evaluate("window.__notReloaded = true")
            # Loaded through the API: the list updates from the event stream, without a reload.
            status, _ = await dapi.call(
                "POST", "/model/load", {"model": "fake/ok", "expirationPeriodSeconds": 120}
            )
            assert status == 200
            row = page.locator('tr[data-model="fake/ok"]')
            await row.locator("text=RUNNING").wait_for(timeout=20_000)
            assert await page.evaluate("window.__notReloaded === true")
            countdown = row.locator(".countdown")
            first = int(await countdown.get_attribute("data-left") or "0")
            await asyncio.sleep(2.5)
            second = int(await countdown.get_attribute("data-left") or "0")
            assert 0 < second < first <= 120, (first, second)
            await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            await row.locator("button.stop").click()
            await page.wait_for_selector("text=No live instances", timeout=20_000)
            assert await row.count() == 0
            assert (tmp_path / "dashboard.png").stat().st_size > 1000
            # The keys page: this month's calls per key (one run through the API here).
            run = {"model": "fake/two", "prompt": "x"}
            assert (await dapi.call("POST", "/model/load", {"model": "fake/two"}))[0] == 200
            await wait_for_status(dapi, "fake/two", "RUNNING")
            assert (await dapi.call("POST", "/model/run", run))[0] == 200
            await page.goto(dapi.base + "/dashboard/keys")
            admin_row = page.locator("tr", has_text="bootstrap admin")
            assert (await admin_row.locator("td.calls").inner_text()).strip() == "1"
            await page.screenshot(path=str(tmp_path / "keys.png"), full_page=True)
            assert errors == []
        finally:
            await browser.close()
    status, body = await dapi.call("POST", "/model/status", {"model": "fake/ok"})
    assert body["status"] == "STOPPED"


async def test_keys_page_shows_this_months_usage(dapi: Api) -> None:
    status, body = await dapi.call("POST", "/model/load", {"model": "fake/two"})
    assert status == 200, body
    await wait_for_status(dapi, "fake/two", "RUNNING")
    status, erin = await dapi.call(
        "POST", "/admin/keys", {"name": "erin", "monthlyCalls": 5, "requestsPerMinute": 30}
    )
    assert status == 201
    for _ in range(2):
        run = {"model": "fake/two", "prompt": "x"}
        assert (await dapi.call("POST", "/model/run", run, key=erin["key"]))[0] == 200
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as jar:
        await sign_in(dapi, jar)
        async with jar.get(dapi.base + "/dashboard/keys") as resp:
            assert resp.status == 200
            page = await resp.text()
    row = re.search(rf'<tr data-key="{erin["id"]}">(.*?)</tr>', page, re.S)
    assert row, page
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row[1], re.S)
    assert re.sub(r"<meter[^>]*></meter>", "", cells[6]).split() == ["2", "/", "5"], cells
    assert 'max="5" value="2"' in cells[6]
    assert [c.strip() for c in cells[7:]] == ["5", "30", "-", "-"], cells
    assert erin["key"] not in page
