"""The browser client (``[server] browser_page = yes``) in a real browser, end to end.

Debian's chromium, headless, driven by playwright from the client namespace (which reaches
nothing but the lab's server: no CDN could be used if the page wanted one), loads the page
from nginx + fcgiwrap over HTTPS (a self-signed certificate, pinned by its public key) and
knocks through the real webknockd: a key is made and shown, enrolled with ``webknockctl
client add``, Knock opens the ports for the browser's address only, a reload keeps the key,
Keep open renews, ``client remove --revoke`` closes the ports and the page says why its next
knock fails. The page's codec reproduces every protocol vector, the refusals read as plain
language, and over plain HTTP the page says it needs HTTPS.

:func:`driver_main` is the driver: it runs in the client namespace and takes one JSON
command a line on stdin, answering each with one JSON line on stdout; :class:`Browser` is
the test's side of it, every wait bounded.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab import CLIENT4, OTHER4, SERVER4, Deployment, LabError, Nginx, deployment

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
HTTPS_URL = f"https://{SERVER4}/webknock"
HTTP_URL = f"http://{SERVER4}/webknock"
DRIVER_BOOT = "from tests.e2e.test_browser import driver_main; driver_main()"
CHROMIUM_ARGS = [
    "--no-sandbox",  # root
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
PHONE = {"width": 360, "height": 740}
#: The page's codec checked in the browser against tests/vectors/v2.json: every case signed
#: (byte for byte), every packet and reply verified, the must_refuse cases refused.
VECTORS_JS = """async (v) => {
  const wk = window.webknock;
  const fromHex = (h) => Uint8Array.from(h.match(/../g).map((x) => parseInt(x, 16)));
  const dec = new TextDecoder();
  const ed = {name: "Ed25519"};
  const refused = async (promise) => { try { await promise; return false; } catch (e) { return true; } };
  const out = {};
  for (const who of ["client", "server"]) {
    const pkcs8 = fromHex("302e020100300506032b657004220420" + v[who].seed_hex);
    const priv = await crypto.subtle.importKey("pkcs8", pkcs8, ed, true, ["sign"]);
    const jwk = await crypto.subtle.exportKey("jwk", priv);
    const raw = wk.unb64url(jwk.x);
    out[who] = {keyText: wk.keyText(raw), parsed: wk.hex(wk.parseKeyText(v[who].public)),
                raw: wk.hex(raw), kid: wk.hex(await wk.kid(raw))};
  }
  const client = wk.parseKeyText(v.client.public), server = wk.parseKeyText(v.server.public);
  const serverKid = await wk.kid(server);
  const priv = await crypto.subtle.importKey(
    "pkcs8", fromHex("302e020100300506032b657004220420" + v.client.seed_hex), ed, false, ["sign"]);
  out.cases = [];
  for (const c of v.cases) {
    const body = wk.requestBody(JSON.parse(c.body));
    const packet = await wk.encodeRequest(priv, client, serverKid, body);
    const theirs = fromHex(c.packet_hex);
    const flipBody = theirs.slice(); flipBody[flipBody.length - 1] ^= 1;
    const flipSig = theirs.slice(); flipSig[12 + 10] ^= 1;
    out.cases.push({
      name: c.name,
      body: dec.decode(body),
      packet_hex: wk.hex(packet),
      form: "v2=" + wk.b64url(packet),
      request_body: dec.decode(await wk.verifyRequest(client, serverKid, theirs)),
      reply_body: dec.decode(await wk.verifyReply(server, theirs, fromHex(c.reply_hex))),
      flipped_body_refused: await refused(wk.verifyRequest(client, serverKid, flipBody)),
      flipped_signature_refused: await refused(wk.verifyRequest(client, serverKid, flipSig)),
      other_server_refused: await refused(wk.verifyRequest(client, client.slice(0, 8), theirs)),
    });
  }
  const byName = Object.fromEntries(v.cases.map((c) => [c.name, c]));
  out.reply_to_other_request_refused = await refused(wk.verifyReply(
    server, fromHex(byName.openports.packet_hex), fromHex(byName.getinfo.reply_hex)));
  const tampered = fromHex(byName.getinfo.reply_hex); tampered[tampered.length - 2] ^= 1;
  out.tampered_reply_refused = await refused(
    wk.verifyReply(server, fromHex(byName.getinfo.packet_hex), tampered));
  out.bad_key_text_refused = await refused((async () => wk.parseKeyText("wk2:AAAA"))());
  return out;
}"""


# -- the driver (client namespace) ---------------------------------------------------------


def driver_main() -> None:
    """(Client namespace) One headless chromium through playwright: options as argv[1]
    (JSON), then commands on stdin, one JSON answer line each."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import ViewportSize, sync_playwright

    opts = json.loads(sys.argv[1])
    size = opts.get("viewport") or PHONE
    viewport: ViewportSize = {"width": int(size["width"]), "height": int(size["height"])}
    log: dict[str, list[Any]] = {"requests": [], "console": [], "errors": []}

    def answer(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    with sync_playwright() as pw:
        args = list(CHROMIUM_ARGS)
        if opts.get("spki"):
            args.append(f"--ignore-certificate-errors-spki-list={opts['spki']}")
        context = pw.chromium.launch_persistent_context(
            opts["profile"],
            executable_path=CHROMIUM,
            headless=True,
            args=args,
            viewport=viewport,
            is_mobile=bool(opts.get("mobile", True)),
            has_touch=bool(opts.get("mobile", True)),
            device_scale_factor=2,
            timezone_id="UTC",
            locale="en-GB",
            service_workers="block",
            timeout=30000,
        )
        context.set_default_timeout(20000)
        if opts.get("init_script"):
            context.add_init_script(opts["init_script"])
        context.on("request", lambda r: log["requests"].append([r.method, r.url]))
        page = context.pages[0] if context.pages else context.new_page()
        page.on("console", lambda m: log["console"].append([m.type, m.text]))
        page.on("pageerror", lambda e: log["errors"].append(str(e)))

        def response(resp: Any) -> dict[str, Any]:
            if resp is None:
                return {"status": None, "headers": {}}
            return {"status": resp.status, "headers": resp.all_headers()}

        answer({"ok": True, "value": "ready"})
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd["op"]
            try:
                if op == "quit":
                    answer({"ok": True, "value": None})
                    break
                if op == "goto":
                    value: Any = response(page.goto(cmd["url"], wait_until="load"))
                elif op == "reload":
                    value = response(page.reload(wait_until="load"))
                elif op == "eval":
                    value = page.evaluate(cmd["js"], cmd.get("arg"))
                elif op == "wait":
                    timeout = float(cmd.get("timeout", 20)) * 1000
                    page.wait_for_function(cmd["js"], arg=cmd.get("arg"), timeout=timeout)
                    value = page.evaluate(cmd["js"], cmd.get("arg"))
                elif op == "click":
                    page.click(cmd["sel"])
                    value = None
                elif op == "key":
                    page.keyboard.press(cmd["key"])
                    value = None
                elif op == "screenshot":
                    page.screenshot(path=cmd["path"], full_page=True)
                    value = cmd["path"]
                elif op == "log":
                    value = log
                else:
                    raise ValueError(f"unknown op {op!r}")
            except (PlaywrightError, ValueError) as exc:
                answer({"ok": False, "error": f"{op}: {exc}"})
                continue
            answer({"ok": True, "value": value})
        context.close()


# -- the test's side ------------------------------------------------------------------------

#: A snapshot of what the page shows, through its stable hooks.
STATE_JS = """() => {
  const $ = (id) => document.getElementById(id);
  return {
    state: $("wk-status").dataset.state,
    status: $("wk-status").textContent,
    until: $("wk-status").dataset.until || null,
    detail: $("wk-detail").textContent,
    countdown: $("wk-countdown").textContent,
    pubkey: $("wk-pubkey").textContent,
    address: $("wk-address").textContent,
    knock_disabled: $("wk-knock").disabled,
    busy: $("wk-knock").getAttribute("aria-busy") === "true",
    keep: $("wk-keep").getAttribute("aria-pressed") === "true",
    secure: window.isSecureContext,
  };
}"""
#: The page has settled: whatever it was doing on load or on a click is done.
SETTLED_JS = """() => {
  const s = document.getElementById("wk-status").dataset.state;
  return s !== "loading" && s !== "busy" &&
    document.getElementById("wk-knock").getAttribute("aria-busy") !== "true";
}"""


class BrowserError(AssertionError):
    pass


class Browser:
    """A headless chromium in `ns` (a fresh profile of its own) driven by :func:`driver_main`."""

    def __init__(self, d: Deployment, *, secure: bool = True, **opts: Any) -> None:
        self.d = d
        self.profile = Path(tempfile.mkdtemp(prefix="webknock-chromium-"))
        self.home = self.profile / "home"
        self.home.mkdir()
        self.stderr_path = self.profile / "driver.log"
        nginx = d.web
        assert isinstance(nginx, Nginx)
        options = {"profile": str(self.profile / "user-data"), **opts}
        if secure:
            options["spki"] = nginx.spki
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.home),
            "PYTHONPATH": str(REPO),
            "TZ": "UTC",
            "LANG": "C.UTF-8",
        }
        python = Path(os.environ.get("WEBKNOCK_VENV", "/var/tmp/webknock-venv")) / "bin/python3"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                d.lab.client.cmd([str(python), "-c", DRIVER_BOOT, json.dumps(options)]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                cwd=REPO,
                start_new_session=True,
            )
        self._buf = b""
        try:
            self._read(60)
        except BaseException:
            self.close()
            raise

    def _read(self, seconds: float) -> Any:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + seconds
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"the browser driver did not answer in {seconds} s{self.tail()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise BrowserError(f"the browser driver exited{self.tail()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        reply = json.loads(line)
        if not reply["ok"]:
            raise BrowserError(f"{reply['error']}{self.tail()}")
        return reply["value"]

    def tail(self) -> str:
        text = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return f"\n--- driver stderr\n{text[-3000:]}" if text.strip() else ""

    def call(self, op: str, wall: float = 60, **params: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **params}) + "\n").encode())
        self.proc.stdin.flush()
        return self._read(wall)

    def goto(self, url: str) -> dict[str, Any]:
        value: dict[str, Any] = self.call("goto", url=url)
        self.settle()
        return value

    def reload(self) -> dict[str, Any]:
        """Reload the page; what it shows once settled."""
        self.call("reload")
        return self.settle()

    def eval(self, js: str, arg: Any = None) -> Any:
        return self.call("eval", js=js, arg=arg)

    def wait(self, js: str, seconds: float = 20, arg: Any = None) -> Any:
        """Wait until `js` (a function of `arg`) is truthy in the page; its value."""
        try:
            return self.call("wait", wall=seconds + 30, js=js, arg=arg, timeout=seconds)
        except BrowserError as exc:
            raise BrowserError(f"{exc}\npage: {self.state()}\n{self.d.diagnostics()}") from None

    def settle(self, seconds: float = 30) -> dict[str, Any]:
        self.wait(SETTLED_JS, seconds)
        return self.state()

    def state(self) -> dict[str, Any]:
        value: dict[str, Any] = self.eval(STATE_JS)
        return value

    def click(self, sel: str) -> dict[str, Any]:
        """Click and wait until the page is done with what the click started."""
        self.call("click", sel=sel)
        return self.settle()

    def log(self) -> dict[str, list[Any]]:
        value: dict[str, list[Any]] = self.call("log")
        return value

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.call("quit", wall=20)
                except (BrowserError, OSError):
                    pass
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
        finally:
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    stream.close()
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def site() -> Iterator[Deployment]:
    """One nginx deployment with the browser page on, over HTTP and HTTPS, for the module."""
    if not (Path(CHROMIUM).exists() and shutil.which("openssl")):
        pytest.skip("chromium or openssl missing (tests/run installs them)")
    with deployment("nginx", extra={"browser_page": "yes"}) as d:
        assert isinstance(d.web, Nginx)
        d.web.enable_https()
        for tool in ("iptables", "ip6tables"):  # the host policy lets HTTPS in, as it does HTTP
            d.lab.server.run([tool, "-I", "INPUT", "-p", "tcp", "--dport", "443", "-j", "ACCEPT"])
        # another address on the client's link, for the probe that the grant is not its; added
        # before any browser starts (chromium drops requests in flight when addresses change)
        d.lab.add_client_address(OTHER4)
        yield d


