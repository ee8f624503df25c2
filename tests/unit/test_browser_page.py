"""The browser page as the CGI serves it (``[server] browser_page = yes``): one
self-contained response under a strict Content-Security-Policy, with the server's public
key and a fresh nonce on its one script and one style, nothing from another origin, no
inline event handler; off by default (400), and 503 while webknockd has published no key.
What the page does in a browser: tests/e2e/test_browser.py."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

import webknock.spool as spool_layout
from tests.conftest import REPO
from tests.unit.test_cgi import Cgi, make_cgi
from webknock.protocol import v1, v2

PAGE = REPO / "webknock" / "cgi" / "page.html"
MAX_PAGE = 60 * 1024
CSP = (
    "default-src 'none'; script-src 'nonce-{n}'; style-src 'nonce-{n}'; connect-src 'self'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
#: Hooks the end-to-end test (and anyone scripting the page) relies on.
HOOKS = ("wk-pubkey", "wk-knock", "wk-keep", "wk-status")


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text of script and style elements."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.raw: dict[str, list[str]] = {"script": [], "style": []}
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in self.raw:
            self._in = tag
            self.raw[tag].append("")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if tag == self._in:
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in:
            self.raw[self._in][-1] += data

    def named(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for t, attrs in self.tags if t == tag]


def parse(html: str) -> Elements:
    parser = Elements()
    parser.feed(html)
    parser.close()
    return parser


@pytest.fixture
def server_key() -> v2.SigningKey:
    return v2.SigningKey.generate()


@pytest.fixture
def page_cgi(tmp_path: Path, vector_keys: v1.Keys, server_key: v2.SigningKey) -> Cgi:
    """A CGI with the browser page on and the server key published, as webknockd does."""
    cgi = make_cgi(tmp_path, vector_keys, browser_page="yes")
    (cgi.spool.root / spool_layout.SERVER_KEY_NAME).write_text(server_key.public_text() + "\n")
    return cgi


def get(cgi: Cgi, method: str = "GET") -> tuple[int, dict[str, str], str]:
    status, headers, body = cgi.call(method=method)
    return status, headers, body.decode("utf-8")


def nonce_of(headers: dict[str, str]) -> str:
    """The nonce of a response's policy, which must be exactly the expected policy."""
    csp = headers["Content-Security-Policy"]
    found = re.search(r"script-src 'nonce-([A-Za-z0-9+/]+=*)';", csp)
    assert found, headers
    assert csp == CSP.format(n=found.group(1))
    return found.group(1)


def test_get_serves_the_page_under_a_strict_policy(
    page_cgi: Cgi, server_key: v2.SigningKey
) -> None:
    status, headers, page = get(page_cgi)
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    nonce = nonce_of(headers)
    assert len(nonce) >= 22  # 128 bits or more
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Cache-Control"] == "no-store"
    assert len(page.encode()) < MAX_PAGE
    assert "__WK_" not in page, "every placeholder was filled in"
    assert "//" not in page.replace(nonce, ""), "no URL of another origin (nor of its own)"

    html = parse(page)
    (meta,) = [m for m in html.named("meta") if m.get("name") == "wk-server-key"]
    assert meta["content"] == server_key.public_text()
    assert v2.parse_public_key(str(meta["content"]))[0] == server_key.public
    # exactly one style and one script, both inline and carrying this response's nonce
    assert [s.get("nonce") for s in html.named("style")] == [nonce]
    assert [s.get("nonce") for s in html.named("script")] == [nonce]
    assert "src" not in html.named("script")[0]
    assert len(html.raw["script"][0]) > 1000 and len(html.raw["style"][0]) > 200
    ids = {attrs.get("id") for _, attrs in html.tags}
    assert set(HOOKS) <= ids
    assert [b.get("id") for b in html.named("button")][:2] == ["wk-knock", "wk-keep"]
    viewport = [m for m in html.named("meta") if m.get("name") == "viewport"]
    assert viewport and "width=device-width" in str(viewport[0]["content"])


