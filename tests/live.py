"""A real `loraserve serve` in a subprocess on a free loopback port, for tests that speak HTTP.

Each LiveServer is a separate process (its own model, engine and metrics), started with settings
passed as LORASERVE_* environment variables exactly as a user would, and stopped with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "test-admin-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    def __init__(
        self,
        base_model: Path,
        adapter_root: Path | None = None,
        *,
        adapters: dict[str, str] | None = None,
        admin_token: str | None = ADMIN_TOKEN,
        log_path: Path | None = None,
        **settings,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_token = admin_token
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "LORASERVE_BASE_MODEL": str(base_model),
            "LORASERVE_PORT": str(self.port),
        }
        if adapter_root is not None:
            env["LORASERVE_ADAPTER_ROOT"] = str(adapter_root)
        if adapters:
            import json

            env["LORASERVE_ADAPTERS"] = json.dumps(adapters)
        if admin_token:
            env["LORASERVE_ADMIN_TOKEN"] = admin_token
        for key, value in settings.items():
            env[f"LORASERVE_{key.upper()}"] = value if isinstance(value, str) else __import__("json").dumps(value)
        self.log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"loraserve-test-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loraserve", "serve", "--log-level", "warning"],
            cwd=REPO_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 120) -> LiveServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()[-4000:]}")

    def admin_headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.admin_token}"}

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> LiveServer:
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