def open_browser(d: Deployment, **opts: Any) -> Browser:
    try:
        return Browser(d, **opts)
    except (BrowserError, LabError) as exc:
        raise BrowserError(f"{exc}\n{d.diagnostics()}") from None


@pytest.fixture
def browser(site: Deployment) -> Iterator[Browser]:
    b = open_browser(site)
    try:
        yield b
    finally:
        b.close()


def grants_of(d: Deployment, client: str) -> dict[tuple[str, str, int], int]:
    return {
        (g["ip"], g["proto"], g["port"]): int(g["expires"])
        for g in d.list_json()
        if g["client"] == client
    }


def enrol(d: Deployment, name: str, key: str, *options: str) -> None:
    assert re.fullmatch(r"wk2:[A-Za-z0-9_-]{43}", key), key
    d.ctl("client", "add", name, "--key", key, *options)


def only_own_origin(b: Browser) -> None:
    """Every request the browser made went to the lab server's HTTPS origin, and nothing
    broke the Content-Security-Policy."""
    log = b.log()
    origins = {re.sub(r"^(\w+://[^/]+).*", r"\1", url) for _, url in log["requests"]}
    assert origins <= {f"https://{SERVER4}"}, log["requests"]
    assert not log["errors"], log["errors"]
    violations = [m for m in log["console"] if "Content Security Policy" in m[1]]
    assert not violations, violations


