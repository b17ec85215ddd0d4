"""The admin dashboard in a real browser: Debian's Chromium driven by
Playwright (its own browser download is not used: `executablePath` points at
/usr/bin/chromium, or CHROMIUM_PATH).

One scenario, as an operator would go through it: sign in with the key the
server generated at first start, see the models, load one, stream an answer
in the playground, watch the analytics move after a few requests, create a
key and revoke it. Screenshots of each page go to pytest's temporary
directory (never the repository); their paths are printed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import conftest
import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
# Without the networking flags Chromium tries Google's hosts, which this
# machine refuses, many at a time.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LIGHT = "light/SmolLM2-135M-Instruct-Q4_1"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install chromium (or set CHROMIUM_PATH)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def operator_key(server) -> str:
    # The suite's server sets no API_KEY: this is the key generated at first start.
    return (server.workdir / "data" / "api_key").read_text().strip()


def sign_in(page, base_url: str, key: str) -> None:
    page.goto(f"{base_url}/admin")
    expect(page.locator("#login")).to_be_visible()
    page.fill("#key", key)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#page-status")).to_be_visible()


def test_an_operator_runs_the_server_from_the_dashboard(server, base_url, browser, tmp_path):
    key = operator_key(server)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))

    # A wrong key is refused with a message; the right one opens the console.
    page.goto(f"{base_url}/admin")
    page.fill("#key", "not-the-key")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("not the operator's key")
    errors.clear()  # the browser logs the refused request itself
    sign_in(page, base_url, key)
    expect(page.locator("#status-cards")).to_contain_text("Version")
    page.screenshot(path=shots / "status.png", full_page=True)

    # Models: unload if another test loaded it, then load from the page.
    httpx.post(f"{base_url}/v1/models/{LIGHT}/unload", headers={"Authorization": f"Bearer {key}"}, timeout=60)
    page.click("#nav a[data-page=models]")
    row = page.locator("#models-table tr", has_text=LIGHT)
    expect(row).to_be_visible()
    expect(row.locator(".badge")).to_have_text("available")
    row.get_by_role("button", name="Load").click()
    expect(row.locator(".badge")).to_have_text("loaded", timeout=60_000)
    page.screenshot(path=shots / "models.png", full_page=True)

    # Playground: a streamed answer with its time to first token and speed.
    page.click("#nav a[data-page=playground]")
    expect(page.locator("#play-model")).to_have_value(LIGHT)
    page.fill("#play-temperature", "0")
    page.fill("#play-max-tokens", "24")
    page.fill("#chat-input", "What is the capital of France?")
    page.click("#chat-send")
    expect(page.locator("#play-stats")).to_contain_text("tok/s", timeout=60_000)
    expect(page.locator("#transcript .msg.assistant .text")).not_to_be_empty()
    assert "first token" in page.locator("#play-stats").inner_text()
    page.screenshot(path=shots / "playground.png", full_page=True)

    # Analytics: the charts move after a few more requests.
    page.click("#nav a[data-page=analytics]")
    chart = page.locator("#chart-tokens canvas")
    expect(chart).to_be_visible()
    requests_card = page.locator("#an-totals .stat", has_text="Requests").locator(".value")
    before_count = int(requests_card.inner_text().replace(",", ""))
    before = chart.screenshot()
    for _ in range(3):
        r = httpx.post(
            f"{base_url}/v1/chat/completions",
            json={"model": "light", "max_tokens": 16, "temperature": 0.9, "seed": int(time.time() * 1000) % 100000,
                  "messages": [{"role": "user", "content": "Say something."}]},
            timeout=60,
        )
        assert r.status_code == 200, r.text
    # The page refreshes itself every 10 s; changing the range refreshes at once.
    page.select_option("#an-range", "day")
    page.select_option("#an-range", "hour")
    expect(requests_card).not_to_have_text(str(before_count), timeout=15_000)
    assert int(requests_card.inner_text().replace(",", "")) >= before_count + 3
    expect(page.locator("#an-by-model")).to_contain_text(LIGHT)
    assert chart.screenshot() != before, "the tokens chart did not change"
    page.screenshot(path=shots / "analytics.png", full_page=True)

    # Settings: create a key (shown once), see it work, revoke it.
    page.click("#nav a[data-page=settings]")
    page.fill("#key-name", "browser-test")
    page.click("#key-form button[type=submit]")
    new_key = page.locator("#new-key").inner_text()
    assert new_key.startswith("llms-"), new_key
    row = page.locator("#keys tr", has_text="browser-test")
    expect(row).to_be_visible()
    # A named key opens the API, never the console (403, not 401).
    named = {"Authorization": f"Bearer {new_key}"}
    assert httpx.get(f"{base_url}/admin/api/status", headers=named).status_code == 403
    page.screenshot(path=shots / "settings.png", full_page=True)
    page.on("dialog", lambda d: d.accept())
    row.get_by_role("button", name="Revoke").click()
    expect(row.locator(".badge")).to_have_text("revoked")
    assert httpx.get(f"{base_url}/admin/api/status", headers=named).status_code == 401

    # The same console on a phone.
    phone = browser.new_page(viewport={"width": 390, "height": 844})
    sign_in(phone, base_url, key)
    expect(phone.locator("#nav a[data-page=settings]")).to_be_visible()
    phone.screenshot(path=shots / "phone-status.png", full_page=True)
    phone.close()

    # Signing out forgets the key.
    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    page.reload()
    expect(page.locator("#login")).to_be_visible()
    page.close()
    assert not errors, errors
    print(f"\nscreenshots: {shots}")


# A template whose generation prompt opens the model's <think> block, as
# DeepSeek-R1's does: SmolLM2 then writes nothing but thoughts.
OPENS_THE_BLOCK = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if '</think>' in m.content %}{{ m.content.split('</think>')[-1] }}{% else %}{{ m.content }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


def test_the_playground_shows_a_thinking_models_thoughts(browser, tmp_path):
    template = tmp_path / "thinking.jinja"
    template.write_text(OPENS_THE_BLOCK)
    (tmp_path / "models").mkdir()
    key = "thinking-operator-key"
    env = dict(
        os.environ,
        LIGHT_MODEL_PATH=str(conftest._resolve_model()),
        LIGHT_CHAT_TEMPLATE=str(template),
        LIGHT_N_CTX="2048",
        LIGHT_N_THREADS="2",
        MODELS_DIR=str(tmp_path / "models"),
        DATA_DIR=str(tmp_path / "data"),
        API_KEY=key,
        NO_PROXY="127.0.0.1,localhost",
    )
    proc, port = conftest._launch(conftest._resolve_binary(), tmp_path, env, "thinking")
    try:
        base_url = f"http://127.0.0.1:{port}"
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        sign_in(page, base_url, key)
        page.click("#nav a[data-page=playground]")
        expect(page.locator("#play-model")).to_have_value(LIGHT)
        page.fill("#play-temperature", "0")
        page.fill("#play-max-tokens", "16")
        page.fill("#chat-input", "Name a colour.")
        page.click("#chat-send")
        expect(page.locator("#play-stats")).to_contain_text("finish: length", timeout=60_000)
        thoughts = page.locator("#transcript .msg.assistant details.thinking")
        expect(thoughts).to_be_visible()
        expect(thoughts).to_have_attribute("open", "")
        expect(thoughts.locator(".text")).not_to_be_empty()
        assert "<think>" not in thoughts.inner_text()
        assert "first token" in page.locator("#play-stats").inner_text()
        page.screenshot(path=tmp_path / "thinking.png", full_page=True)
        page.close()
        assert not errors, errors
    finally:
        conftest._stop(proc)
