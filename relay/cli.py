"""The ``relay`` command line: argument parsing, logging setup and exit statuses.

    relay serve [--config FILE] [--log-level LEVEL] [--app-dir DIR]
                [--log-format text|json]              run the gateway (embedded default
                                                      without --config)
    relay check-config FILE [--app-dir DIR]           run serve's checks, bind nothing
    relay mint-token AGENT [--config FILE] [--url]    print a one-time token and wsUrl
    relay --version

Exit statuses: 0 success; 2 for a usage error, a bad or missing config file, an address
that cannot be bound, or a bind outside loopback without safe keys (docs/reference.md,
"Configuration"). ``serve`` and ``check-config`` run the same preflight (`_preflight`:
the config, the exposure rules of ``relay.exposure``, then ``relay.preflight.prepare``:
store, key ring, ``python:`` bots, TLS files) before anything is bound. Errors go to stderr
as ``relay: <file>: <key>: <problem>``.

In-process bots are imported as uvicorn imports apps: ``--app-dir`` (default: the working
directory) is put first on ``sys.path``, so ``bot = "python:mybot:bot"`` finds ``mybot.py``
next to where ``relay serve`` runs.

This module owns no gateway logic: ``serve`` hands the validated ``Config`` to
``relay.server.run_gateway``, which blocks until shutdown and returns the exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from relay.config import Config, default_config, load_config, with_workers
from relay.errors import BindError, ConfigError
from relay.exposure import check_exposure
from relay.workers import apply_worker_binds

__all__ = ["main"]

EXIT_OK = 0
EXIT_USAGE = 2  # argparse's own status for bad arguments; also every config / bind error

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger("relay.cli")

Handler = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): report it, don't exit
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_usage(sys.stderr)
        print("relay: error: a command is required", file=sys.stderr)
        return EXIT_USAGE
    return handler(args)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="Self-hosted WebSocket gateway for real-time voice and media bots.",
    )
    parser.add_argument("--version", action="version", version=f"relay {_version()}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_serve(commands)
    _add_check_config(commands)
    _add_mint_token(commands)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("relay")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


REFERENCE = "docs/reference.md"


def _add_app_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--app-dir", metavar="DIR", default=".",
                   help="directory put first on the import path for python: bots "
                   "(default: the working directory)")


def _preflight(config: Config, app_dir: str) -> tuple[list[str], list[str]]:
    """Every check serve runs before it binds; raises ConfigError.

    Shared by ``serve`` and ``check-config``: a config check-config calls ok is one serve
    starts with (apart from binding the addresses). Returns the warnings: those serve logs
    itself (exposure), and those the Gateway logs when it starts (the key ring).
    """
    from relay.preflight import prepare

    exposure = check_exposure(config, os.environ)
    path = os.path.abspath(app_dir)
    if path not in sys.path:
        sys.path.insert(0, path)
    return exposure, list(prepare(config, os.environ).warnings)


# --------------------------------------------------------------------------------------
# relay serve
# --------------------------------------------------------------------------------------


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway. Without --config, runs the embedded default: one "
        "auth-none agent 'echo' at ws://127.0.0.1:8700/ws/generic/echo.local.",
    )
    p.add_argument("--config", metavar="FILE",
                   help=f"TOML config file (every key: {REFERENCE}, \"Configuration\")")
    p.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        type=str.lower,
        help="log to stderr at this level and above (default: info)",
    )
    _add_app_dir(p)
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        type=str.lower,
        help="text lines, or one JSON object per line (default: text); either way one "
        "line per ended session on the logger 'relay.sessions'",
    )
    p.add_argument(
        "--workers",
        metavar="N",
        type=int,
        help="run N worker processes sharing both binds (overrides [server] workers; "
        'more than 1 needs [store] backend = "redis")',
    )
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level, args.log_format)
    try:
        config = load_config(args.config) if args.config else default_config()
        if args.workers is not None:
            config = with_workers(config, args.workers)
        config = apply_worker_binds(config)  # a worker under relay.supervisor
        warnings, _ = _preflight(config, args.app_dir)  # the Gateway logs the rest itself
    except ConfigError as exc:
        return _fail(exc)
    if not args.config:
        log.info("no --config given: running the embedded default (agent 'echo', auth none)")
    for warning in warnings:
        log.warning("%s", warning)

    # Imported only now, with a valid config in hand: nothing is bound before this point.
    from relay.server import run_gateway  # type: ignore[import-not-found, unused-ignore]
    from relay.supervisor import run_supervisor

    try:
        if config.server.workers > 1:
            return run_supervisor(config, args.config, args.log_level,
                                  os.path.abspath(args.app_dir), args.log_format)
        status: int = run_gateway(config)
    except (ConfigError, BindError) as exc:  # e.g. an address in use, Redis without a secret
        return _fail(exc)
    return status


def _configure_logging(level: str, log_format: str = "text") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format=LOG_FORMAT,
        stream=sys.stderr,
        force=True,  # main() may run more than once in one process (tests, embedding)
    )
    if log_format == "json":
        from relay.session_log import JsonFormatter

        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())


# --------------------------------------------------------------------------------------
# relay check-config
# --------------------------------------------------------------------------------------


def _add_check_config(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "check-config",
        help="run every check serve runs, without binding anything",
        description="Parse and validate FILE, then run the checks serve runs before it "
        "binds (exposure rules, python: bots import, the store backend, the key ring in "
        "secret_env, TLS files); print 'FILE: ok (N agents)' and a line per agent (its "
        "bot, websocket_auth and bot_protocol), or the problem. Only whether the addresses "
        "can be bound is left to serve.",
    )
    p.add_argument("file", metavar="FILE", help="TOML config file")
    _add_app_dir(p)
    p.set_defaults(handler=_check_config)


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
        exposure, at_start = _preflight(config, args.app_dir)
        warnings = [*exposure, *at_start]
    except ConfigError as exc:
        return _fail(exc)
    for warning in warnings:
        print(f"relay: warning: {warning}", file=sys.stderr)
    print(f"{args.file}: ok ({_agents_summary(config)})")
    for line in _agent_lines(config):
        print(line)
    return EXIT_OK


def _agent_lines(config: Config) -> list[str]:
    """One line per agent: its bot, its auth and how the held body reaches the bot."""
    lines = []
    for agent in config.agents.values():
        how = ("in-process, body as session.body" if agent.bot.startswith("python:")
               else f'bot_protocol "{agent.bot_protocol}"')
        lines.append(f'  {agent.name}: {agent.bot} (websocket_auth "{agent.websocket_auth}", '
                     f"{how})")
    return lines


def _agents_summary(config: Config) -> str:
    n = len(config.agents)
    return f"{n} agent" if n == 1 else f"{n} agents"


# --------------------------------------------------------------------------------------
# relay mint-token
# --------------------------------------------------------------------------------------


def _add_mint_token(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "mint-token",
        help="print a one-time token and wsUrl for AGENT (for scripts and tests)",
        description="Mint a token for AGENT with the key material the server uses (the "
        "variable [server] secret_env names), and print JSON {token, wsUrl, sessionId}. "
        "The token carries no held body; it is valid for 5 minutes and one upgrade.",
    )
    p.add_argument("agent", metavar="AGENT", help="an agent with websocket_auth = 'token'")
    p.add_argument("--config", metavar="FILE", help="TOML config file (default: embedded)")
    p.add_argument("--url", action="store_true",
                   help="print only the URL with the token as its last path segment")
    p.set_defaults(handler=_mint_token)


def _mint_token(args: argparse.Namespace) -> int:
    import json
    import os
    import time
    import uuid

    from relay.tokens import KeyRing, mint

    try:
        config = load_config(args.config) if args.config else default_config()
    except ConfigError as exc:
        return _fail(exc)
    agent = config.agents.get(args.agent)
    if agent is None:
        return _fail(ConfigError(f"no agent {args.agent!r} in the config",
                                 key="agents", file=config.source))
    var = config.server.secret_env
    value = os.environ.get(var, "")
    if not value.strip():
        return _fail(ConfigError(f"environment variable {var} is not set: mint-token signs "
                                 "with the key the server verifies, which it reads from "
                                 f"{var} ([server] secret_env)"))
    try:
        keys = KeyRing.parse(value)
    except ValueError as exc:
        return _fail(ConfigError(str(exc), key=f"environment variable {var}"))
    session_id = str(uuid.uuid4())
    org = config.server.organization
    token = mint(keys, agent=agent.name, org=org, session_id=session_id, now=time.time())
    ws_url = f"{config.server.public_url}/ws/generic/{agent.name}.{org}"
    if agent.websocket_auth != "token":
        print(f"relay: note: agent {agent.name!r} uses websocket_auth 'none'; "
              "it ignores tokens", file=sys.stderr)
    if args.url:
        print(f"{ws_url}/{token}")
    else:
        print(json.dumps({"token": token, "wsUrl": ws_url, "sessionId": session_id}))
    return EXIT_OK


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _fail(exc: ConfigError | BindError) -> int:
    print(f"relay: {exc}", file=sys.stderr)
    return exc.exit_status
