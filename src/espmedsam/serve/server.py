"""Running the app with uvicorn: in the foreground (``espmedsam serve``) or in a thread (tests)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from espmedsam.errors import EspMedSAMError, InputError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one).

    Raises:
        InputError: the address cannot be used (taken, not this machine's, no permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as error:
        sock.close()
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise InputError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.listen(128)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve_forever(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve ``app`` on ``sock`` until Ctrl+C."""
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


@contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` from a thread while the block runs; yields its base URL."""
    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the web server did not start")
            time.sleep(0.02)
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


WORKER_HEADER = "X-Espmedsam-Worker"


def serve_workers(make_app: Callable[[], FastAPI], sock: socket.socket, workers: int, log_level: str) -> None:
    """Serve on ``sock`` from ``workers`` processes, each with its own model (``make_app``, called in the
    worker), until Ctrl+C. The kernel hands each new connection to one of the processes waiting on the
    shared socket; the API keeps no state between requests, so any worker can answer any request.
    Each response names its worker's process id in the ``X-Espmedsam-Worker`` header."""
    # fork: the listening socket and make_app (a closure over the parsed options) pass to the children as
    # they are; the parent has loaded no model and started no threads yet
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=_worker, args=(make_app, sock, log_level), name=f"espmedsam-worker-{k}")
        for k in range(workers)
    ]
    for process in processes:
        process.start()
    # Ctrl+C or a kill stops the workers too, even where SIGINT was ignored (a job started with & by a
    # non-interactive shell) or SIGTERM would end the parent alone and leave the workers serving
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, _interrupt)
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        pass
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=10)
    failed = [p for p in processes if p.exitcode not in (0, -signal.SIGTERM)]
    if failed:
        raise EspMedSAMError(f"{len(failed)} of {workers} workers stopped with an error (above)")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _worker(make_app: Callable[[], FastAPI], sock: socket.socket, log_level: str) -> None:
    app = make_app()
    pid = str(os.getpid())

    @app.middleware("http")
    async def name_the_worker(request, call_next):
        response = await call_next(request)
        response.headers[WORKER_HEADER] = pid
        return response

    serve_forever(app, sock, log_level)
