import argparse
import socket
import threading
import time

import pytest


def start_server(scheduler, name, api_key=None):
    """A live uvicorn server on a free loopback port, in a thread; returns (base_url, stop)."""
    import uvicorn

    from dflash.serve.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(scheduler, name, api_key=api_key), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(timeout=30)
        scheduler.close()
    return f"http://127.0.0.1:{port}", stop


def serve_args(target, draft, **kw):
    base = dict(target=str(target), draft=str(draft) if draft else None, device="cpu", dtype=None,
                block_size=None, max_queue=64, max_batch_size=8, served_model_name="tiny", model_positional=None)
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_server(tiny_target_dir, tiny_drafter_dir):
    """The tiny target with its random drafter, API key `secret`: (base_url, scheduler)."""
    from dflash.serve.cli import build

    scheduler, name = build(serve_args(tiny_target_dir, tiny_drafter_dir))
    url, stop = start_server(scheduler, name, api_key="secret")
    yield url, scheduler
    stop()
