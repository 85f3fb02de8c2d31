"""The fault proxy does what the fault tests rely on: each kind of fault happens where it says
(before or after the server sees the request), runs replay from their seed, and faults can be
aimed at one operation."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tests.fixtures.faults import FaultProxy


class _Counting(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[str] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append(body.decode())
        reply = b"got " + body
        self.send_response(201)
        self.send_header("Content-Length", str(len(reply)))
        self.send_header("X-Upstream", "yes")
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[str]:
    _Counting.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def post(proxy: FaultProxy, body: str, session: requests.Session | None = None) -> requests.Response:
    return (session or requests).post(proxy.url + "/write", data=body, timeout=10)


def test_no_fault_forwards_status_headers_and_body_over_one_connection(upstream: str) -> None:
    with FaultProxy(upstream) as proxy, requests.Session() as session:
        answers = [post(proxy, f"w{i}", session) for i in range(3)]
    assert [(a.status_code, a.text, a.headers["X-Upstream"]) for a in answers] == [(201, f"got w{i}", "yes") for i in range(3)]
    assert _Counting.seen == ["w0", "w1", "w2"] and proxy.counts == {"ok": 3}


def test_503_and_reset_never_reach_the_server_and_lost_does(upstream: str) -> None:
    with FaultProxy(upstream, rate=1.0, faults=["503"]) as proxy:
        assert post(proxy, "a").status_code == 503
    with FaultProxy(upstream, rate=1.0, faults=["reset"]) as proxy, pytest.raises(requests.ConnectionError):
        post(proxy, "b")
    assert _Counting.seen == []
    with FaultProxy(upstream, rate=1.0, faults=["lost"]) as proxy, pytest.raises(requests.ConnectionError):
        post(proxy, "c")
    assert _Counting.seen == ["c"]  # the write took effect; only its answer was lost


def test_a_seed_replays_the_same_faults(upstream: str) -> None:
    def kinds(seed: int) -> list[str]:
        with FaultProxy(upstream, rate=0.5, seed=seed) as proxy:
            for i in range(40):
                try:
                    post(proxy, str(i))
                except requests.ConnectionError:
                    pass
        return proxy.drawn

    assert kinds(7) == kinds(7) != kinds(8)
    assert set(kinds(7)) == {"ok", "503", "reset", "lost"}


def test_faults_aimed_at_one_operation_and_capped(upstream: str) -> None:
    with FaultProxy(upstream, rate=1.0, faults=["503"], limit=2, only=lambda method, path: path == "/write") as proxy:
        codes = [post(proxy, str(i)).status_code for i in range(4)]
        other = requests.post(proxy.url + "/other", data="x", timeout=10).status_code
    assert codes == [503, 503, 201, 201] and other == 201


def test_an_outage_refuses_everything_until_it_ends(upstream: str) -> None:
    with FaultProxy(upstream) as proxy:
        with proxy.outage(), pytest.raises(requests.ConnectionError):
            post(proxy, "down")
        assert post(proxy, "up").status_code == 201
    assert _Counting.seen == ["up"] and proxy.counts == {"outage": 1, "ok": 1}


def test_an_outage_can_refuse_only_some_requests(upstream: str) -> None:
    with FaultProxy(upstream) as proxy:
        with proxy.outage(only=lambda method, path: method == "POST"):
            with pytest.raises(requests.ConnectionError):
                post(proxy, "held")
            assert requests.get(proxy.url + "/read", timeout=10).status_code == 501  # reached the server
        assert post(proxy, "held").status_code == 201
    assert _Counting.seen == ["held"] and proxy.counts == {"outage": 1, "ok": 2}
