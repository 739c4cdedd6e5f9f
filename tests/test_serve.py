"""`mlx-persona serve` against its oracle, the official `openai` client: greedy replies (whole and streamed)
equal `mlx_persona.generate`'s for the same settings, extra body fields reach the sampler, 50 concurrent
clients get their own replies, concurrent requests decode in one batch and each still gets its unbatched
reply, and bad requests, a full queue, a vanished client, a foreign Host header,
slow clients and a missing API key each get their clear answer while the server goes on serving.

The server runs as a real subprocess on a free port (``--port 0``; it prints the port). Its model is the
built-in tiny model with one more end id (a token greedy decoding reaches after a few tokens), so replies
end by themselves and ``min_new_tokens`` has something to suppress.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

REPO = Path(__file__).resolve().parents[1]
CARD = REPO / "data" / "bluey" / "persona.yaml"
NAME = "tiny-serve"
KEY = "sk-test-0123456789"
HOLD = "serve:token:1"


def prompt(i: int) -> str:
    return f"Question {i}: what shall we play today, Bluey?"


class Serve:
    """`python -m mlx_persona serve --port 0 ARGS` with its log in a file; `url` once it listens."""

    def __init__(self, args: list[str], folder: Path, env: dict | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.log, self.hold = folder / "serve.log", folder / "hold"
        self._log = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "mlx_persona", "serve", "--port", "0", *args], cwd=REPO,
                                     env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not (m := re.search(r"serving .* on http://127\.0\.0\.1:(\d+)/v1", self.output())):
            assert self.proc.poll() is None, f"serve exited {self.proc.returncode}:\n{self.output()}"
            assert time.monotonic() < deadline, f"serve did not start:\n{self.output()}"
            time.sleep(0.05)
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}/v1"
        while self.raw("GET", "/health")[0] != 200:  # listening from the line on; bounded by the line's deadline
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.05)

    def output(self) -> str:
        return self.log.read_text()

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(status, parsed JSON body or text) of one request over a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read().decode()
            return resp.status, (json.loads(data) if resp.getheader("content-type") == "application/json" else data)
        except (TimeoutError, ConnectionError):
            return None, None
        finally:
            conn.close()

    def health(self) -> dict:
        return self.raw("GET", "/health")[1]

    def until(self, what, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.02)

    def held(self) -> bool:
        return self.hold.exists() and self.hold.read_text() == f"held {HOLD} pid {self.proc.pid}\n"

    def release(self) -> None:
        self.until(self.held)
        self.hold.unlink()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def model_dir(tiny_path, tmp_path_factory):
    """The tiny model with one more end id: the first new token of prompt(0)'s greedy reply after its 4th."""
    from mlx_persona.generation import end_token_ids, generate
    from mlx_persona.models import load_model

    model, tok = load_model(tiny_path)
    ids = generate(model, tok, prompt(0), config(max_new_tokens=40), system=system(),
                   end_ids=end_token_ids(tok, tiny_path)).tokens
    extra = next(t for k, t in enumerate(ids) if k >= 4 and t not in ids[:k])
    folder = tmp_path_factory.mktemp("serve") / "model"
    shutil.copytree(tiny_path, folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["eos_token_id"] = [*gen["eos_token_id"], extra]
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


def system() -> str:
    from mlx_persona.eval.persona import load_persona

    return load_persona(CARD).system_prompt


def config(**changes):
    """The server's default (the persona preset), greedy and without min_new_tokens, plus `changes`."""
    from mlx_persona.sampling import preset

    return dataclasses.replace(preset("persona"), **{"temperature": 0.0, "min_new_tokens": 0, **changes})


@pytest.fixture(scope="module")
def reference(model_dir):
    """`reference(prompt, **settings)`: what `mlx-persona generate` gives for it on the served model."""
    from mlx_persona.generation import end_token_ids, generate
    from mlx_persona.models import load_model

    model, tok = load_model(model_dir)
    ends = end_token_ids(tok, model_dir)

    def run(text, raw=False, **changes):
        return generate(model, tok, text, config(**changes), system=None if raw else system(), end_ids=ends,
                        chat_template=not raw)

    return run


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Serve(["--model", f"{NAME}={model_dir}", "--persona", str(CARD)], tmp_path_factory.mktemp("served"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=300)


def chat(client, text, **kw):
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": text}], **kw)


def test_greedy_reply_equals_generate_whole_and_streamed(client, reference):
    i = 0
    for max_tokens, finish in ((30, "stop"), (3, "length")):  # ends on its end id (after 4+ tokens), or is cut
        ref = reference(prompt(i), max_new_tokens=max_tokens)
        assert ref.stop_reason == ("end_token" if finish == "stop" else "length") and ref.generated_tokens >= 3
        got = chat(client, prompt(i), temperature=0, max_tokens=max_tokens, extra_body={"min_new_tokens": 0})
        assert got.choices[0].message.content == ref.text
        assert got.choices[0].finish_reason == finish
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (ref.prompt_tokens, ref.generated_tokens)
        assert got.model == NAME and got.object == "chat.completion"
        chunks = list(chat(client, prompt(i), temperature=0, max_tokens=max_tokens, stream=True,
                           stream_options={"include_usage": True}, extra_body={"min_new_tokens": 0}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == ref.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
        assert chunks[-1].usage.completion_tokens == ref.generated_tokens
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it did stream


def test_stop_strings_stop_and_trim_like_generate(client, reference):
    whole = reference(prompt(0), max_new_tokens=30).text
    stop = whole[len(whole) // 2:][:3]
    ref = reference(prompt(0), max_new_tokens=30, stop=[stop, "never"])
    assert ref.stop_reason == "stop_string" and stop not in ref.text
    got = chat(client, prompt(0), temperature=0, max_tokens=30, stop=[stop, "never"],
               extra_body={"min_new_tokens": 0})
    assert (got.choices[0].message.content, got.choices[0].finish_reason) == (ref.text, "stop")
    streamed = chat(client, prompt(0), temperature=0, max_tokens=30, stop=stop, stream=True,
                    extra_body={"min_new_tokens": 0})
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == ref.text


def test_completions_take_raw_text_like_generate_raw(client, reference):
    ref = reference("Bingo and Bluey went to the", raw=True, max_new_tokens=12)
    got = client.completions.create(model=NAME, prompt="Bingo and Bluey went to the", temperature=0, max_tokens=12,
                                    extra_body={"min_new_tokens": 0})
    assert got.choices[0].text == ref.text and got.usage.completion_tokens == ref.generated_tokens
    streamed = client.completions.create(model=NAME, prompt="Bingo and Bluey went to the", temperature=0,
                                         max_tokens=12, stream=True, extra_body={"min_new_tokens": 0})
    assert "".join(c.choices[0].text for c in streamed) == ref.text


def test_min_new_tokens_from_the_body_and_from_the_preset(client, reference):
    short = chat(client, prompt(0), temperature=0, max_tokens=60, extra_body={"min_new_tokens": 0})
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 40
    held = chat(client, prompt(0), temperature=0, max_tokens=60, extra_body={"min_new_tokens": 40})
    assert held.usage.completion_tokens >= 40
    assert held.choices[0].message.content == reference(prompt(0), max_new_tokens=60, min_new_tokens=40).text
    preset = chat(client, prompt(0), temperature=0, max_tokens=60)  # the persona preset's min_new_tokens=50
    assert preset.usage.completion_tokens >= 50


def test_fifty_concurrent_clients_each_get_their_own_reply(client, reference):
    expected = [reference(prompt(i), max_new_tokens=8).text for i in range(50)]
    got: dict[int, object] = {}

    def ask(i):
        try:
            got[i] = chat(client, prompt(i), temperature=0, max_tokens=8, extra_body={"min_new_tokens": 0},
                          stream=i % 2 == 1)
            if i % 2:
                got[i] = "".join(c.choices[0].delta.content or "" for c in got[i] if c.choices)
            else:
                got[i] = got[i].choices[0].message.content
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            got[i] = e

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(50)] == expected
    assert len(set(expected)) > 3  # the prompts really differ in their replies


def test_bad_requests_get_clear_openai_errors_and_the_server_goes_on(server, client):
    headers = {"Content-Type": "application/json"}
    status, body = server.raw("POST", "/v1/chat/completions", b'{"model": "tiny-serve", "messages": [', headers)
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="context is 2048 tokens"):
        chat(client, "hi", max_tokens=10**9)
    with pytest.raises(openai.BadRequestError, match="context is 2048 tokens"):  # fits alone, not with the prompt
        chat(client, "hi " * 300, max_tokens=2000)
    with pytest.raises(openai.NotFoundError, match="serves 'tiny-serve'") as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.APIStatusError) as e:
        chat(client, "a" * 1_000_000)
    assert e.value.status_code == 413 and "at most 1000000" in e.value.message
    with pytest.raises(openai.BadRequestError, match="repetition_penalty"):
        chat(client, "hi", frequency_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="unrecognized request argument 'min_new_token'"):
        chat(client, "hi", extra_body={"min_new_token": 5})
    with pytest.raises(openai.BadRequestError, match="top_k must be an integer >= 0"):
        chat(client, "hi", extra_body={"top_k": -1})
    with pytest.raises(openai.BadRequestError, match="roles must alternate"):  # the chat template refuses
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "a"}] * 2)
    assert server.raw("POST", "/v1/chat/completions", b"{}", {"Content-Type": "text/plain"})[0] == 415
    assert server.raw("GET", "/v1/nothing")[0] == 404
    assert server.raw("DELETE", "/v1/models")[0] == 405
    status, body = server.raw("GET", "/health", headers={"Host": "evil.example:80"})  # DNS rebinding
    assert status == 421 and "error" in body
    assert [m.id for m in client.models.list()] == [NAME]
    assert server.health()["errors"] == 0
    assert chat(client, prompt(1), max_tokens=3).usage.completion_tokens == 3  # still serving


