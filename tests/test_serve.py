"""serve.py, run for real: a server process on a free localhost port, driven with the `openai` client (and raw HTTP
for what a client library would not send). Its greedy text is sample.py's; concurrent streams each get their own
text; lm-evaluation-harness's log-likelihood request scores a task as tools/evaluate.py does; every bad request is
one line with its status while the server keeps serving; a client that goes away frees its row; SIGTERM drains."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_chat import THINGS, prepare, write_jsonl

import sample
import train
from engine.inference import load_for_inference
from engine.tasks import Item, encode_pair, score
from tools import evaluate

openai = pytest.importorskip("openai")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Server:
    """python serve.py in a process of its own, on a port the system picks; its stderr is kept."""

    def __init__(self, *args):
        cmd = [sys.executable, os.path.join(ROOT, "serve.py"), "--device=cpu", "--port=0", *args]
        self.process = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.lines = []
        for line in self.process.stderr:  # until it says where it listens
            self.lines.append(line)
            found = re.search(r"^serving .* on (http://[\d.]+:\d+) ", line)
            if found:
                self.url = found.group(1)
                break
        else:
            raise AssertionError("the server did not start:\n" + "".join(self.lines))
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stderr), daemon=True)
        self.reader.start()

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(120)
        self.reader.join(60)
        return code


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> str:
    """A tiny model fine-tuned on test_chat's twenty conversations (character tokens, block_size 64)."""
    tmp = tmp_path_factory.mktemp("serve")
    root = prepare(tmp, None, "--val_fraction=0.1")
    out = str(tmp / "out-chat")
    train.main(
        [f"--data_root={root}", "--dataset=chat", f"--out_dir={out}", "--device=cpu", "--compile=False"]
        + ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=8", "--max_iters=60"]
        + ["--eval_interval=60", "--eval_iters=1", "--learning_rate=3e-3", "--warmup_iters=5", "--dtype=float32"]
    )
    return out


@pytest.fixture(scope="module")
def server(chat_run):
    s = Server(f"--out_dir={chat_run}", "--max_batch=4", "--max_queue=16", "--model_name=tiny-chat")
    yield s
    assert s.stop() == 0, "".join(s.lines)


def sampled(out_dir: str, prompt: str, n: int, capsys) -> str:
    """sample.py's greedy continuation of prompt (the prompt itself not included)."""
    capsys.readouterr()
    sample.main([f"--out_dir={out_dir}", f"--start={prompt}", f"--max_new_tokens={n}", "--temperature=0"]
                + ["--num_samples=1", "--device=cpu", "--dtype=float32"])  # fmt: skip
    return capsys.readouterr().out.split("\n---------------")[0].removeprefix(prompt)


def test_models_health_and_the_page(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny-chat"]
    assert models.data[0].model_extra["chat"] is True and models.data[0].model_extra["max_model_len"] == 64
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 4
    page = httpx.get(server.url)
    assert page.status_code == 200 and "chat.js" in page.text
    assert httpx.get(f"{server.url}/web/chat.js").status_code == 200


def test_greedy_completions_equal_sample_py_streamed_or_not(server, chat_run, capsys):
    client = server.client()
    for prompt in ["what color is sky?", "w", "snow is"]:
        expected = sampled(chat_run, prompt, 30, capsys)
        done = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=30, temperature=0)
        assert done.choices[0].text == expected and done.choices[0].finish_reason == "length"
        assert done.usage.completion_tokens == 30
        pieces = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=30, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in pieces) == expected


