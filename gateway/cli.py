"""The `gateway` command line: serve, demo, check-config, explain, hash-key, new-key, mock-upstream."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import orjson

from gateway.config import ConfigError, Settings, load_settings
from gateway.logs import configure_logging


def _load(path: str, *, serving: bool = True) -> Settings:
    """The validated settings, routes, catalog and policies included (every problem at once);
    `serving` also requires a key for each upstream that needs one."""
    from gateway.routing import world_problems

    return load_settings(path, require_upstream_keys=serving, checks=world_problems)


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.process.handoff import inherit
    from gateway.process.server import serve, supervise

    overrides = {k: v for k, v in (("port", args.port), ("host", args.host)) if v is not None}
    settings = _load(args.config).with_server(overrides)
    configure_logging(settings.server.log_level, settings.server.log_format)
    if settings.server.workers > 1 and args.worker is None:
        argv = ["serve", "--config", args.config]
        argv += ["--port", str(settings.server.port), "--host", settings.server.host]
        return supervise(settings, argv)
    channel = inherit(args.channel_fd) if args.channel_fd is not None else None
    return _serve(
        serve(
            settings,
            config_path=Path(args.config),
            worker=args.worker,
            channel=channel,
            server_overrides=overrides,
        )
    )


def _serve(main: Coroutine[Any, Any, int | None]) -> int:
    """Run a serving coroutine; a socket that cannot be opened is one line on stderr, not a traceback.
    Settlements given up at shutdown (the coroutine's count) exit with EXIT_SETTLEMENTS_LOST."""
    from gateway.process.server import EXIT_SETTLEMENTS_LOST, ListenError, run

    try:
        lost = run(main)
    except ListenError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    if lost:
        print(f"gateway: {lost} settlements or releases were given up at shutdown", file=sys.stderr)
        return EXIT_SETTLEMENTS_LOST
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    configure_logging("info", "console")
    return _serve(run_demo(args.port))


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    tracing = f"tracing to {settings.telemetry.url}" if settings.telemetry.active else "tracing off"
    print(
        f"{args.config}: OK ({len(settings.tenants)} tenants, {len(settings.routes)} routes, "
        f"{len(settings.policies)} policies, store {settings.store.backend}, {tracing})"
    )
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from gateway.explain import explain, render

    settings = _load(args.config, serving=False)  # sends nothing: upstream keys are not needed
    if args.tenant not in settings.tenants:
        print(
            f"unknown tenant {args.tenant!r} (known: {', '.join(sorted(settings.tenants))})", file=sys.stderr
        )
        return 2
    try:
        body = orjson.loads(Path(args.request).read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        print(f"{args.request}: cannot read a JSON request: {exc}", file=sys.stderr)
        return 2
    result = explain(settings, args.tenant, body)
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() if args.json else render(result))
    return 0 if result.get("allowed") else 1


def cmd_hash_key(args: argparse.Namespace) -> int:
    from gateway.front.auth import hash_key

    key = sys.stdin.readline().strip()
    if not key:
        print("hash-key reads a key from standard input; got nothing", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


def cmd_new_key(args: argparse.Namespace) -> int:
    from gateway.front.auth import hash_key, new_key

    key = new_key()
    print(f"key:  {key}\nhash: {hash_key(key)}")
    return 0


def cmd_mock_upstream(args: argparse.Namespace) -> int:
    from gateway.mock_upstream import MockOptions, run_mock_upstream
    from gateway.process.server import run

    options = MockOptions(
        flavor=args.flavor,
        latency_ms=args.latency_ms,
        partial_interval_ms=args.partial_interval_ms,
        api_key=args.api_key,
        image_bytes=args.image_bytes,
        fail_status=args.fail_status,
        fail_rate=args.fail_rate,
        retry_after=args.retry_after,
        hang_ms=args.hang_ms,
        serve_dall_e_2=args.serve_dall_e_2,
    )
    configure_logging("info", "console")
    print(f"mock upstream ({args.flavor}) on http://{args.host}:{args.port}/v1", flush=True)
    run(run_mock_upstream(args.host, args.port, options))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Image-generation gateway.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = add("serve", cmd_serve, "Serve the gateway from a configuration file.")
    p.add_argument("--config", required=True, help="path to the YAML configuration")
    p.add_argument("--host", default=None, help="override server.host")
    p.add_argument("--port", type=int, default=None, help="override server.port")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # its index, from supervise
    p.add_argument(
        "--channel-fd", type=int, default=None, help=argparse.SUPPRESS
    )  # handoff.py, from supervise

    p = add(
        "demo", cmd_demo, "Run the gateway end to end offline: mock upstreams, memory store, a ready tenant."
    )
    p.add_argument("--port", type=int, default=8080)

    p = add("check-config", cmd_check_config, "Validate a configuration file and print every problem.")
    p.add_argument("config")

    p = add("explain", cmd_explain, "Show what the gateway would decide for a request, sending nothing.")
    p.add_argument("--config", required=True)
    p.add_argument("--tenant", required=True)
    p.add_argument("--json", action="store_true", help="print the decision as JSON")
    p.add_argument(
        "request",
        help='a JSON file with the request body; for an edit or a variation {"operation": "edit",'
        ' "body": {...}, "files": [{"field": "image[]", "format": "png", "width": 1024, "height": 1024,'
        ' "bytes": 1}]}',
    )

    add("hash-key", cmd_hash_key, "Print sha256:<hex> of a tenant key read from standard input.")
    add("new-key", cmd_new_key, "Make a random tenant key and print it with its hash.")

    p = add("mock-upstream", cmd_mock_upstream, "Serve an offline stand-in for the upstream image API.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--flavor", choices=["openai", "digitalocean"], default="openai")
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay before each response starts")
    p.add_argument("--partial-interval-ms", type=float, default=0.0, help="delay between streamed events")
    p.add_argument("--api-key", default=None, help="require this upstream key from callers")
    p.add_argument("--image-bytes", type=int, default=None, help="make each base64 image about this large")
    p.add_argument("--fail-status", type=int, default=None, help="answer generations with this error status")
    p.add_argument("--fail-rate", type=float, default=1.0, help="share of generations that fail (0..1)")
    p.add_argument("--retry-after", type=float, default=None, help="Retry-After seconds sent with a failure")
    p.add_argument("--hang-ms", type=float, default=0.0, help="hold each generation this long")
    p.add_argument(
        "--serve-dall-e-2",
        action="store_true",
        help="serve dall-e-2 edits and variations (an upstream that still has the retired model)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error in {exc.source}:", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
