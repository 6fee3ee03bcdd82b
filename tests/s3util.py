"""A real S3-compatible server for the tests: moto's standalone server, in its own process on 127.0.0.1.

The server's own request log (werkzeug writes one line per request to its stderr, kept in a file)
is what `gets()` counts, so a test sees the GETs the server answered, not what a client meant to send.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalS3:
    """Start moto's S3 server on a free loopback port; `stop()` ends it (the fixtures always call it)."""

    def __init__(self, folder: Path, server_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(folder) / "moto.log"
        self._log = open(self.log_path, "w")
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **(server_env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=self._log, env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start; see {self.log_path}")
                time.sleep(0.1)

    @property
    def env(self) -> dict[str, str]:
        """What a client needs: the endpoint and (any) credentials."""
        return {"AWS_ENDPOINT_URL": self.endpoint, **CREDENTIALS}

    def create_bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, **{k.lower(): v for k, v in CREDENTIALS.items() if k != "AWS_DEFAULT_REGION"},
                     region_name="us-east-1").create_bucket(Bucket=name)
        return f"s3://{name}"

    def client(self, service: str = "s3"):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")

    def gets(self, contains: str = "") -> int:
        """GET requests (whole or ranged) the server has logged whose path contains `contains`."""
        self._log.flush()
        text = self.log_path.read_text(errors="replace")
        # werkzeug colours some lines (a 206 is magenta): ANSI codes may sit inside the quotes.
        return sum(contains in m.group(1) for m in re.finditer(r'"(?:\x1b\[[0-9;]*m)*GET (\S+) HTTP/1\.[01]', text))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
