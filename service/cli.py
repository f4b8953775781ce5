"""The ``ultrafastbert`` command. Subcommands register themselves in :data:`COMMANDS`.

``serve`` flags are generated from :class:`service.settings.Settings`, so every flag has a ``UFB_*`` env var
twin and a new setting cannot be forgotten on the command line. Flags left unset fall through to the env var,
then to the default. Startup problems (bad settings, missing or broken model folder) end in one clear line and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("service")

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


# ---------------------------------------------------------------------------------------------------- serve


def _flag_type(annotation: Any) -> tuple[Callable[[str], Any] | None, list[str] | None, bool]:
    """(argparse type, choices, is_bool) for a Settings field annotation."""
    from pydantic import SecretStr

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if origin is typing.Literal:
        return str, [str(a) for a in typing.get_args(annotation)], False
    if annotation is bool:
        return None, None, True
    if annotation in (int, float):
        return annotation, None, False
    if annotation is SecretStr or annotation is Path or annotation is str:
        return str, None, False
    return str, None, False


def register_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from service.settings import Settings

    p = sub.add_parser("serve", help="Serve embeddings and classification over HTTP",
                       description="Every flag can also be set with the environment variable shown.")
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
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.logs import setup_logging
    from service.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "handler") and v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"ultrafastbert serve: invalid settings: {problems}", file=sys.stderr)
        return 2
    setup_logging(settings.log_format, settings.log_level)
    loaded = _load(settings)
    if loaded is None:
        return 2

    import uvicorn

    from service.app import create_app

    app = create_app(settings, loaded)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=int(settings.shutdown_grace_s) or None,
                            log_level=settings.log_level)
    server = _Server(config, on_exit=app.state.service.begin_shutdown)
    log.info("listening on http://%s:%d", settings.host, settings.port)
    server.run()
    return 0


def _load(settings: Any) -> Any | None:
    """Load the model before binding the port: a broken folder should fail the start, loudly and briefly."""
    path = Path(settings.model)
    if not path.is_dir():
        log.error("model folder %s does not exist (pass --model PATH or set UFB_MODEL)", path)
        return None
    import torch

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    from engine.checkpoint import CheckpointError, load_model
    from service.state import DTYPES

    try:
        return load_model(path, weight_dtype=DTYPES[settings.weight_dtype])
    except CheckpointError as exc:
        log.error("cannot load model: %s", exc)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, for anything else a folder can do
        log.error("cannot load model from %s: %s: %s", path, type(exc).__name__, exc)
    return None


class _Server:
    """uvicorn.Server whose signal handling first turns readiness off, so balancers stop sending work while
    admitted requests finish (uvicorn then drains connections and runs the lifespan shutdown)."""

    def __new__(cls, config: Any, on_exit: Callable[[], None]) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                on_exit()
                super().handle_exit(sig, frame)

        return Server(config)


# ---------------------------------------------------------------------------------------------------- main

# Other subcommands (distill, evaluate) append their register function here.
COMMANDS: list[Register] = [register_serve]


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
