"""The ``ultrafastbert`` command. Subcommands register themselves in :data:`COMMANDS`.

``serve`` flags are generated from :class:`service.settings.Settings`, so every flag has a ``UFB_*`` env var
twin and a new setting cannot be forgotten on the command line. Flags left unset fall through to the env var,
then to the default. Startup problems (bad settings, missing or broken model folder) end in one clear line and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engine.training.cli import register_corpus, register_distill, register_evaluate

log = logging.getLogger("service")

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


# ---------------------------------------------------------------------------------------------------- serve


def _flag_type(annotation: Any) -> tuple[Callable[[str], Any], list[str] | None, bool]:
    """(argparse type, choices, is_bool) for a Settings field annotation (a bool's type, ``str``, goes unused: its
    flag takes no value)."""
    from pydantic import SecretStr

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if origin is typing.Literal:
        choices = [str(a) for a in typing.get_args(annotation)]
        return _any_case(choices), choices, False
    if annotation is bool:
        return str, None, True
    if annotation in (int, float):
        return annotation, None, False
    if annotation is SecretStr or annotation is Path or annotation is str:
        return str, None, False
    return str, None, False


def _any_case(choices: list[str]) -> Callable[[str], str]:
    """An argparse type that matches ``choices`` in any case (``--log-level INFO``, as ``UFB_LOG_LEVEL=INFO`` is)."""

    def parse(value: str) -> str:
        return next((c for c in choices if c.lower() == value.lower()), value)

    return parse


def register_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from service.settings import Settings

    p = sub.add_parser(
        "serve",
        help="Serve embeddings and classification over HTTP",
        description="Every flag can also be set with the environment variable shown.",
    )
    for name, field in Settings.model_fields.items():
        kind, choices, is_bool = _flag_type(field.annotation)
        flag = "--" + name.replace("_", "-")
        env = f"UFB_{name.upper()}"
        default = field.default if name != "api_key" else None
        help_ = f"{field.description or ''} [env {env}; default {default}]".strip()
        if is_bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(flag, dest=name, type=kind, choices=choices, default=None, help=help_)
    _ray_arguments(p)
    p.set_defaults(handler=run_serve)


RAY_DEST = "ray_"  # argparse dest prefix of the --ray-* flags, kept apart from the Settings flags


def _ray_arguments(p: argparse.ArgumentParser) -> None:
    """``--ray`` and the ``--ray-*`` flags, generated from RayOptions (which does not import ray)."""
    from service.ray_serve.options import RayOptions

    g = p.add_argument_group(
        "Ray Serve",
        "Run the same service as Ray Serve replicas (needs the 'ray' extra: "
        "pip install 'ultrafastbert-serve[ray]'). --host/--port are the Serve HTTP proxy's.",
    )
    g.add_argument(
        "--ray",
        dest="ray",
        action="store_true",
        default=None,
        help="serve on a Ray cluster (a new local one unless --ray-address or RAY_ADDRESS says "
        "otherwise) [env UFB_RAY=1]",
    )
    for name, field in RayOptions.model_fields.items():
        kind, _, _ = _flag_type(field.annotation)
        help_ = f"{field.description or ''} [env UFB_RAY_{name.upper()}; default {field.default}]".strip()
        g.add_argument("--ray-" + name.replace("_", "-"), dest=RAY_DEST + name, type=kind, default=None, help=help_)


def run_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.logs import setup_logging
    from service.settings import Settings

    given = {k: v for k, v in vars(args).items() if k not in ("command", "handler", "ray") and v is not None}
    overrides = {k: v for k, v in given.items() if not k.startswith(RAY_DEST)}
    ray_overrides = {k[len(RAY_DEST) :]: v for k, v in given.items() if k.startswith(RAY_DEST)}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"ultrafastbert serve: invalid settings: {_problems(exc)}", file=sys.stderr)
        return 2
    ray_requested = bool(args.ray) or os.environ.get("UFB_RAY", "").strip().lower() in ("1", "true", "yes", "on")
    if ray_requested or ray_overrides:
        return _run_serve_ray(settings, ray_overrides, ray_requested)
    setup_logging(settings.log_format, settings.log_level)
    loaded = _load(settings)
    if loaded is None:
        return 2

    import uvicorn

    from service.app import create_app
    from service.connections import connection_options

    app = create_app(settings, loaded)
    # a float: int() made a grace under 1 s "0 -> None", i.e. wait for ever
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_grace_s,  # type: ignore[arg-type]  # uvicorn annotates int
        log_level=settings.log_level,
        **connection_options(settings),
    )
    server = _Server(config, on_exit=app.state.service.begin_shutdown, delay_s=settings.shutdown_delay_s)
    log.info("listening on http://%s:%d", settings.host, settings.port)
    server.run()
    log.info("stopped cleanly")
    return 0


def _problems(exc: Any, whole: str = "") -> str:
    """A pydantic ValidationError as one line: ``field: message; ...`` (``whole`` names model-level errors)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or whole}: {e['msg']}" for e in exc.errors())