@pytest.fixture(scope="module")
def held(model_dir, tmp_path_factory):
    """A server with a queue of one, an API key, short timeouts, and every generation held at its first piece."""
    folder = tmp_path_factory.mktemp("held")
    s = Serve(["--model", f"{NAME}={model_dir}", "--queue-size", "1", "--request-timeout", "2"], folder,
              env={"MLX_PERSONA_TEST_HOLD": HOLD, "MLX_PERSONA_TEST_HOLD_FILE": str(folder / "hold"),
                   "MLX_PERSONA_API_KEY": KEY})
    yield s
    s.stop()


def test_api_key_is_required_and_checked(held):
    assert openai.OpenAI(base_url=held.url, api_key=KEY, max_retries=0).models.list().data[0].id == NAME
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        openai.OpenAI(base_url=held.url, api_key=KEY + "x", max_retries=0).models.list()
    assert held.raw("GET", "/v1/models")[0] == 401
    assert held.health()["status"] == "ok"  # /health needs no key
    assert KEY not in held.output()


def test_a_full_queue_answers_503_and_the_queued_requests_still_finish(held):
    c = openai.OpenAI(base_url=held.url, api_key=KEY, max_retries=0, timeout=300)
    replies = {}

    def ask(i):
        replies[i] = chat(c, prompt(i), temperature=0, max_tokens=3, extra_body={"min_new_tokens": 0})

    first = threading.Thread(target=ask, args=(0,))
    first.start()
    held.until(held.held)  # the first request is generating, held after its first piece
    second = threading.Thread(target=ask, args=(1,))
    second.start()
    held.until(lambda: held.health()["waiting"] == 1)
    with pytest.raises(openai.APIStatusError) as e:
        ask(2)
    assert e.value.status_code == 503 and e.value.code == "queue_full"
    assert e.value.response.headers["retry-after"] == "1"
    held.release()  # the first finishes; the second starts and is held in turn
    held.release()
    first.join()
    second.join()
    assert [replies[i].usage.completion_tokens for i in (0, 1)] == [3, 3]
    assert held.health()["rejected"] == 1


