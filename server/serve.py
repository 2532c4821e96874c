"""Run the app under uvicorn with a graceful drain on SIGTERM / Ctrl-C.

First signal: readiness turns 503, new requests are refused, running ones get `drain_seconds` to
finish; whatever still runs then gets a final error event; then uvicorn exits. A second signal
exits at once.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

import uvicorn

from server.api.app import create_app
from server.logs import configure
from server.settings import ServerSettings

log = logging.getLogger("loraserve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state) -> None:
        super().__init__(config)
        self.loraserve = state
        state.stop_serving = self._stop_after_failed_load

    def _stop_after_failed_load(self) -> None:
        self.should_exit = True

    def handle_exit(self, sig, frame) -> None:
        state = self.loraserve
        if state.draining or state.engine is None:
            return super().handle_exit(sig, frame)
        state.draining = True
        state.engine.stop_accepting()
        log.info("draining: %d requests in flight, up to %.0fs", state.engine.in_flight, state.settings.drain_seconds)
        threading.Thread(target=self._drain_then_exit, name="loraserve-drain", daemon=True).start()

    def _drain_then_exit(self) -> None:
        engine = self.loraserve.engine
        deadline = time.monotonic() + self.loraserve.settings.drain_seconds
        while engine.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        if engine.in_flight:
            engine.abort_all("the server is shutting down")
            time.sleep(0.5)  # let the final error events reach their streams
        self.should_exit = True


def serve(settings: ServerSettings, *, log_level: str = "info") -> None:
    configure(log_level)
    # The engine thread and the event loop share the GIL. With the default 5 ms switch interval, a
    # busy loop (formatting SSE for several streams) keeps the engine waiting up to 5 ms per step.
    sys.setswitchinterval(settings.gil_switch_seconds)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=int(settings.drain_seconds) + 5,
        # h11, always: its buffer limit bounds what a client's headers may take (a 400 beyond), where
        # httptools, which uvicorn prefers when installed, buffers headers of any size.
        http="h11",
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )
    DrainingServer(config, app.state.loraserve).run()
    if app.state.loraserve.load_error:  # the model never loaded: fail as uvicorn does when startup fails
        raise SystemExit(3)
