"""The HTTP face: `/v1/score`, `/v1/explain`, `/v1/mitigate`, `/healthz`, and the prompt page at `/`.

Scoring and explaining run on one worker thread, concurrent score requests merged by the
micro-batcher; mitigation (long: sampling runs) on a second thread with its own tokenizer,
so it never holds up scoring. Bad input always gets a 4xx with a JSON reason, never a 500;
an overloaded service a 503 with Retry-After. `Guard` checks the token, the requests in
flight and the body (size and deadline, on the stream).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException

from .. import __version__
from ..detect import Scanner
from ..errors import MemscanError
from ..explain import DEFAULT_METHOD, METHODS, explain
from ..io import MAX_PROMPT_CHARS
from ..mitigate import METHODS as MITIGATION_METHODS
from ..mitigate import MitigationSettings, mitigate_and_generate
from .batcher import MicroBatcher, QueueFull
from .guard import Guard, is_loopback

MAX_PROMPTS = 256  # prompts per /v1/score request
MAX_CHARS = MAX_PROMPT_CHARS  # characters per prompt, as for files (longer token sequences are truncated, and said so)
MAX_BODY_BYTES = 4 * MAX_PROMPTS * MAX_CHARS + 65_536  # UTF-8 worst case of a full request
MAX_SEEDS = 8  # generations per /v1/mitigate request (each is a full sampling run, twice)


def _utf8(text: str) -> str:
    # JSON can carry lone surrogates ("\ud800"), which are not text and break tokenizers.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("not valid UTF-8 (lone surrogate)") from exc
    return text


def _not_empty(text: str) -> str:
    # As scan rejects an empty row: an empty prompt is the unconditional one, its score 0 by construction.
    if not text.strip():
        raise ValueError("empty prompt")
    return text


Prompt = Annotated[
    str, StringConstraints(strict=True, max_length=MAX_CHARS), AfterValidator(_utf8), AfterValidator(_not_empty)
]


class ScoreRequest(BaseModel):
    """Prompts to score: 1 to MAX_PROMPTS strings of at most MAX_CHARS characters."""

    model_config = ConfigDict(extra="forbid")
    prompts: list[Prompt] = Field(min_length=1, max_length=MAX_PROMPTS)


class ScoreResult(BaseModel):
    """One prompt's score; `truncated`: the tokenizer kept only its first 75 tokens."""

    prompt: str
    score: float
    scores: list[float]
    flagged: bool | None
    n_tokens: int
    truncated: bool


class ScoreResponse(BaseModel):
    """Scores in request order, with the threshold (null: no verdict) and the model."""

    model: str
    threshold: float | None
    results: list[ScoreResult]


class ExplainRequest(BaseModel):
    """One prompt and the attribution method."""

    model_config = ConfigDict(extra="forbid")
    prompt: Prompt
    method: Literal[METHODS] = DEFAULT_METHOD  # type: ignore[valid-type]


class WordResult(BaseModel):
    """A word, its `[start, end)` span in the prompt, significance and share of the total."""

    word: str
    start: int
    end: int
    score: float
    share: float
    score_without: float | None


class SuggestionResult(BaseModel):
    """Words (indices into `words`, in drop order) whose removal together brings the prompt under the threshold."""

    words: list[int]
    prompt: str
    score: float
    safe: bool


class ExplainResponse(BaseModel):
    """The prompt's score and verdict, its words, and for a flagged prompt the words to drop to make it safe."""

    prompt: str
    score: float
    threshold: float | None
    flagged: bool | None
    method: str
    truncated: bool
    words: list[WordResult]
    suggestion: SuggestionResult | None


class MitigateRequest(BaseModel):
    """One prompt, the mitigation method, and the seeds of the generations (1 to MAX_SEEDS)."""

    model_config = ConfigDict(extra="forbid")
    prompt: Prompt
    method: Literal[MITIGATION_METHODS] = "embed"  # type: ignore[valid-type]
    seeds: list[Annotated[int, Field(strict=True, ge=0, lt=2**63)]] = Field(
        default=[0, 1, 2, 3], min_length=1, max_length=MAX_SEEDS)


