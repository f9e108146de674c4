"""`memscan serve`'s API: scores and explanations as the library computes them, micro-batching,
4xx with a JSON reason for every kind of bad input, and the OpenAPI schema."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import threading

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from scanner.detect import DetectSettings, Scanner
from scanner.errors import MemscanError
from scanner.explain import explain
from scanner.model import load_model
from scanner.service import MAX_CHARS, MAX_PROMPTS, create_app
from scanner.generate import build_pipeline
from scanner.mitigate import MitigationSettings, mitigate_and_generate
from scanner.service.app import MAX_BODY_BYTES, MAX_SEEDS
from scanner.service.batcher import MicroBatcher

PROMPT = "a cat, sitting on a red sofa"
LONG = " ".join(["unbelievablyxyzzy"] * 30)  # 150 tokens, far under MAX_CHARS


@pytest.fixture(scope="module")
def scanner(tiny_sd1):
    return Scanner(load_model(tiny_sd1, device="cpu"), DetectSettings(seed=random.randrange(2**31)))


@pytest.fixture(scope="module")
def threshold(scanner):
    return float(scanner.score([PROMPT]).score[0])  # PROMPT sits exactly on it: flagged


@pytest.fixture(scope="module")
def app(scanner, threshold):
    return create_app(scanner, threshold=threshold)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as client:
        yield client


def test_score_matches_the_library(client, scanner, threshold):
    prompts = ["x", PROMPT, LONG, "x"]
    response = client.post("/v1/score", json={"prompts": prompts})
    assert response.status_code == 200
    body = response.json()
    expected = Scanner(scanner.model, scanner.settings).score(prompts)
    assert body["threshold"] == threshold and body["model"] == scanner.model.fingerprint
    assert [r["prompt"] for r in body["results"]] == prompts
    for row, score in zip(body["results"], expected.score):
        assert row["score"] == pytest.approx(float(score), rel=1e-5)
        assert row["flagged"] == (row["score"] >= threshold)
    assert body["results"][1]["flagged"] is True
    assert [r["truncated"] for r in body["results"]] == [False, False, True, False]
    assert body["results"][2]["n_tokens"] == 150


@pytest.mark.parametrize("method", ["grad", "ablation"])
def test_explain_matches_the_library(client, scanner, method):
    response = client.post("/v1/explain", json={"prompt": PROMPT, "method": method})
    assert response.status_code == 200
    body = response.json()
    (expected,) = explain(Scanner(scanner.model, scanner.settings), [PROMPT], method, body["threshold"])
    assert body["flagged"] is True and body["method"] == method
    assert [w["word"] for w in body["words"]] == [w.word for w in expected.words]
    assert [w["score"] for w in body["words"]] == pytest.approx([w.score for w in expected.words], rel=1e-4, abs=1e-6)
    # The suggested set, the same whichever method ranks the words: its removal makes the prompt safe.
    suggestion = body["suggestion"]
    assert suggestion["words"] == expected.suggestion.words and suggestion["safe"] is True
    assert suggestion["score"] < body["threshold"] and suggestion["prompt"] == expected.suggestion.prompt


def test_explain_defaults_to_ablation_and_suggests_nothing_for_a_safe_prompt(scanner, threshold):
    with TestClient(create_app(scanner, threshold=threshold + 1e6)) as client:
        body = client.post("/v1/explain", json={"prompt": PROMPT}).json()
    assert body["method"] == "ablation" and body["flagged"] is False and body["suggestion"] is None


def _png_pixels(data_url: str) -> np.ndarray:
    from PIL import Image

    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


@pytest.mark.parametrize("method", ["embed", "rand-number"])
def test_mitigate_matches_the_library(client, scanner, threshold, method):
    seeds = random.sample(range(1000), 2)
    response = client.post("/v1/mitigate", json={"prompt": PROMPT, "method": method, "seeds": seeds})
    assert response.status_code == 200, response.text
    body = response.json()
    fresh = Scanner(scanner.model, scanner.settings)
    expected = mitigate_and_generate(fresh, build_pipeline(scanner.model), PROMPT, method, seeds, MitigationSettings(threshold))
    assert body["target"] == threshold and body["iterations"] == expected.result.iterations
    assert body["score_before"] == pytest.approx(expected.result.score_before, rel=1e-5)
    assert body["score_after"] == pytest.approx(expected.result.score_after, rel=1e-5)
    assert body["mitigated_prompt"] == expected.result.prompt
    for urls, images in ((body["images_before"], expected.before), (body["images_after"], expected.after)):
        assert len(urls) == len(seeds)
        for url, image in zip(urls, images):
            assert np.abs(_png_pixels(url).astype(int) - image).max() <= 1


def test_mitigate_aims_for_the_services_mitigation_settings(scanner, threshold):
    # Not the threshold: a target and budget of its own (as `memscan serve --calibration` sets them).
    settings = MitigationSettings(target=0.0, learning_rate=float(np.random.uniform(0.02, 0.2)), max_iterations=2)
    with TestClient(create_app(scanner, threshold=threshold, mitigation=settings)) as client:
        body = client.post("/v1/mitigate", json={"prompt": PROMPT, "seeds": [0]}).json()
    expected = mitigate_and_generate(Scanner(scanner.model, scanner.settings), build_pipeline(scanner.model), PROMPT,
                                     "embed", [0], settings)
    assert (body["target"], body["iterations"]) == (0.0, 2)
    assert body["score_after"] == pytest.approx(expected.result.score_after, rel=1e-5)


def test_serve_mitigates_as_memscan_mitigate_does_with_a_calibration():
    from argparse import Namespace

    from scanner.calibration import Threshold, load_calibration
    from scanner.cli.serve import serve_mitigation
    from scanner.mitigate import model_budget
    from scanner.testbed import default_model_path

    folder = default_model_path()
    calibration = load_calibration(folder / "calibration.json")
    testbed = Scanner(load_model(folder, device="cpu"), DetectSettings())
    settings = serve_mitigation(Namespace(model=str(folder), calibration=str(folder / "calibration.json")), testbed,
                                 Threshold(calibration.threshold, "calibration", str(folder / "calibration.json")))
    assert (settings.target, settings.trigger) == (calibration.normal_median, calibration.threshold)
    assert settings.learning_rate == model_budget(folder)["learning_rate"]
    # With --threshold alone there is one target, the threshold; with neither, nothing to aim for.
    plain = serve_mitigation(Namespace(model=str(folder), calibration=None), testbed, Threshold(0.5, "--threshold"))
    assert (plain.target, plain.trigger) == (0.5, None)
    assert serve_mitigation(Namespace(model=str(folder), calibration=None), testbed, Threshold(None)) is None


def test_healthz_and_page(client, scanner):
    assert client.get("/healthz").json()["model"] == scanner.model.fingerprint
    page = client.get("/")
    assert page.status_code == 200 and 'id="prompt"' in page.text
    for asset in ("app.js", "style.css", "favicon.svg"):
        assert client.get(f"/static/{asset}").status_code == 200
    assert client.get("/favicon.ico").headers["content-type"] == "image/svg+xml"


def test_docs_load_their_assets_from_the_service(client):
    """Offline /docs: Swagger UI's script and styles come from the service itself, never from a CDN."""
    import re

    docs = client.get("/docs")
    assert docs.status_code == 200
    urls = re.findall(r"(?:src|href)=['\"]([^'\"]+)['\"]", docs.text) + re.findall(r"url: ?['\"]([^'\"]+)['\"]", docs.text)
    assert any(u.endswith("swagger-ui-bundle.js") for u in urls) and any(u.endswith(".css") for u in urls), urls
    assert all(u.startswith("/") for u in urls), urls  # nothing from another host
    for url in urls:
        assert client.get(url).status_code == 200, url