def test_a_seed_gives_sample_py_s_sampled_text_and_stops_cut(server, chat_run, capsys):
    client = server.client()
    capsys.readouterr()
    sample.main([f"--out_dir={chat_run}", "--start=what", "--max_new_tokens=25", "--temperature=0.9", "--seed=5"]
                + ["--top_k=none", "--num_samples=1", "--device=cpu", "--dtype=float32"])  # fmt: skip
    expected = capsys.readouterr().out.split("\n---------------")[0].removeprefix("what")
    done = client.completions.create(prompt="what", max_tokens=25, temperature=0.9, seed=5, model="tiny-chat")
    assert done.choices[0].text == expected
    stop = expected[5:8]
    cut = client.completions.create(
        model="tiny-chat", prompt="what", max_tokens=25, temperature=0.9, seed=5, stop=[stop], n=2
    )
    assert cut.choices[0].text == expected[: expected.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert len(cut.choices) == 2  # n=2 samples: seeds 5 and 6


def test_chat_streamed_and_not(server):
    client = server.client()
    messages = [{"role": "user", "content": f"what color is {THINGS[3]}?"}]
    done = client.chat.completions.create(model="tiny-chat", messages=messages, temperature=0, max_tokens=40)
    reply = done.choices[0].message.content
    assert done.choices[0].message.role == "assistant" and reply and done.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model="tiny-chat", messages=messages, temperature=0, max_tokens=40,
                                            stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream) == reply
    with_logprobs = client.chat.completions.create(messages=messages, model="tiny-chat", temperature=0, max_tokens=5,
                                                   logprobs=True, top_logprobs=2)  # fmt: skip
    content = with_logprobs.choices[0].logprobs.content
    assert "".join(t.token for t in content) == with_logprobs.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-5 for t in content)


def test_eight_concurrent_streams_each_get_their_own_text(server):
    client = server.client()
    prompts = [f"what color is {t}?" for t in THINGS[:8]]
    alone = [
        client.completions.create(model="tiny-chat", prompt=p, max_tokens=24, temperature=0).choices[0].text
        for p in prompts
    ]

    def streamed(prompt):
        chunks = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=24, temperature=0, stream=True)
        return "".join(chunk.choices[0].text for chunk in chunks)

    with ThreadPoolExecutor(8) as pool:  # 8 streams on 4 rows: 4 wait their turn
        together = list(pool.map(streamed, prompts))
    assert together == alone


def test_lm_eval_harness_log_likelihood_requests_score_as_evaluate_py(server, chat_run, tmp_path, capsys):
    """lm-evaluation-harness's local-completions scores a choice by sending context + continuation as token ids,
    echo=True, logprobs=1, max_tokens=1, and summing token_logprobs[len(context):-1]; a batch of such prompts is one
    request. That must give tools/evaluate.py --task_file's log-likelihoods and accuracy."""
    items = [Item(f"what color is {t}? {t} is", ["blue.", "green.", "red."], n % 3) for n, t in enumerate(THINGS[:4])]
    task_file = write_jsonl(tmp_path / "task.jsonl", [vars(item) for item in items])
    model, tokenizer = load_for_inference("resume", chat_run)
    expected_acc = evaluate.main([f"--out_dir={chat_run}", "--task=choice", f"--task_file={task_file}", "--device=cpu",
                                  "--dtype=float32"])["acc"]  # fmt: skip
    _, expected = score(model, items, tokenizer.encode, tokenizer.eot_id)
    pairs = [encode_pair(tokenizer.encode, i.context, " " + c, tokenizer.eot_id) for i in items for c in i.choices]
    body = {"model": "tiny-chat", "prompt": [ctx + cont for ctx, cont in pairs], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}  # fmt: skip
    out = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()
    choices = sorted(out["choices"], key=lambda c: c["index"])
    got = [sum(c["logprobs"]["token_logprobs"][len(ctx) : -1]) for c, (ctx, _) in zip(choices, pairs, strict=True)]
    assert got == pytest.approx([s for scores in expected for s in scores], abs=1e-4)
    for c, (ctx, cont) in zip(choices, pairs, strict=True):  # what lm-eval's is_greedy reads
        assert c["logprobs"]["token_logprobs"][0] is None and len(c["logprobs"]["tokens"]) == len(ctx + cont) + 1
        assert all(len(top) == 1 for top in c["logprobs"]["top_logprobs"][1:])
    picks = [max(range(3), key=lambda j: got[3 * n + j]) for n in range(len(items))]
    assert sum(p == item.label for p, item in zip(picks, items, strict=True)) / len(items) == expected_acc


