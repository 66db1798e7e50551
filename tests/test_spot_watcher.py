"""The spot watcher against an instance metadata service on loopback that speaks IMDSv2 (session tokens, 401 for
a missing or expired one, 404 until the notice): it drains once, with the notice's deadline."""
from __future__ import annotations

import datetime
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from services import free_port

from pipeline.spot_watcher import Metadata, Notice, watch

NOTICE_AT = datetime.datetime(2026, 12, 5, 12, 2, 0, tzinfo=datetime.timezone.utc)


class FakeImds(BaseHTTPRequestHandler):
    """404 for the first ``quiet`` polls, then the notice; the token is revoked after ``expire_after`` polls."""

    state: dict = {}

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, body: bytes = b"") -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:  # noqa: N802 (http.server's name)
        s = self.state
        if self.path != "/latest/api/token" or "X-aws-ec2-metadata-token-ttl-seconds" not in self.headers:
            return self._send(400)
        s["tokens"] += 1
        s["token"] = f"token-{s['tokens']}"
        self._send(200, s["token"].encode())

    def do_GET(self) -> None:  # noqa: N802
        s = self.state
        if self.path != "/latest/meta-data/spot/instance-action":
            return self._send(404)
        if self.headers.get("X-aws-ec2-metadata-token") != s["token"]:
            return self._send(401)
        s["polls"] += 1
        if s["polls"] == s["expire_after"]:
            s["token"] = "revoked"
        if s["polls"] <= s["quiet"]:
            return self._send(404)
        self._send(200, json.dumps({"action": "terminate", "time": "2026-12-05T12:02:00Z"}).encode())


@pytest.fixture
def imds():
    FakeImds.state = {"tokens": 0, "token": None, "polls": 0, "quiet": 3, "expire_after": 2}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeImds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeImds.state
    server.shutdown()
    server.server_close()


def test_a_notice_drains_the_node_once_with_its_deadline(imds):
    url, state = imds
    drained, lines = [], []
    now = NOTICE_AT - datetime.timedelta(seconds=95)
    notice = watch(Metadata(url), lambda n, left: drained.append((n, left)), every_s=0.01, now=lambda: now,
                   log=lines.append, polls=10)
    assert notice == Notice("terminate", NOTICE_AT)
    assert drained == [(notice, 95)]
    assert state["polls"] == 4 and state["tokens"] == 2  # 3 quiet polls, then the notice; a token revoked once
    assert lines == ["spot watcher: terminate at 2026-12-05T12:02:00+00:00 (95 s): draining this Ray node"]


def test_no_notice_no_drain_and_an_unreachable_service_is_retried(imds):
    url, state = imds
    state["quiet"] = 10**6
    drained = []
    assert watch(Metadata(url), lambda n, left: drained.append(n), every_s=0.01, polls=5) is None
    assert drained == [] and state["polls"] == 5
    lines = []
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens
    assert watch(Metadata(closed, timeout_s=0.5), lambda n, left: drained.append(n), every_s=0.01,
                 log=lines.append, polls=2) is None
    assert drained == [] and len(lines) == 2 and lines[0].startswith("spot watcher: instance metadata unreachable")


def test_a_past_deadline_drains_with_zero_seconds_left():
    assert Notice("stop", NOTICE_AT).seconds_left(NOTICE_AT + datetime.timedelta(seconds=3)) == 0