def test_with_a_token_the_page_and_docs_are_open_and_the_api_is_not(scanner):
    with TestClient(create_app(scanner, token="s3cret")) as client:
        for path in ("/", "/static/app.js", "/favicon.ico", "/docs", "/openapi.json", "/healthz"):
            assert client.get(path).status_code == 200, path
        assert client.post("/v1/explain", json={"prompt": PROMPT}).status_code == 401
        assert client.post("/", json={}).status_code == 401  # only reading the page is open
        authorized = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/explain", json={"prompt": PROMPT}, headers=authorized).status_code == 200
        assert "HTTPBearer" in client.get("/openapi.json").json()["components"]["securitySchemes"]


def test_each_request_is_logged(scanner):
    lines = []
    with TestClient(create_app(scanner, log=lines.append)) as client:
        client.get("/healthz")
        client.post("/v1/score", json={"prompts": [""]})
    assert [line.rsplit(" ", 2)[0] for line in lines] == ["GET /healthz 200", "POST /v1/score 422"]
    assert all(float(line.split()[-2]) >= 0 and line.endswith(" ms") for line in lines)


def _json(body) -> dict:
    return {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}}


BAD_REQUESTS = {
    "prompts not a list": ("/v1/score", _json({"prompts": "a cat"}), 422),
    "prompt not a string": ("/v1/score", _json({"prompts": ["a", 7]}), 422),
    "null prompt": ("/v1/score", _json({"prompts": [None]}), 422),
    "missing field": ("/v1/score", _json({}), 422),
    "unknown field": ("/v1/score", _json({"prompts": ["a"], "n": 4}), 422),
    "body a list": ("/v1/score", _json(["a"]), 422),
    "empty list": ("/v1/score", _json({"prompts": []}), 422),
    "empty prompt": ("/v1/score", _json({"prompts": ["a cat", ""]}), 422),
    "blank prompt": ("/v1/score", _json({"prompts": [" \t\n"]}), 422),
    "explain empty prompt": ("/v1/explain", _json({"prompt": ""}), 422),
    "mitigate empty prompt": ("/v1/mitigate", _json({"prompt": " "}), 422),
    "too many prompts": ("/v1/score", _json({"prompts": ["a"] * (MAX_PROMPTS + 1)}), 422),
    "prompt too long": ("/v1/score", _json({"prompts": ["a" * (MAX_CHARS + 1)]}), 422),
    "lone surrogate": ("/v1/score", {"content": b'{"prompts": ["a \\ud800"]}', "headers": {"content-type": "application/json"}}, 422),
    "invalid UTF-8": ("/v1/score", {"content": b'{"prompts": ["caf\xe9"]}', "headers": {"content-type": "application/json"}}, 400),
    "malformed JSON": ("/v1/score", {"content": b'{"prompts": ["a"', "headers": {"content-type": "application/json"}}, 422),
    "not JSON at all": ("/v1/score", {"content": b"a cat", "headers": {"content-type": "text/plain"}}, 422),
    "body too large": ("/v1/score", {"content": b" " * (MAX_BODY_BYTES + 1), "headers": {"content-type": "application/json"}}, 413),
    "explain prompt a number": ("/v1/explain", _json({"prompt": 5}), 422),
    "explain unknown method": ("/v1/explain", _json({"prompt": "a", "method": "saliency"}), 422),
    "explain prompt too long": ("/v1/explain", _json({"prompt": "a" * (MAX_CHARS + 1)}), 422),
    "mitigate unknown method": ("/v1/mitigate", _json({"prompt": "a", "method": "erase"}), 422),
    "mitigate no seeds": ("/v1/mitigate", _json({"prompt": "a", "seeds": []}), 422),
    "mitigate too many seeds": ("/v1/mitigate", _json({"prompt": "a", "seeds": list(range(MAX_SEEDS + 1))}), 422),
    "mitigate negative seed": ("/v1/mitigate", _json({"prompt": "a", "seeds": [-1]}), 422),
    "mitigate seed a string": ("/v1/mitigate", _json({"prompt": "a", "seeds": ["1"]}), 422),
    "mitigate prompt too long": ("/v1/mitigate", _json({"prompt": "a" * (MAX_CHARS + 1)}), 422),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_4xx_with_a_json_reason(client, case):
    path, request, status = BAD_REQUESTS[case]
    response = client.post(path, **request)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]