# -- tests ----------------------------------------------------------------------------------


def test_the_page_signs_and_verifies_the_protocol_vectors(
    browser: Browser, v2_vectors: dict[str, Any]
) -> None:
    loaded = browser.goto(HTTPS_URL)
    assert loaded["status"] == 200
    assert "script-src 'nonce-" in loaded["headers"]["content-security-policy"]
    got = browser.eval(VECTORS_JS, v2_vectors)
    for who in ("client", "server"):
        assert got[who]["keyText"] == v2_vectors[who]["public"]
        assert got[who]["parsed"] == got[who]["raw"]
        assert got[who]["kid"] == v2_vectors[who]["kid_hex"]
    assert [c["name"] for c in got["cases"]] == [c["name"] for c in v2_vectors["cases"]]
    for mine, case in zip(got["cases"], v2_vectors["cases"], strict=True):
        assert mine["body"] == case["body"], case["name"]
        assert mine["packet_hex"] == case["packet_hex"], case["name"]
        assert mine["form"] == case["form"], case["name"]
        assert mine["request_body"] == case["body"], case["name"]
        assert mine["reply_body"] == case["reply_body"], case["name"]
        assert mine["flipped_body_refused"], case["name"]
        assert mine["flipped_signature_refused"], case["name"]
        assert mine["other_server_refused"], case["name"]
    assert got["reply_to_other_request_refused"]
    assert got["tampered_reply_refused"]
    assert got["bad_key_text_refused"]
    only_own_origin(browser)


