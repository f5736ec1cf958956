"""A RolloutActor whose engine talks to HTTP servers the way `SglangEngine` does, with no SGLang
process: SglangEngine's own `generate`, `connect_peers` and `drop_peer` run on the actor's
transformers engine, over a real `SglangClient`, against servers the test runs (the fake servers
of tests/test_sglang_client.py). tests/test_serving_engines.py uses it (a module of its own so
that Ray's workers can import the class)."""

from types import MethodType

from actors.rollout_actor import RolloutActor
from inference.sglang.client import SglangClient
from inference.sglang.engine import SglangEngine

SERVING_METHODS = ("generate", "connect_peers", "drop_peer")
"""What the engine takes from SglangEngine."""


class ServedRolloutActor(RolloutActor):
    def serve_at(self, url: str) -> None:
        """From now on the engine's own server is `url` (and its peers', once it is told)."""
        engine = self.engine
        engine.url, engine.peers = url, []
        engine.client = SglangClient([url], timeout_s=60, max_in_flight=1)
        for name in SERVING_METHODS:
            setattr(engine, name, MethodType(getattr(SglangEngine, name), engine))

    def server_urls(self) -> list[str]:
        """Every server its client may send a request to (call it in PEER_CALLS to get an
        answer while it generates)."""
        return self.engine.client.urls