def test_limits_are_exactly_the_documented_ones(client):
    assert client.post("/v1/score", json={"prompts": ["a"] * MAX_PROMPTS}).status_code == 200
    assert client.post("/v1/score", json={"prompts": ["a" * MAX_CHARS]}).status_code == 200


def test_concurrent_requests_get_their_own_results(app, scanner):
    prompts = [[f"a photo of thing {i}", f"item {i} {j}"] for i, j in enumerate(random.sample(range(1000), 8))]

    async def run() -> list[dict]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            responses = await asyncio.gather(*(http.post("/v1/score", json={"prompts": p}) for p in prompts))
        return [r.json() for r in responses]

    bodies = asyncio.run(run())
    expected = Scanner(scanner.model, scanner.settings)
    for request, body in zip(prompts, bodies):
        assert [r["prompt"] for r in body["results"]] == request
        assert [r["score"] for r in body["results"]] == pytest.approx(expected.score(request).score.tolist(), rel=1e-5)


def test_requests_queued_while_the_worker_is_busy_run_as_one_batch():
    started, release, calls = threading.Event(), threading.Event(), []

    def run(items: list[str]) -> list[str]:
        calls.append(list(items))
        started.set()
        release.wait(timeout=60)
        return [item.upper() for item in items]

    async def scenario() -> list[list[str]]:
        from concurrent.futures import ThreadPoolExecutor

        batcher = MicroBatcher(run, ThreadPoolExecutor(max_workers=1), window_s=0)
        first = asyncio.create_task(batcher.submit(["a"]))
        await asyncio.get_running_loop().run_in_executor(None, started.wait)  # worker busy with ["a"]
        queued = [asyncio.create_task(batcher.submit([f"b{i}", f"c{i}"])) for i in range(5)]
        await asyncio.sleep(0)  # let every queued request reach the batcher
        release.set()
        return [await first, *[await q for q in queued]]

    results = asyncio.run(scenario())
    assert calls == [["a"], [x for i in range(5) for x in (f"b{i}", f"c{i}")]]
    assert results == [["A"], *[[f"B{i}", f"C{i}"] for i in range(5)]]


