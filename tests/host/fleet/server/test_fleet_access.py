"""Fleet server hardening: the API token on by default, the Host allow-list (DNS rebinding),
cross-site requests refused, the dashboard's login in a real Chromium, verified signers."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fleet_helpers import get_json, wait_for

from edgepack.agent.errors import EdgepackError
from edgepack.host.fleet.api import rollout_start
from edgepack.host.fleet.dashboard.access import load_token
from edgepack.host.fleet.server import ServeConfig

pytestmark = pytest.mark.broker


def _call(url: str, method: str = "GET", body: bytes | None = None,
          **headers: str) -> tuple[int, dict, dict]:
    """``(status, headers, json body)`` of one request."""
    if method == "POST" and body is None:
        body = b"{}"
    req = urllib.request.Request(url, method=method, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"{}")


JSON = {"Content-Type": "application/json"}


def test_token_file_is_made_once_0600_and_reused(tmp_path):
    token, path, created = load_token(tmp_path / "srv")
    assert created and len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_token(tmp_path / "srv") == (token, path, False)
    path.chmod(0o644)  # a token others can read is refused, not used
    with pytest.raises(EdgepackError, match="chmod 600"):
        load_token(tmp_path / "srv")


def test_signer_shown_only_when_verified(fleet_keys):
    from edgepack.agent.protocol import chunk_table_payload
    from edgepack.agent.signing import canonical_json, load_public_keys
    from edgepack.host.fleet.dashboard.signers import signer_of
    from edgepack.host.keys import load_private_key, sign_bytes

    priv, pub = fleet_keys
    keys = load_public_keys([pub])
    table = chunk_table_payload("ab" * 32, 10, 10, ["cd" * 32])
    sig = sign_bytes(canonical_json(table), load_private_key(priv))
    kid, status = signer_of({**table, "table_sig": sig}, keys)
    assert status == "verified" and kid == sig["key_id"]
    forged = {**sig, "sig": sig["sig"][:-4] + ("AAA=" if sig["sig"][-4:] != "AAA=" else "BBB=")}
    assert signer_of({**table, "table_sig": forged}, keys) == (None, "unverified")
    assert signer_of({**table, "table_sig": sig}, {}) == (None, "unverified")  # not trusted
    assert signer_of({**table, "chunks": ["ee" * 32], "table_sig": sig}, keys) == \
        (None, "unverified")
    assert signer_of(table, keys) == (None, "unsigned")


def test_no_auth_only_on_loopback(tmp_path):
    cfg = ServeConfig(broker="mqtt://127.0.0.1", http=("0.0.0.0", 0), auth=False)
    with pytest.raises(EdgepackError, match="only allowed on a loopback") as e:
        cfg.policy()
    assert e.value.context["field"] == "auth"
    policy, path = ServeConfig(broker="mqtt://127.0.0.1", http=("127.0.0.1", 0),
                               auth=False).policy()
    assert policy.token is None and path is None
    # off loopback, reads need the token too
    policy, path = ServeConfig(broker="mqtt://127.0.0.1", http=("0.0.0.0", 0),
                               data_dir=str(tmp_path)).policy()
    assert not policy.public_reads and path == tmp_path / "fleet-token"


def test_auth_host_and_cross_site_over_http(sqlite_url, fleet, serve):
    server = serve(sqlite_url, fleet, serve_options={"allowed_hosts": ("fleet.example",)})
    assert server.token_file is not None and server.token_file.read_text().strip() == \
        server.token
    base = server.url + "api/"
    port = server.http.server_address[1]
    # DNS rebinding: a page on another name that resolves here gets nothing
    assert _call(base + "overview", Host=f"evil.example:{port}")[0] == 421
    assert _call(base + "overview", Host=f"localhost:{port}")[0] == 200
    assert _call(base + "overview", Host=f"fleet.example:{port}")[0] == 200
    assert _call(base + "rollouts/x/pause", "POST", Host="evil.example", **JSON)[0] == 421
    # changing calls need the token (default on, no token given)
    status, _, body = _call(base + "rollouts/x/pause", "POST", **JSON)
    assert status == 401 and "API token" in body["message"]
    bearer = {"Authorization": f"Bearer {server.token}"}
    assert _call(base + "rollouts/x/pause", "POST", **JSON,
                 Authorization="Bearer wrong")[0] == 401
    assert _call(base + "rollouts/x/pause", "POST", **JSON, **bearer)[0] == 409
    # ... and never from another site, token or not
    assert _call(base + "rollouts/x/pause", "POST", **JSON, **bearer,
                 Origin="http://evil.example")[0] == 403
    assert _call(base + "rollouts/x/pause", "POST", **JSON, **bearer,
                 **{"Sec-Fetch-Site": "same-site"})[0] == 403
    assert _call(base + "rollouts/x/pause", "POST", **JSON, **bearer,
                 Origin=f"http://127.0.0.1:{port}")[0] == 409
    # the login trades the token for a SameSite=Strict, HttpOnly session cookie
    assert _call(base + "login", "POST", json.dumps({"token": "no"}).encode(), **JSON)[0] == 401
    assert _call(base + "login", "POST", json.dumps({"token": server.token}).encode(), **JSON,
                 Origin="http://evil.example")[0] == 403
    status, headers, _ = _call(base + "login", "POST",
                               json.dumps({"token": server.token}).encode(), **JSON)
    cookie = headers["Set-Cookie"]
    assert status == 200 and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    session = cookie.split(";")[0]
    assert _call(base + "session", Cookie=session)[2]["authenticated"] is True
    assert _call(base + "rollouts/x/pause", "POST", **JSON, Cookie=session)[0] == 409
    _call(base + "logout", "POST", Cookie=session, **JSON)
    assert _call(base + "rollouts/x/pause", "POST", **JSON, Cookie=session)[0] == 401
    # clickjacking: the dashboard never renders in a frame
    assert "frame-ancestors 'none'" in _call(base + "session")[1]["Content-Security-Policy"]


def test_private_reads(sqlite_url, fleet, serve):
    server = serve(sqlite_url, fleet, serve_options={"public_reads": False})
    assert _call(server.url + "api/overview")[0] == 401
    assert _call(server.url + "metrics")[0] == 401
    bearer = {"Authorization": f"Bearer {server.token}"}
    assert _call(server.url + "api/overview", **bearer)[0] == 200
    req = urllib.request.Request(server.url + "metrics", headers=bearer)
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    # the page shell itself is served (it shows the login)
    with urllib.request.urlopen(server.url, timeout=10) as r:
        assert b"login-token" in r.read()


def test_wrong_tokens_are_throttled_per_address(sqlite_url, fleet, serve):
    """Ten wrong tokens within a minute (login or bearer) and the address gets 429 with the
    wait, even for the right token, until the window passes; others are not affected."""
    server = serve(sqlite_url, fleet, serve_options={"public_reads": False})
    base = server.url + "api/"
    for i in range(10):
        wrong = json.dumps({"token": f"guess-{i}"}).encode()
        assert _call(base + "login", "POST", wrong, **JSON)[0] == 401
    status, _, body = _call(base + "login", "POST",
                            json.dumps({"token": server.token}).encode(), **JSON)
    assert status == 429 and "too many wrong tokens" in body["message"]
    bearer = {"Authorization": f"Bearer {server.token}"}
    assert _call(base + "rollouts/x/pause", "POST", **JSON, **bearer)[0] == 429
    assert _call(base + "overview", **bearer)[0] == 429


def test_throttle_window_and_bound() -> None:
    from edgepack.host.fleet.dashboard.access import Throttle

    now = [100.0]
    t = Throttle(limit=3, window_s=60, max_clients=2, clock=lambda: now[0])
    for _ in range(3):
        assert t.retry_after("a") == 0
        t.failed("a")
    assert t.retry_after("a") == pytest.approx(60)
    now[0] += 30
    assert t.retry_after("a") == pytest.approx(30) and t.retry_after("b") == 0
    now[0] += 31
    assert t.retry_after("a") == 0  # the window passed
    for client in ("b", "c", "d"):
        t.failed(client)
    assert len(t._failures) == 2  # bounded: the oldest address is forgotten


def _doc_block(after: str) -> str:
    """The first ```sh block after the line starting with ``after`` in docs/fleet-api.md."""
    text = (Path(__file__).parents[4] / "docs" / "fleet-api.md").read_text()
    rest = text[text.index(after):]
    return rest.split("```sh\n", 1)[1].split("```", 1)[0]


def _attack_page(target: str) -> str:
    """A page on another site that posts to the dashboard with the victim's cookies."""
    return ("<html><body><form id=f method=POST enctype=text/plain action='" + target
            + "'><input name='{\"a\":\"' value='\"}'></form>"
            "<script>document.getElementById('f').submit()</script></body></html>")


def test_dashboard_login_buttons_and_cross_site_in_chromium(page, sqlite_url, mosquitto, fleet,
                                                            serve, simulate, sim_bundle,
                                                            fleet_keys):
    key, pub = fleet_keys
    server = serve(sqlite_url, fleet, serve_options={"trusted_keys": (str(pub),)})
    simulate(fleet, 4, interval_s=0.3)
    wait_for(lambda: len(server.store.devices.list(fleet)) == 4, 15, what="devices stored")
    r = rollout_start(sim_bundle("2.0.0", size=5000), group="sim", broker=mosquitto.url,
                      db=server.store, fleet=fleet, stages="50,100", soak="600s", key=key)
    base = server.url
    # the dashboard names the signer only once the server verified it against trusted_keys
    b = wait_for(lambda: (x := get_json(f"{base}api/bundles/{r.rollout.bundle_id}?fleet={fleet}"))
                 ["signature"] == "verified" and x, 20, what="the verified signer")
    assert b["signed_by"] and len(b["signed_by"]) == 16

    page.goto(f"{base}rollouts/{r.id}?fleet={fleet}")
    page.wait_for_selector("button[data-action=pause]")
    assert page.locator("#login").is_visible()
    # not logged in: the button's POST gets 401 and nothing changes
    page.click("button[data-action=pause]")
    page.wait_for_selector("#login[data-needed=pause]")  # the 401 asks for the login
    assert get_json(f"{base}api/rollouts/{r.id}")["state"] == "running"
    # a wrong token is refused
    page.fill("#login-token", "not-the-token")
    page.click("#login button[type=submit]")
    wait_for(lambda: page.locator("#login").get_attribute("data-error"), 10, what="refusal")
    # logged in: the buttons pause and resume the rollout
    page.fill("#login-token", server.token)
    page.click("#login button[type=submit]")
    page.wait_for_selector("#logout:not([hidden])")
    assert not page.locator("#login").is_visible()
    page.click("button[data-action=pause]")
    page.wait_for_selector("button[data-action=resume]", timeout=10_000)
    assert get_json(f"{base}api/rollouts/{r.id}")["state"] == "paused"
    page.click("button[data-action=resume]")
    page.wait_for_selector("button[data-action=pause]", timeout=10_000)
    assert get_json(f"{base}api/rollouts/{r.id}")["state"] == "running"

    # a page on another site (and one on another port of this host: same-site, so the
    # SameSite cookie goes along) posts to the dashboard while the browser is logged in
    target = f"{base}api/rollouts/{r.id}/pause"
    for origin in ("http://evil.test", "http://127.0.0.1:9"):
        page.route(f"{origin}/attack", lambda route, o=origin: route.fulfill(
            body=_attack_page(target), content_type="text/html"))
        page.goto(f"{origin}/attack")
        page.wait_for_url(target)
        assert "cross-site request refused" in page.inner_text("body")
    assert get_json(f"{base}api/rollouts/{r.id}")["state"] == "running"

    # docs/fleet-api.md's shell example, verbatim, in the directory of fleet-token
    out = subprocess.run(["bash", "-euc", _doc_block("Calling the API from a shell")],
                         cwd=server.token_file.parent, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "FLEET": base.rstrip("/"),
                                          "ROLLOUT": r.id})
    assert out.returncode == 0, out.stderr
    states = [json.loads(line)["state"] for line in out.stdout.replace("}{", "}\n{")
              .splitlines() if line.strip()]
    assert states == ["running", "paused", "running"]
    assert not [e for e in page.js_errors if "favicon" not in e and "401" not in e
                and "403" not in e], page.js_errors