class MitigateResponse(BaseModel):
    """Scores before and after (the mean first-step magnitude over the seeds), and PNG data URLs per seed."""

    prompt: str
    method: str
    mitigated_prompt: str
    score_before: float
    score_after: float
    target: float | None
    iterations: int
    seconds: float
    images_before: list[str]
    images_after: list[str]


def _png_data_url(image) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _error(status: int, reason: str, detail=None) -> JSONResponse:
    return JSONResponse({"error": reason, "detail": detail}, status_code=status)


class RequestLog:
    """ASGI middleware: one line per HTTP request to `log`: method, route, status, milliseconds."""

    def __init__(self, app, *, log: Callable[[str], None]):
        self.app = app
        self.log = log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), None

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # The path only: a query string could carry anything.
            self.log(f"{scope['method']} {scope['path']} {status or 'no response'} {1000 * (time.perf_counter() - start):.1f} ms")


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body was read already: only the disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(
    scanner: Scanner, threshold: float | None = None, mitigation: MitigationSettings | None = None,
    batch_size: int = 16, window_s: float = 0.005, *,
    host: str = "127.0.0.1", token: str | None = None, max_concurrency: int = 64, max_queued_prompts: int = 4096,
    cors_origins: Sequence[str] = (), body_timeout_s: float = 30.0, log: Callable[[str], None] | None = None,
) -> FastAPI:
    """The service for one loaded Scanner; `threshold` (optional) turns scores into verdicts.

    `mitigation` is what `POST /v1/mitigate` aims for (default: the threshold, with the paper's budget).
    `token` (see `guard.load_token`) is then required as `Authorization: Bearer` on every route but
    /healthz; `host` is where it will listen, only to warn when that is not loopback and no token is
    set. At most `max_concurrency` requests run at once and `max_queued_prompts` prompts wait for
    the model (503 past either); a body must arrive within `body_timeout_s` (408). CORS answers
    only `cors_origins` (none: off). `log`, when given, gets one line per request."""
    if mitigation is None and threshold is not None:
        mitigation = MitigationSettings(target=threshold)
    if scanner.settings.noise != "shared":
        raise MemscanError("the service scores each prompt on its own; use --noise shared")
    if max_concurrency < 1 or max_queued_prompts < MAX_PROMPTS:
        raise MemscanError(f"max_concurrency must be >= 1 and max_queued_prompts >= {MAX_PROMPTS} (one full request)")
    if token is None and not is_loopback(host):
        warnings.warn(
            f"serving on {host}, beyond this machine, without a token: anyone who reaches it can use the model "
            "(set a bearer token)", RuntimeWarning, stacklevel=2,
        )
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memscan-model")
    # Its own thread and tokenizer (a fast tokenizer must not be entered from two threads at
    # once); the weights are shared, read only.
    mitigation_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memscan-mitigate")
    mitigation_scanner = Scanner(dataclasses.replace(scanner.model, family=scanner.family.with_own_tokenizers()), scanner.settings)

    def score_rows(prompts: list[str]) -> list[ScoreResult]:
        rows = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            scored = scanner.score(chunk)
            for i, prompt in enumerate(chunk):
                score = float(scored.score[i])
                rows.append(ScoreResult(
                    prompt=prompt,
                    score=score,
                    scores=scored.per_generation[i].tolist(),
                    flagged=None if threshold is None else score >= threshold,
                    n_tokens=scored.n_tokens[i],
                    truncated=scored.truncated[i],
                ))
        return rows

    batcher = MicroBatcher(score_rows, worker, window_s, max_queued=max_queued_prompts)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.shutdown(wait=True)
        mitigation_worker.shutdown(wait=True)

    # /docs with Swagger UI's assets from the fastapi-offline package: it works without network access.
    app = FastAPIOffline(
        title="memscan",
        summary="Score prompts for memorization by a diffusion model and explain them by word.",
        version=__version__,
        lifespan=lifespan,
        favicon_url="/favicon.ico",
    )
    app.state.batcher = batcher
    app.add_middleware(
        Guard, token=token, max_concurrency=max_concurrency, max_body_bytes=MAX_BODY_BYTES, body_timeout_s=body_timeout_s
    )
    if cors_origins:  # outermost: a preflight carries no token
        app.add_middleware(
            CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    if log is not None:  # outermost: refusals of the guard and CORS are logged too
        app.add_middleware(RequestLog, log=log)
    # With a token, the schema says so: /docs gets an Authorize button (the Guard does the checking).
    bearer = [Depends(HTTPBearer(auto_error=False))] if token is not None else []

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        response = _error(503, f"{exc}; retry")
        response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Only location, message and type: echoing the input could be huge or not JSON-able.
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
        return _error(422, "invalid request", detail)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # FastAPI's own 4xx (a body that is not UTF-8, unknown paths): the same JSON shape.
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(MemscanError)
    async def memscan_error(request: Request, exc: MemscanError) -> JSONResponse:
        return _error(422, str(exc))

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness: the model is loaded and the service answers."""
        return {"status": "ok", "model": scanner.model.fingerprint, "threshold": threshold}

    app.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)  # probes that send HEAD

    @app.post("/v1/score", response_model=ScoreResponse, dependencies=bearer)
    async def score(body: ScoreRequest, request: Request):
        """Score up to MAX_PROMPTS prompts; concurrent requests are batched together."""
        submitted = asyncio.ensure_future(batcher.submit(body.prompts))
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({submitted, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not submitted.done():  # the client went away: its prompts leave the queue unscored
            submitted.cancel()
            return _error(499, "client closed the request")
        return ScoreResponse(model=scanner.model.fingerprint, threshold=threshold, results=submitted.result())

    @app.post("/v1/explain", dependencies=bearer)
    async def explain_prompt(request: ExplainRequest) -> ExplainResponse:
        """One prompt's score and word significances; `suggestion`: the words to drop to make a flagged prompt safe."""
        loop = asyncio.get_running_loop()
        (explanation,) = await loop.run_in_executor(worker, explain, scanner, [request.prompt], request.method, threshold)
        return ExplainResponse(**explanation.to_dict(threshold))

    pipelines = []  # built on the first mitigation: scoring alone never needs the VAE

    def mitigate_prompt(request: MitigateRequest) -> MitigateResponse:
        from ..generate import build_pipeline

        if request.method == "embed" and mitigation is None:
            raise MemscanError(
                "the embed method needs a target: start memscan serve with --threshold or --calibration"
            )
        if not pipelines:
            pipelines.append(build_pipeline(mitigation_scanner.model))
        settings = scanner.settings
        done = mitigate_and_generate(
            mitigation_scanner, pipelines[0], request.prompt, request.method, request.seeds,
            mitigation or MitigationSettings(target=float("inf")), settings.num_inference_steps, settings.guidance_scale,
        )
        result = done.result
        return MitigateResponse(
            prompt=request.prompt, method=result.method, mitigated_prompt=result.prompt,
            score_before=result.score_before, score_after=result.score_after, target=None if mitigation is None else mitigation.target,
            iterations=result.iterations, seconds=result.seconds,
            images_before=[_png_data_url(image) for image in done.before],
            images_after=[_png_data_url(image) for image in done.after],
        )

    @app.post("/v1/mitigate", dependencies=bearer)
    async def mitigate(request: MitigateRequest) -> MitigateResponse:
        """Mitigate one prompt (down to the service's target) and generate before and after, per seed."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(mitigation_worker, mitigate_prompt, request)

    static = resources.files("scanner.service").joinpath("static")
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(static.joinpath("index.html")))

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(str(static.joinpath("favicon.svg")), media_type="image/svg+xml")

    return app
