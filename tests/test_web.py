"""The chat page at / in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright; nothing is
downloaded). Skipped, with the reason, only where the browser or the playwright package is missing."""

import json
import shutil
import time

import httpx
import pytest

from nanoseek.server import Server, serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    context.set_default_timeout(15_000)
    yield context.new_page()
    context.close()


def settings(page, **values):
    """Open the settings panel (if closed) and fill fields by id."""
    if not page.locator("#settings").is_visible():
        page.click("#toggle-settings")
    for field, value in values.items():
        page.fill(f"#{field}", str(value))


def send(page, text):
    page.fill("#prompt", text)
    page.keyboard.press("Enter")


def test_type_a_message_and_see_a_streamed_answer(page, model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    with serving(Server(model, tok, "tiny", max_batch=4)) as url:
        page.goto(url)
        sync_api.expect(page.locator("#model")).to_have_text("tiny")
        assert page.locator("#key-field").is_hidden()  # no API key on this server: no key field
        settings(page, max_tokens=24, temperature=0)
        send(page, "Good night my lord")
        sync_api.expect(page.locator(".msg.user")).to_have_text("Good night my lord")
        meta = page.locator(".msg.assistant .meta")
        sync_api.expect(meta).to_contain_text("tokens", timeout=20_000)
        assert "error" not in meta.inner_text()
        answer = page.locator(".msg.assistant .answer").inner_text()
        # the page shows what the API returns for the same greedy request
        r = httpx.post(url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Good night my lord"}], "max_tokens": 24, "temperature": 0})
        assert answer.strip() == r.json()["choices"][0]["message"]["content"].strip()
        page.screenshot(path=str(tmp_path / "chat.png"))
        assert (tmp_path / "chat.png").stat().st_size > 1000
        # a second turn sends the history along
        send(page, "And the queen?")
        sync_api.expect(page.locator(".msg.assistant .meta").nth(1)).to_contain_text("tokens", timeout=20_000)


def chunk(delta, finish=None) -> str:
    """One server-sent event of a streamed chat completion, for canned answers."""
    return "data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "tiny",
                                  "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"


def test_reasoning_is_collapsible(page, model_and_tokenizer):
    """The server's SSE stream (here a canned one, since a random model does not reason) with
    reasoning_content: the page shows it in a <details> that collapses once the answer is complete."""
    model, tok = model_and_tokenizer

    body = (chunk({"role": "assistant", "content": ""}) + chunk({"reasoning_content": "3 + 4 = 7"})
            + chunk({"content": "It is 7."}, "stop") + "data: [DONE]\n\n")
    with serving(Server(model, tok, "tiny", max_batch=2)) as url:
        page.route("**/v1/chat/completions", lambda route: route.fulfill(
            status=200, headers={"Content-Type": "text/event-stream"}, body=body))
        page.goto(url)
        send(page, "What is 3 + 4?")
        sync_api.expect(page.locator(".answer")).to_have_text("It is 7.")
        details = page.locator("details.reasoning")
        sync_api.expect(details.locator(".think")).to_have_text("3 + 4 = 7")
        assert details.is_visible() and details.get_attribute("open") is None  # collapsed
        details.locator("summary").click()
        assert details.get_attribute("open") is not None


def test_stop_button_cancels_the_generation(page, model_and_tokenizer):
    model, tok = model_and_tokenizer
    server = Server(model, tok, "tiny", max_batch=2)
    step = server.engine.step
    # greedy (sampled answers of this random model sometimes end within a few tokens, before Stop is pressed):
    # 109 tokens, ~5 s at 0.05 s a step, slow enough to press Stop mid-stream
    server.engine.step = lambda: (time.sleep(0.05), step())[1]
    with serving(server) as url:
        bodies = sent_messages(page)
        page.goto(url)
        settings(page, max_tokens=200, temperature=0)
        send(page, "Tell me a long story")
        sync_api.expect(page.locator("#stop")).to_be_enabled()
        page.wait_for_function("document.querySelector('.answer') && "
                               "document.querySelector('.answer').textContent.length > 0")
        page.click("#stop")
        sync_api.expect(page.locator(".msg.assistant .meta")).to_have_text("stopped")
        deadline = time.time() + 10
        while server.loop.outstanding or server.engine.running:
            assert time.time() < deadline, "the stopped request still runs on the server"
            time.sleep(0.05)
        assert sum(1 for _ in server.engine.cache.free_slots) == 2
        sync_api.expect(page.locator("#send")).to_be_enabled()
        # the conversation goes on with the part of the answer that was shown
        shown = page.locator(".answer").first.text_content()
        settings(page, max_tokens=2)
        send(page, "Go on")
        sync_api.expect(page.locator(".msg.assistant .meta").nth(1)).to_contain_text("tokens", timeout=20_000)
        assert bodies[1] == [{"role": "user", "content": "Tell me a long story"},
                             {"role": "assistant", "content": shown}, {"role": "user", "content": "Go on"}]


def sent_messages(page) -> list:
    """The `messages` of every chat request the page sends, in order."""
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json["messages"])
            if r.url.endswith("/v1/chat/completions") else None)
    return bodies