def test_openapi_schema(client):
    schema = client.get("/openapi.json").json()
    assert {"/v1/score", "/v1/explain", "/healthz"} <= set(schema["paths"])
    assert "/" not in schema["paths"]
    request = schema["components"]["schemas"]["ScoreRequest"]["properties"]["prompts"]
    assert request["maxItems"] == MAX_PROMPTS and request["minItems"] == 1
    assert request["items"]["maxLength"] == MAX_CHARS
    method = schema["components"]["schemas"]["ExplainRequest"]["properties"]["method"]
    assert set(method["enum"]) == {"grad", "ablation"}
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(schema)


def test_memscan_serve_command(tiny_sd1):
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "scanner.cli", "serve", "--model", str(tiny_sd1), "--port", str(port), "--threshold", "0.25"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120  # model load on a busy machine; not a latency check
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "memscan serve did not answer"
                time.sleep(0.2)
        assert health.json()["threshold"] == 0.25
        scored = httpx.post(f"http://127.0.0.1:{port}/v1/score", json={"prompts": ["a cat"]}).json()
        assert scored["results"][0]["flagged"] == (scored["results"][0]["score"] >= 0.25)
    finally:
        server.terminate()
        server.wait(timeout=30)
    lines = server.stderr.read().splitlines()
    ready = next(i for i, line in enumerate(lines) if line.startswith("memscan: ready: serving "))
    assert f"http://127.0.0.1:{port}/" in lines[ready] and "threshold 0.25 from --threshold" in "\n".join(lines[:ready])
    logged = [line for line in lines[ready:] if line.endswith(" ms")]
    assert logged[-2:][0].startswith("memscan: GET /healthz 200 ") and logged[-1].startswith("memscan: POST /v1/score 200 ")
    assert lines[-1] == "memscan: stopped"


def test_serve_usage_errors(tiny_sd1, capsys):
    from scanner.cli import EXIT_USAGE, main

    assert main(["serve", "--model", str(tiny_sd1), "--port", "70000"]) == EXIT_USAGE
    assert "--port" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_sd1), "--noise", "reference"]) == EXIT_USAGE
    assert "shared" in capsys.readouterr().err


def test_without_a_threshold_there_is_no_verdict(scanner):
    with TestClient(create_app(scanner)) as client:
        scored = client.post("/v1/score", json={"prompts": [PROMPT]}).json()
        explained = client.post("/v1/explain", json={"prompt": PROMPT}).json()
        # Nothing to mitigate down to: the embedding method needs the threshold, the baselines do not.
        refused = client.post("/v1/mitigate", json={"prompt": PROMPT, "seeds": [0]})
        baseline = client.post("/v1/mitigate", json={"prompt": PROMPT, "method": "rand-token", "seeds": [0]})
    assert scored["threshold"] is None and scored["results"][0]["flagged"] is None
    assert explained["threshold"] is None and explained["flagged"] is None
    assert refused.status_code == 422 and "--threshold" in refused.json()["error"]
    assert baseline.status_code == 200 and baseline.json()["target"] is None


