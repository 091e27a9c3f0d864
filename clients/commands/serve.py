"""`headwise serve`: the OpenAI-compatible HTTP server. Every flag also reads HEADWISE_<FLAG>."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from headwise.clients.engine_args import add_engine_args, engine_config_from_args, env_default
from headwise.server.settings import LOG_LEVELS, ServerSettings
from headwise.server.tool_parsers import FORMATS


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
        nargs="+",
        default=_names(env_default("--served-model-name", None)),
        metavar="NAME",
        help="the model names clients may send (several: any of them; responses carry the first; "
        "env: comma-separated); default: the model id",
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
        "--max-prompts-per-request",
        type=int,
        default=env_default("--max-prompts-per-request", d.max_prompts_per_request, int),
        help="most generations (prompts x n) one request may ask for; more get HTTP 400 (default %(default)s)",
    )
    g.add_argument(
        "--header-timeout",
        type=float,
        default=env_default("--header-timeout", d.header_timeout, float),
        help="seconds a client has to send its request line and headers; then HTTP 408 (default %(default)s)",
    )
    g.add_argument(
        "--body-timeout",
        type=float,
        default=env_default("--body-timeout", d.body_timeout, float),
        help="seconds a client has to send its whole request body; then HTTP 408 (default %(default)s)",
    )
    g.add_argument(
        "--allowed-origins",
        nargs="+",
        default=_names(env_default("--allowed-origins", None)),
        metavar="ORIGIN",
        help="CORS: origins browsers may call from (* for any); default: none, no CORS headers",
    )
    g.add_argument(
        "--allowed-methods",
        nargs="+",
        default=_names(env_default("--allowed-methods", None)) or list(d.allowed_methods),
        metavar="METHOD",
        help="CORS: methods allowed to those origins (default: *)",
    )
    g.add_argument(
        "--allowed-headers",
        nargs="+",
        default=_names(env_default("--allowed-headers", None)) or list(d.allowed_headers),
        metavar="HEADER",
        help="CORS: request headers allowed to those origins (default: *)",
    )
    g.add_argument(
        "--generation-config",
        default=env_default("--generation-config", d.generation_config),
        help="sampling defaults under each request's own values: auto (the model's generation_config.json), "
        "vllm (none: the engine's), or a folder holding a generation_config.json (default %(default)s)",
    )
    g.add_argument(
        "--chat-template",
        default=env_default("--chat-template", None),
        help="a Jinja chat template file used instead of the model's (default: the model's; requests with "
        "tools use headwise's tool-aware ChatML template when the model's knows no tools)",
    )
    g.add_argument(
        "--tool-call-parser",
        choices=sorted(FORMATS),
        default=env_default("--tool-call-parser", d.tool_call_parser),
        help="how tool calls are written and read back (vLLM's names; default %(default)s, the format of "
        "headwise's shipped tool template)",
    )
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=env_default("--max-request-bytes", d.max_request_bytes, int),
        help="larger request bodies get HTTP 413 before they are parsed (default %(default)s)",
    )


def _names(value: str | None) -> list[str] | None:
    """A comma-separated environment value as a list (None when unset)."""
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


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
        max_prompts_per_request=args.max_prompts_per_request,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        allowed_origins=tuple(args.allowed_origins or ()),
        allowed_methods=tuple(args.allowed_methods),
        allowed_headers=tuple(args.allowed_headers),
        generation_config=args.generation_config,
        chat_template=args.chat_template,
        tool_call_parser=args.tool_call_parser,
    )


def run(args: argparse.Namespace) -> int:
    # plan files are checked before the server is imported and long before the model loads
    config = engine_config_from_args(args)
    from headwise.server.serve import serve

    code = serve(settings_from_args(args), config)
    exit_now(code)
    return code  # not reached


def exit_now(code: int) -> None:
    """Exit the process as soon as the server has stopped. The listening socket closed a
    moment ago, and the interpreter's teardown after that (torch's native thread pools)
    took 3-4 s here, during which probes were refused; everything the server owns is shut
    down by now, so only the logs and stdio need flushing."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
