#!/usr/bin/env python3
"""Drives the web portal in Debian's chromium with playwright, as the
suite's `portal::` test asks (one JSON object on argv[1]), and prints what
it saw as JSON lines: {"progress": ...} while it waits, then {"result": ...}.

For each user: logs in with its API token on the login page, opens every
page, records each page's status and any text of another customer it
shows, and (for one user) sends a configuration change to a group from
the send page and watches the job's page update by itself (no reload by
this script) until every destination finished. Screenshots of each page
go to `screenshots` when given. Console messages (a CSP violation shows
there) are recorded too.
"""
import json
import re
import sys
import time

from playwright.sync_api import sync_playwright

cfg = json.loads(sys.argv[1])
base = cfg["base"]
started = time.monotonic()
result = {"pages": {}, "leaks": [], "console": [], "who": {}, "after_logout": {}, "job": None,
          "uploaded": None}


def say(**kw):
    print(json.dumps(kw), flush=True)


with sync_playwright() as p:
    browser = p.chromium.launch(
        executable_path=cfg["chromium"],
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ],
    )
    for user in cfg["users"]:
        ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 860})
        page = ctx.new_page()
        page.set_default_timeout(30_000)
        page.on("console", lambda m, u=user["name"]: result["console"].append(f"{u}: {m.type}: {m.text}"))
        # Every page sends a visitor without a session to the login.
        page.goto(base + "/portal/")
        if "/portal/login" not in page.url:
            result["leaks"].append(f"{user['name']}: /portal/ without a session showed {page.url}")
        page.fill("#token", user["token"])
        page.click("form:has(#token) button[type=submit]")
        try:
            page.wait_for_url(re.compile(r".*/portal/$"))
        except Exception:
            print(f"login as {user['name']} stayed at {page.url}: {page.content()}", file=sys.stderr)
            raise
        result["who"][user["name"]] = page.text_content("#who")
        for path in cfg["pages"] + user.get("pages", []):
            resp = page.goto(base + path)
            result["pages"][f"{user['name']} {path}"] = resp.status if resp else 0
            html = page.content()
            for f in user["forbidden"]:
                if f in html:
                    result["leaks"].append(f"{user['name']}: {path} shows {f}")
            shots = user.get("screenshots")
            if shots:
                name = path[len("/portal/"):].split("?")[0] or "fleet"
                page.screenshot(path=f"{shots}/{name}.png", full_page=False)
        upload = user.get("upload")
        if upload:
            # A file published with the upload form: it is listed, with the
            # SHA-256 of its bytes.
            page.goto(base + "/portal/files")
            page.set_input_files("#u-file", upload["path"])
            page.click("#upload")
            page.wait_for_url(re.compile(r".*/portal/files$"))
            html = page.content()
            result["uploaded"] = upload["name"] in html and upload["sha256"] in html
        send = user.get("send")
        if send:
            page.goto(base + "/portal/send")
            page.select_option("#target", send["target"])
            page.select_option("#action", "configChange")
            page.fill("#config", send["config"])
            page.click("#send")
            page.wait_for_url(re.compile(r".*/portal/job\?id=.*"))
            job_id = page.url.split("id=", 1)[1]
            first = page.text_content("#job-state")
            say(progress={"job": job_id, "state": first, "progress": page.text_content("#progress")})
            # From here on the page updates itself (it reloads while the
            # job runs); this script only reads it.
            seen = [first]
            for _ in range(240):
                page.wait_for_timeout(500)
                try:
                    st = page.text_content("#job-state", timeout=2_000)
                except Exception:
                    continue
                if st != seen[-1]:
                    seen.append(st)
                if st == "done":
                    break
            targets = {
                r.get_attribute("data-id"): r.query_selector(".pill").text_content()
                for r in page.query_selector_all("tr.target")
            }
            result["job"] = {"id": job_id, "states": seen, "targets": targets,
                             "secs": round(time.monotonic() - started, 1)}
            if send.get("screenshot"):
                page.screenshot(path=send["screenshot"], full_page=False)
        page.click("header button[type=submit]")
        page.wait_for_url(re.compile(r".*/portal/login$"))
        page.goto(base + "/portal/jobs")
        result["after_logout"][user["name"]] = page.url
        ctx.close()
        result.setdefault("secs", {})[user["name"]] = round(time.monotonic() - started, 1)
    browser.close()

say(result=result)
