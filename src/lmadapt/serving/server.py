"""``lmadapt serve``: the base model loaded once, its adapters, the batching engine, the app, under uvicorn.

    serve("smollm2-135m-instruct", {"sql": "runs/sql/adapter", "chat": "runs/chat/adapter"}, port=8000,
          proxies=["bbc=runs/helper-expert/adapter,runs/helper-smollm2/model,1.0"])

binds 127.0.0.1 unless ``host`` says otherwise, and needs ``Authorization: Bearer KEY`` on every route but
``/health`` when ``api_key`` is set. An adapter that fails to load is reported and left out; the others are
served. A proxy-tuned model (:mod:`lmadapt.serving.engine_proxy`) that cannot be served (a spec that names no
model, small models whose tokenizer differs from the base's, ...) stops the start-up with the reason. SIGTERM
(and Ctrl-C) stop accepting connections, let the requests in flight finish (at most
``drain_timeout`` seconds: uvicorn's graceful shutdown, then ``engine.shutdown(drain=True)``), and return.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmadapt.errors import LmadaptError
from lmadapt.models.loading import ModelConfig, load_model, model_display_name
from lmadapt.serving.app import Limits, ServedBase, create_app
from lmadapt.serving.engine import Engine
from lmadapt.serving.engine_proxy import ProxySpec, load_proxy
from lmadapt.serving.openai_api import check_adapter_name

log = logging.getLogger("lmadapt.serve")


@dataclass
class Loaded:
    """What :func:`load_engine` made: the engine (not started), its tokenizer, the base as clients see it, and
    the adapters that could not be loaded (name -> why)."""

    engine: Engine
    tokenizer: Any
    base: ServedBase
    failed: dict[str, str]


def load_engine(model: str, adapters: Mapping[str, str] | None = None, *, served_model_name: str | None = None,
                dtype: str | None = None, device: str | None = None, force: bool = False, max_batch_size: int = 8,
                max_queue: int = 64, proxies: Sequence[ProxySpec | str] = ()) -> Loaded:
    """Load ``model`` and each adapter (name -> folder) onto one engine; a failing adapter is logged and skipped.
    ``proxies``: proxy-tuned models (:class:`ProxySpec`, or its ``NAME=EXPERT,ANTI[,BETA]`` text), each loaded and
    added, or a LmadaptError. ``force``: load adapters trained on other base weights."""
    adapters = dict(adapters or {})
    specs = [p if isinstance(p, ProxySpec) else ProxySpec.parse(p) for p in proxies]
    name = served_model_name or model
    problems = _name_problems(name, adapters, [s.name for s in specs])
    problems += [problem for spec in specs for problem in spec.problems()]
    if problems:  # before anything loads
        raise LmadaptError("; ".join(problems))
    cfg = ModelConfig(name_or_path=model, **{k: v for k, v in {"dtype": dtype, "device": device}.items() if v})
    base_model, tokenizer = load_model(cfg)
    engine = Engine(base_model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue)
    failed = {}
    for adapter, path in adapters.items():
        try:
            engine.load_adapter(adapter, path, force=force)
        except (LmadaptError, OSError) as exc:
            failed[adapter] = str(exc)
            log.error("adapter %r (%s) not loaded, serving the others: %s", adapter, path, exc)
    for spec in specs:
        engine.add_proxy(load_proxy(spec, dtype=dtype, device=device, force=force))
    base = ServedBase(name, model_display_name(cfg), engine.context, engine.vocab_size)
    return Loaded(engine, tokenizer, base, failed)


def _name_problems(base_name: str, adapters: Mapping[str, str], proxies: Sequence[str] = ()) -> list[str]:
    problems = []
    for name in [*adapters, *proxies]:
        try:
            check_adapter_name(name)
        except ValueError as exc:
            problems.append(str(exc))
        if name == base_name:
            problems.append(f"the name {name!r} is the base model's name; choose another (or --served-model-name)")
    taken = sorted({n for n in proxies if n in adapters or list(proxies).count(n) > 1})
    if taken:
        problems.append(f"the name(s) {', '.join(taken)} are given twice (adapters and proxy-tuned models); each "
                        f"needs its own name")
    return problems


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: any free port), for uvicorn to listen on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise LmadaptError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port "
                           f"(0: any free port) or --host") from None
    return sock


def uvicorn_server(app: Any, *, drain_timeout: float = 30.0, log_level: str = "info") -> Any:
    """A ``uvicorn.Server`` for ``app`` whose graceful shutdown waits at most ``drain_timeout`` seconds for the
    requests in flight; lmadapt's own log lines go where uvicorn's go."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    logging_config = copy.deepcopy(LOGGING_CONFIG)
    logging_config["loggers"]["lmadapt.serve"] = {"handlers": ["default"], "level": log_level.upper(),
                                                  "propagate": False}
    config = uvicorn.Config(app, log_config=logging_config, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=math.ceil(drain_timeout), server_header=False)
    return uvicorn.Server(config)


def serve(model: str, adapters: Mapping[str, str] | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, served_model_name: str | None = None, dtype: str | None = None,
          device: str | None = None, force: bool = False, max_batch_size: int = 8, max_queue: int = 64,
          limits: Limits | None = None, runtime_adapters: bool = True, drain_timeout: float = 30.0,
          log_level: str = "info", proxies: Sequence[ProxySpec | str] = ()) -> None:
    """Serve ``model``, ``adapters`` (name -> folder) and ``proxies`` (proxy-tuned models, see :func:`load_engine`)
    until SIGTERM or Ctrl-C (see the module docstring)."""
    sock = bind(host, port)  # before loading: a taken port fails at once
    try:
        loaded = load_engine(model, adapters, served_model_name=served_model_name, dtype=dtype, device=device,
                             force=force, max_batch_size=max_batch_size, max_queue=max_queue, proxies=proxies)
        app = create_app(loaded.engine, loaded.tokenizer, loaded.base, api_key=api_key, limits=limits or Limits(),
                         runtime_adapters=runtime_adapters, drain_timeout=drain_timeout)
        server = uvicorn_server(app, drain_timeout=drain_timeout, log_level=log_level)
        bound_host, bound_port = sock.getsockname()[:2]
        served = [loaded.base.name] + sorted(set(adapters or {}) - set(loaded.failed)) + sorted(
            f"{name} (proxy-tuned)" for name in loaded.engine.proxies())
        print(f"lmadapt serve: http://{_url_host(bound_host)}:{bound_port}/v1 serving {', '.join(served)}"
              f"{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
        with _quiet_sigterm():
            server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise LmadaptError("the server did not start (its log above says why)")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@contextlib.contextmanager
def _quiet_sigterm() -> Iterator[None]:
    """uvicorn handles SIGTERM (a graceful shutdown) and then raises it again for the handler it found: make
    that one a no-op, so a drained server returns normally (exit 0) instead of being killed by the re-raise."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