def _run_serve_ray(settings: Any, ray_overrides: dict[str, Any], ray_requested: bool) -> int:
    """``serve --ray``: the replicas load the model, not this process; ray is imported only on this path."""
    import importlib.util

    from pydantic import ValidationError

    from service.logs import setup_logging
    from service.ray_serve.options import RayOptions

    if not ray_requested:
        print("ultrafastbert serve: --ray-* options need --ray", file=sys.stderr)
        return 2
    try:
        options = RayOptions(**ray_overrides)
    except ValidationError as exc:
        print(f"ultrafastbert serve: invalid Ray options: {_problems(exc, 'ray')}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        print("ultrafastbert serve --ray needs Ray Serve: pip install 'ultrafastbert-serve[ray]'", file=sys.stderr)
        return 2
    setup_logging(settings.log_format, settings.log_level)
    from service.ray_serve.launch import serve_on_ray

    return serve_on_ray(settings, options)


def _load(settings: Any) -> Any | None:
    """Load the model before binding the port: a broken folder should fail the start, loudly and briefly."""
    from engine.checkpoint import CheckpointError
    from service.state import load_from_settings

    try:
        return load_from_settings(settings)
    except CheckpointError as exc:
        log.error("cannot load model: %s", exc)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, for anything else a folder can do
        log.error("cannot load model from %s: %s: %s", settings.model, type(exc).__name__, exc)
    return None


class _Server:
    """uvicorn.Server whose signal handling first turns readiness off, so balancers stop sending work while
    admitted requests finish (uvicorn then drains connections and runs the lifespan shutdown).

    * SIGTERM/SIGINT: readiness off and new work refused at once; after ``delay_s`` (listener still open,
      answering 503) uvicorn stops accepting, waits for in-flight requests, runs the lifespan drain.
    * A further signal during the delay skips the rest of it; one during the drain forces the exit.
    * The signal is *not* re-raised after a clean drain (uvicorn's default), so the exit status is 0, which
      is what a graceful stop means to process supervisors.
    """

    def __new__(cls, config: Any, on_exit: Callable[[], None], delay_s: float = 0.0) -> Any:
        import threading

        import uvicorn

        class Server(uvicorn.Server):
            _signals = 0

            def handle_exit(self, sig: int, frame: Any) -> None:
                self._signals += 1
                on_exit()
                if self._signals == 1 and delay_s > 0 and not self.should_exit:
                    log.info("signal %d: not ready; closing the port in %.1fs, then draining", sig, delay_s)
                    timer = threading.Timer(delay_s, self._exit_now)
                    timer.daemon = True
                    timer.start()
                elif self.should_exit or self._signals > 2:
                    self.force_exit = True
                else:
                    self.should_exit = True

            def _exit_now(self) -> None:
                self.should_exit = True

        return Server(config)


# ---------------------------------------------------------------------------------------------------- main

# Other subcommands append their register function here; training's live in engine.training.cli.
COMMANDS: list[Register] = [register_serve, register_corpus, register_distill, register_evaluate]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ultrafastbert", description="UltraFastBERT Serve")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
