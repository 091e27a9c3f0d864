"""`headwise serve`: the OpenAI-compatible HTTP server. Every flag also reads HEADWISE_<FLAG>."""

from __future__ import annotations

import argparse

from headwise.clients.engine_args import add_engine_args, engine_config_from_args, env_default
from headwise.server.settings import LOG_LEVELS, ServerSettings


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the OpenAI API (completions, chat, metrics)",
        description="Serve the OpenAI API. Every flag can also be set by its "
        "environment variable, e.g. --max-queue by HEADWISE_MAX_QUEUE.",
    )
    add_engine_args(parser)
    add_server_args(parser)
    parser.set_defaults(func=run)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    d = ServerSettings()
    g.add_argument(
        "--host",
        default=env_default("--host", d.host),
        help="address to bind; 0.0.0.0 to serve other machines (default %(default)s)",
    )
    g.add_argument("--port", type=int, default=env_default("--port", d.port, int))
    g.add_argument(
        "--api-key",
        default=env_default("--api-key", d.api_key),
        help="require `Authorization: Bearer KEY` on /v1/*, /tokenize and /detokenize",
    )
    g.add_argument(
        "--max-queue",
        type=int,
        default=env_default("--max-queue", d.max_queue, int),
        help="most requests in the engine at once (running + waiting); more get HTTP 429 (default: no cap)",
    )
    g.add_argument(
        "--served-model-name",
        default=env_default("--served-model-name", d.served_model_name),
        help="the model name clients send (default: the model id)",
    )
    g.add_argument("--log-level", choices=LOG_LEVELS, default=env_default("--log-level", d.log_level))
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=env_default("--drain-timeout", d.drain_timeout, float),
        help="seconds SIGTERM waits for in-flight requests; streams still running then end "
        'with finish_reason "abort" (default %(default)s)',
    )
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=env_default("--max-request-bytes", d.max_request_bytes, int),
        help="larger request bodies get HTTP 413 before they are parsed (default %(default)s)",
    )


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        max_queue=args.max_queue,
        served_model_name=args.served_model_name,
        log_level=args.log_level,
        drain_timeout=args.drain_timeout,
        max_request_bytes=args.max_request_bytes,
    )


def run(args: argparse.Namespace) -> int:
    # plan files are checked before the server is imported and long before the model loads
    config = engine_config_from_args(args)
    from headwise.server.serve import serve

    return serve(settings_from_args(args), config)