def test_each_response_has_a_fresh_nonce(page_cgi: Cgi) -> None:
    nonces = set()
    for _ in range(3):
        status, headers, page = get(page_cgi)
        assert status == 200
        nonce = nonce_of(headers)
        assert page.count(f'nonce="{nonce}"') == 2
        nonces.add(nonce)
    assert len(nonces) == 3


def test_head_has_the_headers_and_no_body(page_cgi: Cgi) -> None:
    status, headers, page = get(page_cgi, "HEAD")
    assert status == 200 and page == ""
    assert "script-src 'nonce-" in headers["Content-Security-Policy"]


def test_the_page_is_self_contained() -> None:
    """Nothing in the page names another origin or loads anything: no URL with a host, no
    src, only data: links, no CSS url() or @import, and the one network call is a fetch of
    the page's own path."""
    text = PAGE.read_text(encoding="utf-8")
    assert len(text.encode()) < MAX_PAGE - 200  # room for the key and the nonces
    assert "//" not in text, "no URL with a host (and no // comment that could hide one)"
    html = parse(text)
    for tag, attrs in html.tags:
        assert "src" not in attrs, tag
        for name in ("href", "action", "formaction", "srcset", "poster", "data"):
            value = attrs.get(name)
            assert value is None or str(value).startswith("data:"), (tag, name, value)
        assert tag not in ("iframe", "object", "embed", "base", "form", "img", "audio", "video")
    assert [a.get("rel") for a in html.named("link")] == ["icon"]
    style = html.raw["style"][0]
    assert "url(" not in style and "@import" not in style and "@font-face" not in style
    script = html.raw["script"][0]
    for banned in (
        "XMLHttpRequest",
        "WebSocket",
        "EventSource",
        "sendBeacon",
        "importScripts",
        "Worker(",
        "eval(",
        "Function(",
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        'setAttribute("style',
    ):
        assert banned not in script, banned
    assert re.findall(r"\bfetch\(([^,]*),", script) == ["location.pathname"]
    assert "localStorage" not in script, "the key lives in IndexedDB, non-extractable"
    assert 'generateKey(ED, false, ["sign", "verify"])' in script


def test_no_inline_event_handlers_or_styles() -> None:
    """The policy forbids inline handlers and style attributes: the page uses neither (its
    script adds listeners)."""
    text = PAGE.read_text(encoding="utf-8")
    html = parse(text)
    for tag, attrs in html.tags:
        handlers = [name for name in attrs if name.startswith("on")]
        assert not handlers, (tag, handlers)
        assert "style" not in attrs, tag
        for value in attrs.values():
            assert not str(value).strip().lower().startswith("javascript:"), (tag, value)
    assert 'addEventListener("click"' in html.raw["script"][0]
    # the placeholders the CGI fills in: the key once, the nonce on the script and style
    assert text.count("__WK_SERVER_KEY__") == 1
    assert text.count("__WK_NONCE__") == 2


@pytest.mark.parametrize("setting", ["no", ""])
def test_off_unless_configured(tmp_path: Path, vector_keys: v1.Keys, setting: str) -> None:
    cgi = make_cgi(tmp_path, vector_keys, browser_page=setting)
    (cgi.spool.root / spool_layout.SERVER_KEY_NAME).write_text(
        v2.SigningKey.generate().public_text()
    )
    status, headers, page = get(cgi)
    assert status == 400 and page == ""
    assert "Content-Security-Policy" not in headers


def test_503_while_no_server_key_is_published(tmp_path: Path, vector_keys: v1.Keys) -> None:
    cgi = make_cgi(tmp_path, vector_keys, browser_page="yes")
    assert not (cgi.spool.root / spool_layout.SERVER_KEY_NAME).exists()
    status, headers, page = get(cgi)
    assert status == 503 and page == ""
    assert "Content-Security-Policy" not in headers
    (cgi.spool.root / spool_layout.SERVER_KEY_NAME).write_text("wk2:not<b>a key\n")
    status, _, page = get(cgi)
    assert status == 503 and page == "", "a malformed published key is not embedded"