def test_echo_with_a_stop_string_or_streamed_keeps_the_prompt_and_its_logprobs(server):
    body = {"model": "tiny-chat", "prompt": "what", "max_tokens": 12, "echo": True, "logprobs": 1, "temperature": 0}
    whole = httpx.post(f"{server.url}/v1/completions", json=body).json()["choices"][0]
    assert whole["text"].startswith("what") and whole["logprobs"]["tokens"][:4] == list("what")
    stop = whole["text"][6]  # a stop string inside the completion
    cut = httpx.post(f"{server.url}/v1/completions", json=body | {"stop": [stop]}).json()["choices"][0]
    assert cut["text"] == whole["text"][: whole["text"].index(stop, 4)] and cut["finish_reason"] == "stop"
    assert cut["logprobs"]["tokens"][:4] == list("what") and cut["logprobs"]["token_logprobs"][0] is None
    assert cut["logprobs"]["token_logprobs"][1:4] == whole["logprobs"]["token_logprobs"][1:4]
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body | {"stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    streamed = [t for c in chunks for t in (c["choices"][0]["logprobs"] or {"tokens": []})["tokens"]]
    assert streamed == whole["logprobs"]["tokens"]


def test_a_chunked_body_over_the_limit_is_413(server):
    def body():
        yield b'{"prompt": "'
        for _ in range(9):
            yield b"a" * (1 << 20)
        yield b'"}'

    response = httpx.post(f"{server.url}/v1/completions", content=body(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "8 MiB" in response.json()["error"]["message"]


def bad(url, path, body=None, raw=None, headers=None, method="POST"):
    return httpx.request(method, f"{url}{path}", json=body, content=raw, headers=headers, timeout=60)


LONG = "what color is sky? " * 4
BAD = [  # (what, path, body or raw bytes, status, words in the message)
    ("malformed JSON", "/v1/completions", b'{"prompt": "a",', 400, "not valid JSON"),
    ("a string temperature", "/v1/completions", {"prompt": "a", "temperature": "0.5"}, 400, "temperature"),
    ("temperature out of range", "/v1/completions", {"prompt": "a", "temperature": 5}, 400, "temperature"),
    ("negative max_tokens", "/v1/completions", {"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ("no prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("n of 0", "/v1/completions", {"prompt": "a", "n": 0}, 400, "n:"),
    ("logprobs of 50", "/v1/completions", {"prompt": "a", "logprobs": 50}, 400, "logprobs"),
    ("a prompt over the context", "/v1/completions", {"prompt": LONG, "max_tokens": 1}, 400, "context is 64 tokens"),
    ("max_tokens over the context", "/v1/completions", {"prompt": "a", "max_tokens": 64}, 400, "context is 64"),
    ("a token id outside the vocabulary", "/v1/completions", {"prompt": [1, 99999]}, 400, "token ids"),
    ("a character outside the vocabulary", "/v1/completions", {"prompt": "\u00e9t\u00e9"}, 400, "vocabulary"),
    ("an unknown model", "/v1/completions", {"prompt": "a", "model": "gpt-5"}, 404, "does not exist"),
    ("nine stop strings", "/v1/completions", {"prompt": "a", "stop": list("abcdefghi")}, 400, "stop"),
    ("frequency_penalty", "/v1/completions", {"prompt": "a", "frequency_penalty": 1.0}, 400, "repetition_penalty"),
    ("a role that is not one", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ("no messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("a body that is a list", "/v1/chat/completions", [1, 2], 400, "body"),
    ("an unknown path", "/v1/engines", {}, 404, "no route"),
    ("a body over 8 MiB", "/v1/completions", b"x" * (9 << 20), 413, "8 MiB"),
    ("more choices than places", "/v1/completions", {"prompt": ["a", "b", "c"], "n": 7}, 400, "21 choices"),
    (
        "a chat message over the context",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": LONG}], "max_tokens": 8},
        400,
        "context is 64",
    ),
]


@pytest.mark.parametrize("what,path,body,status,words", BAD, ids=[case[0] for case in BAD])
def test_a_bad_request_is_one_line_with_its_status_and_the_server_goes_on(server, what, path, body, status, words):
    raw = body if isinstance(body, bytes) else None
    response = bad(server.url, path, None if raw else body, raw, {"Content-Type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"] and "\n" not in error["message"] and "Traceback" not in error["message"]
    ok = server.client().completions.create(model="tiny-chat", prompt="what", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2


@pytest.fixture
def long_run(char_data, tmp_path) -> str:
    """A model with a long context (block_size 512), trained one iteration: a reply of hundreds of tokens."""
    out = str(tmp_path / "out-long")
    train.main([f"--data_root={char_data}", "--dataset=tiny_char", f"--out_dir={out}", "--device=cpu"]
               + ["--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=512", "--batch_size=1"]
               + ["--max_iters=1", "--eval_interval=1", "--eval_iters=1"])  # fmt: skip
    return out


def test_one_row_a_key_a_client_that_leaves_and_sigterm(long_run):
    """One row, no queue, an API key: the key is required; a second request while a stream runs is 429 with
    Retry-After; a client that disconnects mid-stream frees the row at once (the next request is served though
    the first asked for 500 tokens); SIGTERM lets a running stream finish, then the server exits 0."""
    s = Server(f"--out_dir={long_run}", "--max_batch=1", "--max_queue=0", "--api_key=sesame")
    try:
        assert bad(s.url, "/v1/models", method="GET").status_code == 401
        refused = bad(s.url, "/v1/completions", {"prompt": "a"}, headers={"Authorization": "Bearer nope"})
        assert refused.status_code == 401 and "API key" in refused.json()["error"]["message"]
        key = {"Authorization": "Bearer sesame"}
        client = s.client(api_key="sesame")
        assert (
            client.completions.create(model="out-long", prompt="ROMEO:", max_tokens=3).choices[0].finish_reason
            == "length"
        )

        body = {"prompt": "ROMEO:", "max_tokens": 500, "stream": True}
        with (
            httpx.Client(timeout=120) as http,
            http.stream("POST", f"{s.url}/v1/completions", json=body, headers=key) as r,
        ):
            lines = r.iter_lines()  # (kept: dropping the iterator would close the response)
            assert next(lines).startswith("data: ")  # the first token: the one row is taken
            busy = bad(s.url, "/v1/completions", {"prompt": "a"}, headers=key)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        # the stream's client has gone: its row is freed at the engine's next step, long before its 500 tokens
        while (health := httpx.get(f"{s.url}/health").json())["active"]:
            time.sleep(0.01)
        assert health["tokens_generated"] < 3 + 500
        ok = client.completions.create(model="out-long", prompt="ROMEO:", max_tokens=3)
        assert ok.choices[0].finish_reason == "length"
        # a client waiting for a whole (not streamed) completion goes away too
        before = health["tokens_generated"]
        with socket.create_connection(s.url.removeprefix("http://").split(":")) as raw:
            payload = json.dumps({"prompt": "ROMEO:", "max_tokens": 500}).encode()
            head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sesame\r\n"
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
            raw.sendall(head.encode() + payload)
            while not (health := httpx.get(f"{s.url}/health").json())["active"]:  # until it decodes (or is done)
                if health["tokens_generated"] - before >= 500:
                    break
                time.sleep(0.01)
        while (health := httpx.get(f"{s.url}/health").json())["active"]:
            time.sleep(0.01)
        assert health["tokens_generated"] - before < 3 + 500

        stream = client.completions.create(
            model="out-long", prompt="ROMEO:", max_tokens=400, stream=True, temperature=0
        )
        chunks = iter(stream)
        first = next(chunks)
        s.process.send_signal(signal.SIGTERM)  # drains: the running stream still gets all its tokens
        rest = list(chunks)
        assert rest[-1].choices[0].finish_reason == "length"
        assert len(first.choices[0].text + "".join(c.choices[0].text for c in rest)) == 400
        assert s.stop() == 0
    finally:
        s.stop()
    assert "Traceback" not in "".join(s.lines)


@pytest.fixture
def browser():
    """Headless Chromium (Debian's chromium and chromium-driver, as .ci/run installs them) under selenium."""
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)), None)
    driver_path = "/usr/bin/chromedriver"
    if chromium is None or not os.path.exists(driver_path):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,700"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    yield driver
    driver.quit()


def page_ready(browser, url: str | None, title: str):
    """The page at url (None: the one already open), once it has read the model's card, set to greedy decoding; and
    a wait of up to two minutes."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if url:
        browser.get(url)
    wait = WebDriverWait(browser, 120)
    wait.until(lambda b: b.find_element(By.ID, "title").text == title)
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    return wait


def test_the_chat_page_in_a_real_browser(server, browser, tmp_path):
    """The page loads, two typed messages get streamed replies (the first is the API's greedy reply), a refused one
    is said on the page; the screenshot goes to $SCREENSHOT or tmp_path."""
    from selenium.webdriver.common.by import By

    wait = page_ready(browser, server.url, "tiny-chat")
    assert "chat" in browser.find_element(By.ID, "mode").text
    for n, thing in enumerate(THINGS[1:3]):
        browser.find_element(By.ID, "input").send_keys(f"what color is {thing}?\n")
        wait.until(lambda b, n=n: len(b.find_elements(By.CSS_SELECTOR, ".assistant:not(.streaming)")) == n + 1)
    replies = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".assistant")]
    assert all(replies) and len(browser.find_elements(By.CSS_SELECTOR, ".user")) == 2
    expected = server.client().chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": f"what color is {THINGS[1]}?"}], temperature=0,
        max_tokens=32,
    )  # fmt: skip
    assert replies[0].strip() == expected.choices[0].message.content.strip()
    browser.find_element(By.ID, "input").send_keys("\u00e9t\u00e9\n")  # not in the vocabulary: said on the page
    wait.until(lambda b: b.find_element(By.ID, "error").is_displayed())
    assert "vocabulary" in browser.find_element(By.ID, "error").text
    assert len(browser.find_elements(By.CSS_SELECTOR, ".user")) == 2  # the refused message went back to the input
    assert browser.find_element(By.ID, "input").get_attribute("value") == "\u00e9t\u00e9"
    browser.save_screenshot(os.environ.get("SCREENSHOT") or str(tmp_path / "chat.png"))


def test_the_page_asks_for_the_key_and_continues_text_with_a_base_model(long_run, browser):
    """A base model behind --api_key: the page asks for the key, then continues typed text (/v1/completions) with
    the API's greedy continuation."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    s = Server(f"--out_dir={long_run}", "--api_key=sesame")
    try:
        browser.get(s.url)
        WebDriverWait(browser, 120).until(lambda b: b.find_element(By.ID, "key-dialog").is_displayed())
        browser.find_element(By.ID, "key").send_keys("sesame\n")
        wait = page_ready(browser, None, "out-long")
        assert "continuation" in browser.find_element(By.ID, "mode").text
        tokens = browser.find_element(By.ID, "max-tokens")
        tokens.clear()
        tokens.send_keys("20")
        browser.find_element(By.ID, "input").send_keys("ROMEO:\n")
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant:not(.streaming)"))
        expected = s.client(api_key="sesame").completions.create(model="out-long", prompt="ROMEO:", max_tokens=20,
                                                                 temperature=0)  # fmt: skip
        got = browser.find_element(By.CSS_SELECTOR, ".assistant").get_attribute("textContent")
        assert got == expected.choices[0].text
    finally:
        assert s.stop() == 0