def test_api_key_field_when_the_server_wants_one(page, model_and_tokenizer):
    model, tok = model_and_tokenizer
    with serving(Server(model, tok, "tiny", api_key="sekret", max_batch=2)) as url:
        bodies = sent_messages(page)
        page.goto(url)
        sync_api.expect(page.locator("#key-field")).to_be_visible()
        settings(page, max_tokens=4)
        send(page, "hello")
        sync_api.expect(page.locator(".msg.assistant .meta")).to_contain_text("API key")
        settings(page, api_key="sekret")
        send(page, "hello again")
        sync_api.expect(page.locator(".msg.assistant .meta").nth(1)).to_contain_text("tokens", timeout=20_000)
        # the refused message is not part of the conversation (nor an empty reply to it)
        assert bodies[1] == [{"role": "user", "content": "hello again"}]


def test_a_long_conversation_drops_its_oldest_exchanges(page, model_and_tokenizer):
    """The tiny model's context is 256 tokens: the second long message does not fit with the first exchange,
    so the page drops that exchange and asks again, and says so."""
    model, tok = model_and_tokenizer
    long = " ".join(["the king said good night"] * 24)
    assert 100 < len(tok.encode(long)) < 128
    with serving(Server(model, tok, "tiny", max_batch=2)) as url:
        bodies = sent_messages(page)
        page.goto(url)
        settings(page, max_tokens=8, temperature=0)
        send(page, long)
        meta = page.locator(".msg.assistant .meta")
        sync_api.expect(meta).to_contain_text("tokens", timeout=20_000)
        send(page, long + " again")
        sync_api.expect(meta.nth(1)).to_contain_text("dropped the 1 oldest exchange(s)", timeout=20_000)
        assert [len(b) for b in bodies] == [1, 3, 1] and bodies[2] == [{"role": "user", "content": long + " again"}]


def test_new_chat_during_an_answer_starts_clean(page, model_and_tokenizer):
    model, tok = model_and_tokenizer
    server = Server(model, tok, "tiny", max_batch=2)
    step = server.engine.step
    server.engine.step = lambda: (time.sleep(0.05), step())[1]  # slow enough to start over mid-stream
    with serving(server) as url:
        bodies = sent_messages(page)
        page.goto(url)
        settings(page, max_tokens=200, temperature=0)
        send(page, "Tell me a long story")
        page.wait_for_function("document.querySelector('.answer') && "
                               "document.querySelector('.answer').textContent.length > 0")
        page.click("#new-chat")
        sync_api.expect(page.locator("#send")).to_be_enabled()
        settings(page, max_tokens=4)
        send(page, "fresh start")
        sync_api.expect(page.locator(".msg.assistant .meta")).to_contain_text("tokens", timeout=20_000)
        assert bodies[-1] == [{"role": "user", "content": "fresh start"}]


def test_the_settings_reach_the_request(page, model_and_tokenizer):
    """System prompt, temperature, top-p and seed as set; an empty "Max tokens" sends null (the server then allows
    what the context leaves), not a number of the page's own."""
    model, tok = model_and_tokenizer
    requests = []

    def reply(route):
        requests.append(route.request.post_data_json)
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"},
                      body=chunk({"content": "Aye."}, "stop") + "data: [DONE]\n\n")

    with serving(Server(model, tok, "tiny", max_batch=2)) as url:
        page.route("**/v1/chat/completions", reply)
        page.goto(url)
        settings(page, system="Answer briefly.", temperature=0.3, top_p=0.9, seed=7)
        send(page, "Hello")
        sync_api.expect(page.locator(".answer")).to_have_text("Aye.")
        send(page, "Again")
        sync_api.expect(page.locator(".answer").nth(1)).to_have_text("Aye.")
    first, second = requests
    assert {k: first[k] for k in ("temperature", "top_p", "seed", "max_tokens", "stream")} == {
        "temperature": 0.3, "top_p": 0.9, "seed": 7, "max_tokens": None, "stream": True}
    assert first["messages"] == [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello"}]
    assert second["messages"] == first["messages"] + [{"role": "assistant", "content": "Aye."},
                                                      {"role": "user", "content": "Again"}]