def test_knock_keep_open_and_revoke_in_a_real_browser(site: Deployment, browser: Browser) -> None:
    d = site
    loaded = browser.goto(HTTPS_URL)
    assert loaded["status"] == 200
    first = browser.state()
    assert first["secure"] is True
    assert first["state"] == "new", first
    assert "send it to the admin" in first["status"]
    key = first["pubkey"]
    assert d.site.server_key.public_text() not in key
    # the private key is not extractable; the public one is the key text shown
    facts = browser.eval("""async () => {
      const k = await window.webknock.clientKey();
      let exported = true;
      try { await crypto.subtle.exportKey("pkcs8", k.privateKey); } catch (e) { exported = false; }
      return {extractable: k.privateKey.extractable, exported: exported,
              text: window.webknock.keyText(k.publicRaw)};
    }""")
    assert facts == {"extractable": False, "exported": False, "text": key}
    # a phone screen: nothing wider than the screen, buttons big enough for a thumb
    layout = browser.eval("""() => {
      const r = (id) => document.getElementById(id).getBoundingClientRect();
      return {scroll: document.documentElement.scrollWidth, width: window.innerWidth,
              knock: r("wk-knock").height, keep: r("wk-keep").height};
    }""")
    assert layout["scroll"] <= layout["width"] == PHONE["width"], layout
    assert min(layout["knock"], layout["keep"]) >= 44, layout

    # not enrolled yet: the knock says so, nothing opens
    refused = browser.click("#wk-knock")
    assert refused["state"] == "unenrolled" and "not enrolled" in refused["status"], refused
    assert not grants_of(d, "browser")

    enrol(d, "browser", key, "--ports", "tcp/22,tcp/2222", "--max-time", "15")
    assert not d.agent.tcp_open(SERVER4, CLIENT4, 22)
    # by keyboard: Tab to Knock, Enter
    for _ in range(10):
        if browser.eval("() => document.activeElement && document.activeElement.id") == "wk-knock":
            break
        browser.call("key", key="Tab")
    else:
        pytest.fail("Tab never reached the Knock button")
    browser.call("key", key="Enter")
    opened = browser.settle()
    assert opened["state"] == "open", opened
    grants = grants_of(d, "browser")
    assert set(grants) == {(CLIENT4, "tcp", 22), (CLIENT4, "tcp", 2222)}
    expires = max(grants.values())
    assert opened["until"] == str(expires)
    assert opened["status"] == "open until " + time.strftime("%H:%M", time.gmtime(expires)), opened
    assert "tcp/22" in opened["detail"] and CLIENT4 in opened["detail"]
    assert opened["address"] == CLIENT4
    assert "closes in" in opened["countdown"]
    # the port opened for the browser's address only
    assert d.agent.tcp_open(SERVER4, CLIENT4, 22)
    assert d.agent.tcp_open(SERVER4, CLIENT4, 2222)
    assert not d.agent.tcp_open(SERVER4, OTHER4, 22)

    # a reload keeps the key, and the page asks the server who it is
    again = browser.reload()
    assert again["pubkey"] == key
    assert again["state"] == "ready" and "enrolled as browser" in again["status"], again
    assert again["address"] == CLIENT4

    # keep open: knocks now, then renews every third of the 15 s grant
    kept = browser.click("#wk-keep")
    assert kept["keep"] is True
    browser.wait("() => document.getElementById('wk-status').dataset.state === 'open'")
    renewed = browser.wait(
        """() => {
          const text = document.getElementById("wk-countdown").textContent;
          const renewals = /renewed (\\d+) time/.exec(text);
          return renewals && Number(renewals[1]) >= 4 && text;
        }""",
        seconds=45,
    )
    assert "renews in" in renewed and "closes in" in renewed
    assert time.time() > expires + 1, "kept open past the first grant's end"
    kept_grants = grants_of(d, "browser")
    assert set(kept_grants) == set(grants) and min(kept_grants.values()) > expires
    assert d.agent.tcp_open(SERVER4, CLIENT4, 22)

    # removed and revoked: the port closes at once, keep-open stops and says why
    removed = d.ctl("client", "remove", "browser", "--revoke").stdout
    assert "live grant(s) of client browser" in removed
    assert not grants_of(d, "browser")
    assert not d.agent.tcp_open(SERVER4, CLIENT4, 22)
    stopped = browser.wait(
        "() => document.getElementById('wk-status').dataset.state === 'unenrolled'"
        " && document.getElementById('wk-keep').getAttribute('aria-pressed') === 'false'",
        seconds=20,
    )
    assert stopped
    final = browser.click("#wk-knock")
    assert final["state"] == "unenrolled", final
    assert "not enrolled" in final["status"] and "admin" in final["status"], final
    assert final["pubkey"] == key and final["countdown"] == "", "nothing is shown as open"
    assert not grants_of(d, "browser")
    only_own_origin(browser)


