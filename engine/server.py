"""The HTTP API serve.py runs: OpenAI's completions and chat completions (the protocol the `openai` client,
lm-evaluation-harness's local-completions, chat front-ends and agent frameworks speak), /v1/models, /health, and the
chat page, on FastAPI. Decoding is engine/batching.py's: every choice of every request is one engine request.

Requests are checked before anything is decoded, and every refusal is OpenAI's error object with one line in it:
400 for malformed JSON, a field of the wrong type, a value out of range or a prompt the context cannot hold, 401 for
a missing or wrong API key, 404 for an unknown model or path, 413 for a body over MAX_BODY_BYTES, 429 (with
Retry-After) when max_batch requests are decoding and max_queue are waiting. Beyond OpenAI's fields the body may set
the model's own sampling controls: top_k, min_p, repetition_penalty.
"""

import asyncio
import hmac
import json
import os
import time
import uuid
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from engine import chat
from engine.batching import Done, Failed, Overloaded, ShuttingDown
from engine.batching import Request as EngineRequest
from engine.errors import UserError
from engine.generate import Sampling, StreamDecoder, cut_at_stop

MAX_BODY_BYTES = 8 << 20
WEB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "web")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(status)
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# --- the requests' shapes ---------------------------------------------------------------------------------------
class Sampled(BaseModel):
    """Fields both endpoints take. Unknown fields are ignored (clients send their own); known ones are typed
    strictly: "0.5" is not a temperature."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 or none: off (vLLM's convention)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False

    def sampling(self) -> Sampling:
        top_k = None if self.top_k in (None, -1, 0) else self.top_k
        return Sampling(self.temperature, top_k, self.top_p, self.min_p, self.repetition_penalty)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 8:
            raise APIError(400, f"stop: at most 8 stop strings, got {len(stops)}", "stop")
        return [s for s in stops if s]


class CompletionRequest(Sampled):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1, le=16)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(Sampled):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# --- one request's choices, decoded by the engine ------------------------------------------------------------------
class Generation:
    """The choices of one API request, each an engine request whose events arrive on one asyncio queue: text as it
    becomes final (whole UTF-8 characters, holding back what could begin a stop string), then a finish reason."""

    def __init__(self, engine, tokenizer, prompts: list[list[int]], body: Sampled, max_tokens: int, end_ids, logprobs):
        self.tokenizer, self.stops = tokenizer, body.stops()
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        limit = engine.max_batch + engine.max_queue
        if len(prompts) * body.n > limit:
            raise APIError(400, f"{len(prompts) * body.n} choices (prompts x n) in one request; this server takes at "
                           f"most {limit}", "n")  # fmt: skip
        self.requests = []
        for i, prompt in enumerate(p for p in prompts for _ in range(body.n)):
            seed = None if body.seed is None else body.seed + i % body.n  # n samples of one seed differ
            request = EngineRequest(
                prompt, max_tokens, body.sampling(), self._emitter(loop, i), seed, frozenset(end_ids), logprobs
            )
            request.echo_logprobs = getattr(body, "echo", False) and logprobs is not None
            self.requests.append(request)
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens = 0
        try:
            engine.submit(*self.requests)
        except Overloaded as e:
            raise APIError(429, f"the server is busy ({e}); retry shortly", headers={"Retry-After": "1"}) from None
        except ShuttingDown as e:
            raise APIError(503, f"{e}; retry shortly") from None

    def _emitter(self, loop, index: int):
        def emit(event):
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:  # the event loop is gone (shutdown): nobody is waiting
                pass

        return emit

    def cancel(self) -> None:
        """Cancel every choice (their rows are freed at the engine's next step) and end events()."""
        for request in self.requests:
            request.cancel()
        self.queue.put_nowait((None, None))

    def echoed(self, i: int) -> list[tuple]:
        """Choice i's prompt as (id, logprob, top) tokens: the first has none, the others theirs once the engine
        has prefilled it (with echo and logprobs)."""
        request = self.requests[i]
        scores = request.prompt_logprobs or [(None, None)] * (len(request.prompt) - 1)
        rest = [(t, lp, top) for t, (lp, top) in zip(request.prompt[1:], scores, strict=True)]
        return [(request.prompt[0], None, None), *rest]

    async def collect(self, http: Request) -> list[tuple]:
        """Every event of events(), in a list; a client that goes away meanwhile cancels the choices at once (its
        disconnect is the next message the connection receives, the body having been read)."""

        async def watch():
            while (await http.receive())["type"] != "http.disconnect":
                pass
            self.cancel()

        watcher = asyncio.create_task(watch())
        try:
            return [event async for event in self.events()]
        finally:
            watcher.cancel()

    async def events(self):
        """(choice index, text, tokens [(id, logprob, top)], finish reason or None) as they come; ends when every
        choice has finished. An end token (sent only with logprobs) is a token without text."""
        pieces = [StreamDecoder(self.tokenizer.token_bytes) for _ in self.requests]
        text, shown = [""] * len(self.requests), [0] * len(self.requests)
        hold = max((len(s) for s in self.stops), default=1) - 1
        open_choices, cut = len(self.requests), set()
        while open_choices:
            i, event = await self.queue.get()
            if i is None:  # cancelled
                return
            if i in cut:  # stopped by a stop string: what is still coming is not sent
                continue
            if isinstance(event, Failed):
                self.cancel()
                raise APIError(500, event.message)
            if isinstance(event, Done):
                text[i] += pieces[i].flush()
                yield i, text[i][shown[i] :], [], event.reason
                open_choices -= 1
                continue
            self.completion_tokens += 1
            token = [(event.id, event.logprob, event.top)]
            if event.end:
                yield i, "", token, None
                continue
            text[i], stopped = cut_at_stop(text[i] + pieces[i].push(event.id), self.stops)
            safe = len(text[i]) if stopped else max(shown[i], len(text[i]) - hold)
            piece, shown[i] = text[i][shown[i] : safe], safe
            if stopped:
                self.requests[i].cancel()
                cut.add(i)
                open_choices -= 1
            yield i, piece, token, "stop" if stopped else None


class CancellingStream(StreamingResponse):
    """Server-sent events whose choices are cancelled however the response ends: finished, the client gone while
    it streams, or gone before it started (when the body's generator never runs its own cleanup)."""

    def __init__(self, gen: Generation, content):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.gen = gen

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.cancel()


# --- the app ----------------------------------------------------------------------------------------------------
def build_app(engine, model, tokenizer, name: str, api_key: str | None = None) -> FastAPI:
    """The API over a BatchEngine decoding `model` (in eval mode, on its device), named `name` in /v1/models."""
    app = FastAPI(title="nanoGPT serve", docs_url=None, redoc_url=None, openapi_url=None)
    block_size = model.config.block_size
    is_chat = bool(tokenizer.chat)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            return error_response(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'bad')})")
        where = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
        return error_response(400, f"{where}: {first['msg']}", where.split(".")[0])

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        message = {
            404: f"no route {request.method} {request.url.path}",
            405: f"no route {request.method} {request.url.path}",
            413: f"the body is over {MAX_BODY_BYTES >> 20} MiB; send a shorter prompt",
        }
        return error_response(e.status_code, message.get(e.status_code, str(e.detail)))  # fmt: skip

    @app.exception_handler(Exception)
    async def crashed(request, e: Exception):
        return error_response(500, f"the server failed on this request ({type(e).__name__}: {e})")

    # a body streamed past MAX_BODY_BYTES is stopped as it comes (inside guard, which refuses one whose
    # Content-Length says so before reading it)
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=MAX_BODY_BYTES)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        size = request.headers.get("content-length", "0")
        if not size.isdigit() or int(size) > MAX_BODY_BYTES:
            return error_response(413, f"the body is over {MAX_BODY_BYTES >> 20} MiB; send a shorter prompt")
        if api_key and request.url.path.startswith("/v1/"):
            sent = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(sent, f"Bearer {api_key}".encode()):
                return error_response(401, "a missing or wrong API key: send Authorization: Bearer <key>", None,
                                      "invalid_api_key")  # fmt: skip
        return await call_next(request)

    def check_model(body: Sampled) -> None:
        if body.model not in (None, name):
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {name!r}", "model",
                           "model_not_found")  # fmt: skip
        if body.presence_penalty or body.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported; use repetition_penalty")

    def encode(text: str, param: str) -> list[int]:
        try:
            return tokenizer.encode(text)
        except UserError as e:
            raise APIError(400, f"{param}: {e}", param) from None

    def too_long(prompt_len: int, max_tokens: int, what: str, param: str) -> APIError:
        return APIError(400, f"this model's context is {block_size} tokens; {what} is {prompt_len} and max_tokens "
                        f"{max_tokens}: shorten it or lower max_tokens", param, "context_length_exceeded")  # fmt: skip

    def token_text(t: int) -> str:
        """A token as text; one that is part of a UTF-8 character is its bytes, written as OpenAI writes them."""
        piece = tokenizer.token_bytes(t)
        try:
            return piece.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name} | engine.load()

    @app.get("/v1/models")
    async def models():
        card = {"id": name, "object": "model", "created": created, "owned_by": "nanogpt", "max_model_len": block_size}
        return {"object": "list", "data": [card | {"chat": is_chat}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        check_model(body)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of is not supported (only best_of = n)", "best_of")
        raw = body.prompt if isinstance(body.prompt, list) and body.prompt else [body.prompt]
        if isinstance(raw[0], int):  # one prompt of token ids
            raw = [raw]
        prompts = []
        for p in raw:
            ids = encode(p, "prompt") if isinstance(p, str) else p
            if any(not 0 <= t < tokenizer.vocab_size for t in ids):
                raise APIError(400, f"prompt: token ids must be in [0, {tokenizer.vocab_size})", "prompt")
            if not ids:
                if tokenizer.eot_id is None:
                    raise APIError(400, "prompt: an empty prompt (this model has no end-of-text token to start from)")
                ids = [tokenizer.eot_id]
            if len(ids) + max_tokens > block_size:
                raise too_long(len(ids), max_tokens, "the prompt", "prompt")
            prompts.append(ids)
        end_ids = [tokenizer.eot_id] if tokenizer.eot_id is not None else []
        gen = Generation(engine, tokenizer, prompts, body, max_tokens, end_ids, body.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"

        def logprobs_of(tokens) -> dict:
            out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            offset = 0
            for t, logprob, top in tokens:
                out["tokens"].append(token_text(t))
                out["token_logprobs"].append(logprob)
                out["top_logprobs"].append(None if top is None else {token_text(i): p for i, p in top})
                out["text_offset"].append(offset)
                offset += len(out["tokens"][-1])
            return out

        def choice(i, text, tokens, reason, echo: bool) -> dict:
            if echo:  # the prompt first, its text and its tokens
                text, tokens = tokenizer.decode(gen.requests[i].prompt) + text, gen.echoed(i) + tokens
            scores = logprobs_of(tokens) if body.logprobs is not None and tokens else None
            return {"index": i, "text": text, "logprobs": scores, "finish_reason": reason}

        def response(choices: list[dict], **usage) -> dict:
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": name,
                    "choices": choices} | usage  # fmt: skip

        def chunk(i, text, tokens, reason, first: bool) -> dict:  # (each choice's first carries the echoed prompt)
            return response([choice(i, text, tokens, reason, body.echo and first)])

        if body.stream:
            return stream(gen, chunk)
        texts, tokens, reasons = [""] * len(gen.requests), [[] for _ in gen.requests], [None] * len(gen.requests)
        for i, text, toks, reason in await gen.collect(http):
            texts[i] += text
            tokens[i] += toks
            reasons[i] = reason or reasons[i]
        choices = [choice(i, texts[i], tokens[i], reasons[i], body.echo) for i in range(len(gen.requests))]
        usage = {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens}
        return response(choices, usage=usage | {"total_tokens": sum(usage.values())})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: Request):
        check_model(body)
        if not is_chat:
            raise APIError(400, f"{name} was not trained on chat data (no chat template in it): use /v1/completions")
        messages = [{"role": m.role.replace("developer", "system"), "content": m.text()} for m in body.messages]
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        room = limit if limit is not None else block_size // 4  # left for the reply when the conversation is cut
        try:
            newest = [*messages[:1], messages[-1]] if messages[0]["role"] == "system" else messages[-1:]
            least = len(chat.render(newest, tokenizer.encode, tokenizer.special, reply=True)[0])
            if least + room > block_size:  # what is never cut (the system message and the newest) must fit
                raise too_long(least, room, "the newest message (with the system message and the template)", "messages")
            ids, _ = chat.prompt_ids(messages, tokenizer.encode, tokenizer.special, block_size - room)
        except UserError as e:
            raise APIError(400, f"messages: {e}", "messages") from None
        max_tokens = limit if limit is not None else block_size - len(ids)
        top = (body.top_logprobs or 0) if body.logprobs else None
        gen = Generation(engine, tokenizer, [ids], body, max_tokens, [tokenizer.special[chat.END]], top)
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def logprobs_of(tokens) -> dict:
            def entry(t, p):
                return {"token": token_text(t), "logprob": p, "bytes": list(tokenizer.token_bytes(t))}

            return {"content": [entry(t, p) | {"top_logprobs": [entry(i, q) for i, q in best or []]}
                                for t, p, best in tokens]}  # fmt: skip

        def response(kind: str, choices: list[dict], **usage) -> dict:
            return {"id": rid, "object": kind, "created": int(time.time()), "model": name, "choices": choices} | usage

        def chunk(i, text, tokens, reason, first):
            delta = {"role": "assistant", "content": text} if text or reason is None else {}
            scores = logprobs_of(tokens) if body.logprobs else None
            return response("chat.completion.chunk", [{"index": i, "delta": delta, "logprobs": scores,
                                                       "finish_reason": reason}])  # fmt: skip

        if body.stream:
            return stream(gen, chunk)
        texts, tokens, reasons = [""] * body.n, [[] for _ in range(body.n)], [None] * body.n
        for i, text, toks, reason in await gen.collect(http):
            texts[i] += text
            tokens[i] += toks
            reasons[i] = reason or reasons[i]
        choices = [
            {"index": i, "message": {"role": "assistant", "content": texts[i]},
             "logprobs": logprobs_of(tokens[i]) if body.logprobs else None, "finish_reason": reasons[i]}
            for i in range(body.n)
        ]  # fmt: skip
        usage = {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens}
        return response("chat.completion", choices, usage=usage | {"total_tokens": sum(usage.values())})

    def stream(gen: Generation, chunk) -> CancellingStream:
        """Server-sent events: one chunk per piece of text (chunk(i, text, tokens, reason, first): first is True for
        a choice's first chunk), then [DONE]."""

        async def events():
            started = set()
            try:
                async for i, text, tokens, reason in gen.events():
                    if text or tokens or reason:
                        yield f"data: {json.dumps(chunk(i, text, tokens, reason, i not in started))}\n\n"
                        started.add(i)
                yield "data: [DONE]\n\n"
            except APIError as e:
                yield f"data: {json.dumps({'error': {'message': e.message, 'type': 'server_error'}})}\n\n"

        return CancellingStream(gen, events())

    @app.get("/")
    async def page():
        return FileResponse(os.path.join(WEB, "index.html"))

    app.mount("/web", StaticFiles(directory=WEB), name="web")
    return app
