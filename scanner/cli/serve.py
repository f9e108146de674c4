"""`memscan serve`: the HTTP API and the prompt page, with the model loaded once."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ..errors import MemscanError
from .common import EXIT_OK, add_threshold_options, model_command, scanner_and_threshold
from .generation import MitigationPlan, mitigation_budget

if TYPE_CHECKING:
    from ..calibration import Threshold
    from ..detect import Scanner
    from ..mitigate import MitigationSettings


def serve_mitigation(args: argparse.Namespace, scanner: Scanner, threshold: Threshold) -> MitigationSettings | None:
    """What `POST /v1/mitigate` aims for: as `memscan mitigate` with the service's calibration, else its threshold."""
    from ..calibration import load_calibration

    if threshold.value is None:
        return None
    # The calibration the threshold came from also carries the normal prompts' median that mitigation aims for.
    calibration = load_calibration(threshold.calibration) if threshold.calibration else None
    return MitigationPlan(None if calibration else threshold.value, calibration, mitigation_budget(args)).settings(scanner)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the score/explain API and the prompt page until interrupted."""
    try:
        import uvicorn  # noqa: F401  (run_server's; missing, it is this one-line error)

        from ..service import create_app
    except ImportError as exc:
        raise MemscanError(f"memscan serve needs the serve extra: pip install 'memscan[serve]' ({exc.name} missing)") from exc

    from ..service.guard import load_token

    if not 0 <= args.port <= 65535:
        raise MemscanError(f"--port must be in 0..65535, got {args.port}")
    if args.max_concurrency < 1:
        raise MemscanError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    token = load_token(args.token_file)  # before the load: a bad token file is a one-line error at once
    scanner, threshold = scanner_and_threshold(args)
    print(f"memscan: {threshold.describe()}", file=sys.stderr, flush=True)
    app = create_app(
        scanner, threshold=threshold.value, mitigation=serve_mitigation(args, scanner, threshold), batch_size=args.batch_size,
        host=args.host, token=token, max_concurrency=args.max_concurrency, cors_origins=args.cors_origin or (),
        log=say,
    )
    run_server(app, args.host, args.port, f"serving {scanner.model.source}")
    return EXIT_OK


def say(line: str) -> None:
    """One `memscan:` line on stderr, at once (a service's log is read while it runs)."""
    print(f"memscan: {line}", file=sys.stderr, flush=True)


def run_server(app: object, host: str, port: int, what: str) -> None:
    """Run `app` with uvicorn until interrupted; say when it listens (the model is loaded by then) and when it stops."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list | None = None) -> None:
            await super().startup(sockets)
            if self.started:  # the sockets listen: requests are answered from now on
                bound = self.servers[0].sockets[0].getsockname()[1] if self.servers else port
                say(f"ready: {what} on http://{host}:{bound}/ (Ctrl-C stops)")

        async def shutdown(self, sockets: list | None = None) -> None:
            await super().shutdown(sockets)
            # Here, not after run(): uvicorn re-raises a caught SIGTERM/SIGINT once it has shut down.
            say("stopped")

    # uvicorn's own access log is off: the app logs each request in one line (method, route, status, ms).
    Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)).run()


def add_serve_command(commands: argparse._SubParsersAction) -> None:
    """Register `serve` on the `memscan` subparsers."""
    serve = model_command(
        commands,
        "serve",
        cmd_serve,
        help="HTTP API and interactive prompt page",
        description=(
            "Serve POST /v1/score, POST /v1/explain, POST /v1/mitigate, GET /healthz and the prompt page at /, "
            "with the model loaded once. API schema: /docs and /openapi.json."
        ),
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument(
        "--token-file", metavar="FILE",
        help="require `Authorization: Bearer TOKEN` (the file's first line; default: $MEMSCAN_TOKEN) on every route but "
        "/healthz; without one, a --host beyond loopback is warned about",
    )
    serve.add_argument("--max-concurrency", type=int, default=64, help="requests handled at once; more get 503 (default: 64)")
    serve.add_argument("--cors-origin", action="append", metavar="URL", help="allow browser calls from this origin (repeatable; default: none)")
    add_threshold_options(serve, " (the page shows the verdict)")