def test_a_failed_batch_fails_its_requests_and_the_next_batch_runs():
    from concurrent.futures import ThreadPoolExecutor

    def run(items: list[str]) -> list[str]:
        if "boom" in items:
            raise RuntimeError("model failed")
        return items

    async def scenario():
        batcher = MicroBatcher(run, ThreadPoolExecutor(max_workers=1), window_s=0)
        failed = await asyncio.gather(batcher.submit(["a"]), batcher.submit(["boom"]), return_exceptions=True)
        return failed, await batcher.submit(["c"])

    failed, after = asyncio.run(scenario())
    assert all(isinstance(f, RuntimeError) for f in failed)  # both were in the failed batch
    assert after == ["c"]


# -- reliability: limits on the stream, overload, abandoned requests, token, CORS -------------------


async def _asgi(app, path: str, chunks: list[bytes], headers=(), then=None, method="POST", complete=True):
    """One raw ASGI request whose body arrives in `chunks` (`complete`: the last one ends it), then
    `then()` is awaited for the next message (default: a hang); returns (status, headers, JSON body,
    messages received)."""
    messages = [{"type": "http.request", "body": c, "more_body": not complete or i < len(chunks) - 1}
                for i, c in enumerate(chunks)]
    received, sent = [], []

    async def receive():
        received.append(1)
        if messages:
            return messages.pop(0)
        if then is not None:
            return await then()
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), *headers], "client": ("127.0.0.1", 1), "server": ("t", 80)}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), json.loads(body) if body else None, len(received)


def test_a_chunked_body_over_the_limit_is_refused_on_the_stream(app):
    chunk = b" " * (1 << 20)
    count = MAX_BODY_BYTES // len(chunk) + 50  # far over the limit, and no Content-Length
    status, _, body, received = asyncio.run(_asgi(app, "/v1/score", [chunk] * count))
    assert status == 413 and "over" in body["error"]
    assert received <= MAX_BODY_BYTES // len(chunk) + 2  # it stopped reading at the limit


def test_a_slow_body_times_out(scanner):
    app = create_app(scanner, body_timeout_s=0.3)
    status, _, body, _ = asyncio.run(_asgi(app, "/v1/score", [b'{"prompts": ', b'["a'], complete=False))
    assert status == 408 and "0.3 s" in body["error"]


def test_head_healthz(client):
    response = client.head("/healthz")
    assert response.status_code == 200 and response.content == b""


def _blocking_score(monkeypatch):
    """Make `Scanner.score` wait for `release` on its first call; returns (started, release, prompts scored)."""
    started, release, scored = threading.Event(), threading.Event(), []
    real = Scanner.score

    def score(self, prompts, *args, **kwargs):
        scored.extend(prompts)
        started.set()
        release.wait(timeout=60)
        return real(self, prompts, *args, **kwargs)

    monkeypatch.setattr(Scanner, "score", score)
    return started, release, scored


def test_an_abandoned_request_is_not_scored(scanner, monkeypatch):
    app = create_app(scanner)
    started, release, scored = _blocking_score(monkeypatch)

    async def scenario():
        busy = asyncio.create_task(_asgi(app, "/v1/score", [json.dumps({"prompts": ["first"]}).encode()]))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 60)

        async def disconnect():
            return {"type": "http.disconnect"}

        status, *_ = await _asgi(app, "/v1/score", [json.dumps({"prompts": ["abandoned"]}).encode()], then=disconnect)
        release.set()
        return status, (await busy)[0]

    with TestClient(app):  # the lifespan: the worker threads stop at the end
        abandoned, first = asyncio.run(scenario())
    assert (abandoned, first) == (499, 200)
    assert "abandoned" not in scored