def test_refusals_and_failures_read_as_plain_language(site: Deployment, browser: Browser) -> None:
    d = site
    browser.goto(HTTPS_URL)
    key = browser.state()["pubkey"]
    enrol(d, "faraway", key, "--from", "198.51.100.0/24")
    refused = browser.click("#wk-knock")
    assert refused["state"] == "refused", refused
    assert "does not accept knocks for this key from this network" in refused["status"]
    assert not grants_of(d, "faraway")

    # a clock 150 s fast: refused, and the page says by how much
    skewed = open_browser(
        d, init_script="(() => { const n = Date.now; Date.now = () => n.call(Date) + 150000; })()"
    )
    try:
        skewed.goto(HTTPS_URL)
        enrol(d, "skewed", skewed.state()["pubkey"])
        clock = skewed.click("#wk-knock")
        assert clock["state"] == "clock", clock
        assert re.search(r"clock is 2 min (29|30|31) s ahead of the server's", clock["status"])
        assert "set the clock right" in clock["status"]
        assert not grants_of(d, "skewed")
    finally:
        skewed.close()

    # webknockd down: the CGI times out (504) and the page says the server failed
    d.ctl("client", "remove", "faraway")
    enrol(d, "faraway", key)
    d.site.stop_daemon()
    try:
        failed = browser.click("#wk-knock")
    finally:
        d.site.start_daemon(d.lab.server)
    assert failed["state"] == "failed", failed
    assert "the server failed" in failed["status"] and "nothing was opened" in failed["status"]
    ok = browser.click("#wk-knock")
    assert ok["state"] == "open", ok
    assert set(grants_of(d, "faraway")) == {
        (CLIENT4, proto, port) for proto, port in (("tcp", 22), ("tcp", 2222), ("udp", 51820))
    }
    d.ctl("client", "remove", "faraway", "--revoke")
    d.ctl("client", "remove", "skewed")
    only_own_origin(browser)


def test_plain_http_is_no_secure_context(site: Deployment, browser: Browser) -> None:
    loaded = browser.goto(HTTP_URL)
    assert loaded["status"] == 200
    page = browser.state()
    assert page["secure"] is False
    assert page["state"] == "insecure", page
    assert "needs HTTPS" in page["status"] and HTTPS_URL in page["status"], page
    assert page["knock_disabled"] and page["pubkey"] == ""
    assert browser.eval("() => indexedDB.databases().then((dbs) => dbs.length)") == 0