def test_a_client_that_goes_away_stops_its_generation(held):
    before = held.health()
    body = json.dumps({"model": NAME, "messages": [{"role": "user", "content": prompt(3)}], "stream": True,
                       "max_tokens": 1000, "min_new_tokens": 1000}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", held.port, timeout=120)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json",
                                                         "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200
    held.until(held.held)
    assert resp.readline().startswith(b"data: ")  # the stream has begun
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
    conn.close()
    held.until(lambda: held.health()["disconnects"] == before["disconnects"] + 1)
    held.release()
    held.until(lambda: held.health()["cancelled"] == before["cancelled"] + 1)
    assert re.search(r"the client went away; generation stopped after 1 pieces of text", held.output())
    assert held.health()["completed"] == before["completed"]


def test_slow_clients_are_cut_off(held):
    with socket.create_connection(("127.0.0.1", held.port), timeout=120) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHo")  # and nothing more: closed after --request-timeout
        assert s.recv(1024) == b""
    with socket.create_connection(("127.0.0.1", held.port), timeout=120) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{held.port}\r\nAuthorization: Bearer {KEY}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode())
        answer = b""
        while chunk := s.recv(4096):  # until the server closes (the next request's head never comes)
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in answer


def test_user_mistakes_end_with_one_clear_line(tmp_path):
    for args, message in ((["--model", "builtin:tiny", "--host", "0.0.0.0"], "binding every interface is refused"),
                          (["--model", str(tmp_path / "missing")], "no such folder")):
        r = subprocess.run([sys.executable, "-m", "mlx_persona", "serve", "--port", "0", *args], cwd=REPO, check=False,
                           capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_each_openai_field_is_mapped_or_refused_by_its_rule():
    from mlx_persona.sampling import preset
    from mlx_persona.serve.schema import APIError, chat_request, parse_json

    def req(**body):
        body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], **body}
        return chat_request(body, model_id=NAME, defaults=preset("persona"), context=2048)

    def refused(status, match, **body):
        with pytest.raises(APIError, match=match) as e:
            req(**body)
        assert e.value.status == status and "error" in e.value.body()

    sent = {"temperature": 0.5, "top_p": 0.9, "seed": 7, "max_tokens": 9, "min_new_tokens": 3, "top_k": 5,
            "repetition_penalty": 1.3, "min_p": 0.1, "no_repeat_ngram_size": 2}
    r = req(**sent, stop="END")
    assert {k: getattr(r.config, "max_new_tokens" if k == "max_tokens" else k) for k in sent} == sent
    assert r.config.stop == ["END"] and r.max_tokens_given and not r.stream
    assert req().config == preset("persona") and not req().max_tokens_given  # nothing sent: the preset
    assert req(max_completion_tokens=4, frequency_penalty=0, presence_penalty=0.0, n=1, user="u").config.max_new_tokens == 4
    r = req(messages=[{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                      {"role": "user", "content": "hi", "name": "sam"}], stream=True,
            stream_options={"include_usage": True})
    assert r.prompt == [{"role": "system", "content": "a\nb"}, {"role": "user", "content": "hi"}]
    assert r.stream and r.include_usage
    refused(400, "repetition_penalty", presence_penalty=0.1)
    refused(400, "only n=1", n=2)
    refused(400, "differ", max_tokens=3, max_completion_tokens=4)
    refused(400, "must be a number, not a boolean", temperature=True)
    refused(400, "max_tokens must be an integer >= 1", max_tokens=0)
    refused(400, "at most 16", stop=["x"] * 17)
    refused(400, "only with stream: true", stream_options={"include_usage": True})
    refused(400, "tool calls", tools=[{"type": "function"}])
    refused(400, r"messages\[0\].role", messages=[{"role": "tool", "content": "x"}])
    refused(400, r"messages\[0\].content", messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    refused(404, "does not exist", model="other")
    for raw, match in ((b"[1]", "JSON object, not an array"), (b'{"a": NaN}', "NaN is not JSON"),
                       (b"\xff", "not UTF-8"), (b"[" * 100_000, "not valid JSON")):
        with pytest.raises(APIError, match=match):
            parse_json(raw)


@pytest.fixture(scope="module")
def batched(model_dir, tmp_path_factory):
    """A server decoding at most 7 requests together, every generation held at its first piece."""
    folder = tmp_path_factory.mktemp("batched")
    s = Serve(["--model", f"{NAME}={model_dir}", "--persona", str(CARD), "--max-batch", "7", "--queue-size", "8"],
              folder, env={"MLX_PERSONA_TEST_HOLD": HOLD, "MLX_PERSONA_TEST_HOLD_FILE": str(folder / "hold")})
    yield s
    s.stop()


LONG = "Tell me everything about Bingo, the long game of keepy uppy with the balloon and what Dad said"


def test_concurrent_requests_share_a_batch_and_each_gets_its_unbatched_reply(batched, reference):
    """Eight requests of different prompt lengths and settings arrive while a first one generates: seven
    decode together (--max-batch 7), the eighth waits for a place; one client goes away mid-batch and its
    row leaves. Every other reply equals `generate`'s alone: greedy ones token for token, and the seeded
    sampled one too (the batch oracle's rule, tests/test_batch_generation.py: a seeded row draws with its
    own key from the unbatched distribution; only a rounding near-tie could part them, and this one has
    none)."""
    c = openai.OpenAI(base_url=batched.url, api_key="unused", max_retries=0, timeout=300)
    stop = reference(prompt(4), max_new_tokens=30).text[9:12]
    cases = [  # (prompt, streamed, body); each body's max_tokens and min_new_tokens are passed to `reference`
        (prompt(0), True, {"max_tokens": 30, "min_new_tokens": 10}),
        (LONG, False, {"max_tokens": 12}),
        (prompt(2), False, {"max_tokens": 60, "min_new_tokens": 40}),
        ("Dad?", True, {"max_tokens": 20, "temperature": 0.9, "top_p": 0.9, "seed": 7}),
        (prompt(4), True, {"max_tokens": 30, "stop": [stop]}),
        ("Bingo and Bluey went to the", False, {"max_tokens": 5, "raw": True}),
        (prompt(5), False, {"max_tokens": 8}),  # the eighth: it waits until a row has left
    ]
    replies: dict[int, tuple] = {}

    def ask(k):
        text, stream, body = cases[k]
        body = {"temperature": 0, "min_new_tokens": 0, **body}
        raw = body.pop("raw", False)
        kw = {k: body.pop(k) for k in ("max_tokens", "temperature", "stop", "seed", "top_p") if k in body}
        kw.update(stream=stream, extra_body=body)
        if raw:
            r = c.completions.create(model=NAME, prompt=text, **kw)
            replies[k] = (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens)
        elif stream:
            chunks = list(chat(c, text, stream_options={"include_usage": True}, **kw))
            replies[k] = ("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices),
                          [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1], chunks[-1].usage.completion_tokens)
        else:
            r = chat(c, text, **kw)
            replies[k] = (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens)

    before = batched.health()
    threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(cases))]
    threads[0].start()
    batched.until(batched.held)  # the first is generating, held after its first piece: the others queue
    gone = http.client.HTTPConnection("127.0.0.1", batched.port, timeout=120)
    for k in range(1, len(cases)):
        if k == 6:  # the seventh request: a client that goes away once its row is decoding
            gone.request("POST", "/v1/chat/completions", json.dumps({
                "model": NAME, "messages": [{"role": "user", "content": prompt(6)}], "stream": True,
                "max_tokens": 1000, "min_new_tokens": 1000}).encode(), {"Content-Type": "application/json"})
            batched.until(lambda: batched.health()["waiting"] == 6)
        threads[k].start()
        batched.until(lambda k=k: batched.health()["waiting"] == k + (k >= 6))
    batched.hold.unlink()
    batched.until(batched.held)  # a row that joined hands out its first piece
    health = batched.health()
    assert (health["running"], health["waiting"], health["widest_batch"], health["max_batch"]) == (7, 1, 7, 7)
    resp = gone.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    gone.sock.shutdown(socket.SHUT_RDWR)
    gone.close()
    batched.until(lambda: batched.health()["disconnects"] == before["disconnects"] + 1)
    while any(t.is_alive() for t in threads):
        if batched.held():
            batched.hold.unlink()
        time.sleep(0.02)
    for t in threads:
        t.join()
    batched.until(lambda: batched.health()["cancelled"] == before["cancelled"] + 1)
    health = batched.health()
    assert health["completed"] == before["completed"] + 7 and health["errors"] == 0
    assert re.search(r"the client went away; generation stopped after \d+ pieces of text", batched.output())
    for k, (text, _, body) in enumerate(cases):
        settings = {"temperature": 0.0, "min_new_tokens": 0, **body, "max_new_tokens": body["max_tokens"]}
        del settings["max_tokens"]
        ref = reference(text, **settings)
        finish = {"end_token": "stop", "stop_string": "stop", "length": "length"}[ref.stop_reason]
        assert replies[k] == (ref.text, finish, ref.generated_tokens), k
    assert replies[3][0] != reference("Dad?", max_new_tokens=20).text  # the sampled one did sample
    assert {r[1] for r in replies.values()} == {"stop", "length"}