def test_mitigate_does_not_hold_up_score(scanner, threshold, monkeypatch):
    from scanner.service import app as app_module

    started, release = threading.Event(), threading.Event()

    def slow_mitigation(*args, **kwargs):
        started.set()
        release.wait(timeout=60)
        raise MemscanError("released")

    monkeypatch.setattr(app_module, "mitigate_and_generate", slow_mitigation)
    app = create_app(scanner, threshold=threshold)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            mitigation = asyncio.create_task(http.post("/v1/mitigate", json={"prompt": PROMPT, "seeds": [0]}))
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 60)
            scored = await asyncio.wait_for(http.post("/v1/score", json={"prompts": [PROMPT]}), timeout=30)
            release.set()
            return scored.status_code, (await mitigation).status_code

    with TestClient(app):
        try:
            assert asyncio.run(scenario()) == (200, 422)
        finally:
            release.set()


def test_a_full_queue_gets_503_with_retry_after(scanner, monkeypatch):
    app = create_app(scanner, max_queued_prompts=MAX_PROMPTS, window_s=0)
    started, release, _ = _blocking_score(monkeypatch)

    async def scenario():
        post = lambda prompts: _asgi(app, "/v1/score", [json.dumps({"prompts": prompts}).encode()])  # noqa: E731
        running = asyncio.create_task(post(["on the worker"]))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 60)
        waiting = asyncio.create_task(post(["q"] * MAX_PROMPTS))  # fills the queue
        await asyncio.sleep(0.2)
        refused = await post(["one too many"])
        release.set()
        return refused, (await running)[0], (await waiting)[0]

    with TestClient(app):
        (status, headers, body, _), first, queued = asyncio.run(scenario())
    assert (status, first, queued) == (503, 200, 200)
    assert headers[b"retry-after"] == b"1" and "retry" in body["error"]


def test_requests_over_the_concurrency_limit_get_503(scanner, monkeypatch):
    app = create_app(scanner, max_concurrency=1)
    started, release, _ = _blocking_score(monkeypatch)

    async def scenario():
        running = asyncio.create_task(_asgi(app, "/v1/score", [json.dumps({"prompts": ["a"]}).encode()]))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 60)
        refused = await _asgi(app, "/v1/score", [json.dumps({"prompts": ["b"]}).encode()])
        health = await _asgi(app, "/healthz", [b""], method="GET")
        release.set()
        return refused, health[0], (await running)[0]

    with TestClient(app):
        (status, headers, _, _), health, first = asyncio.run(scenario())
    assert (status, health, first) == (503, 200, 200) and headers[b"retry-after"] == b"1"


def test_a_token_guards_every_api_route(scanner):
    with TestClient(create_app(scanner, token="s3cret", host="0.0.0.0")) as client:
        assert client.get("/healthz").status_code == 200
        for path, call in (("/v1/score", client.post), ("/v1/explain", client.post), ("/v1/mitigate", client.post)):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
                response = call(path, headers=headers, **({"json": {"prompts": ["a"]}} if call == client.post else {}))
                assert response.status_code == 401, (path, headers)
                assert response.headers["www-authenticate"] == "Bearer" and response.json()["error"]
        ok = client.post("/v1/score", json={"prompts": ["a"]}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_beyond_loopback_without_a_token_warns(scanner, recwarn):
    for host in ("127.0.0.1", "::1", "localhost"):
        create_app(scanner, host=host)
    create_app(scanner, host="0.0.0.0", token="t")
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    with pytest.warns(RuntimeWarning, match="without a token"):
        create_app(scanner, host="0.0.0.0")


def test_the_token_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from scanner.service.guard import load_token

    monkeypatch.delenv("MEMSCAN_TOKEN", raising=False)
    assert load_token() is None
    monkeypatch.setenv("MEMSCAN_TOKEN", "from-env")
    assert load_token() == "from-env"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert load_token(token_file) == "from-file"
    token_file.write_text("")
    with pytest.raises(MemscanError, match="empty"):
        load_token(token_file)


def test_cors_is_off_unless_configured(scanner):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with TestClient(create_app(scanner)) as client:
        response = client.post("/v1/score", json={"prompts": ["a"]}, headers={"Origin": "https://app.example"})
        assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
        assert "access-control-allow-origin" not in client.options("/v1/score", headers=preflight).headers
    with TestClient(create_app(scanner, token="t", cors_origins=["https://app.example"])) as client:
        allowed = client.options("/v1/score", headers=preflight)  # a preflight carries no token
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = client.options("/v1/score", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
