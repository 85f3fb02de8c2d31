"""The REST catalog's transport errors: a server that stops answering mid-request is a transient
failure the retry rule handles, never a raw exception from the HTTP library."""
from __future__ import annotations

import socket
import threading

import pytest

from prefixfleet.registry.catalog import Transient
from prefixfleet.registry.catalog.rest import RestCatalog


def test_a_request_whose_answer_never_comes_is_transient() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        accepted: list[socket.socket] = []
        threading.Thread(target=lambda: [accepted.append(listener.accept()[0]) for _ in range(2)], daemon=True).start()
        catalog = RestCatalog(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.5)
        try:
            with pytest.raises(Transient, match="registered-models/get"):
                catalog.get_model("pf.default.someone")  # a GET: urllib3 gives up retrying it
            with pytest.raises(Transient, match="registered-models/create"):
                catalog.create_model("pf.default.someone", {})  # a POST: not retried, the timeout itself
        finally:
            catalog.close()
            for conn in accepted:
                conn.close()
