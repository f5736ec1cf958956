"""Serving engines (SGLang) under the driver, on real Ray: a cancelled generation aborts its
requests, and an engine found down is dropped from its peers' server lists at once.

Real RolloutActors (tiny model, rewards, Arrow batches) and the real RolloutGroup; each engine's
`generate`, `connect_peers` and `drop_peer` are SglangEngine's own over a real SglangClient
(tests/served_rollout_actor.py), and the servers are the fake HTTP servers of
tests/test_sglang_client.py, run by this process and holding every `/generate` at a named
point (until aborted, or until the test opens a gate). No SGLang code runs here.
"""

import threading
import time
from pathlib import Path

import pytest
import ray
from ray.exceptions import TaskCancelledError

from actors import groups
from actors.groups import RolloutGroup
from actors.rollout_actor import CONCURRENCY_GROUPS, PEER_CALLS
from config import load_config
from data.prompts import PromptRecord
from inference.engine import GenerationAborted
from placement.cluster import read_cluster_shape
from placement.groups import create_placement
from placement.planner import plan_layout
from tests.served_rollout_actor import ServedRolloutActor
from tests.test_sglang_client import FakeServer

REPO = Path(__file__).resolve().parent.parent

RemoteServed = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(ServedRolloutActor)
"""As the driver makes its rollout actors (actors/groups.py), of the served class."""

PROMPTS = [PromptRecord(f"{d} {d + 1} {d + 2} {d + 3} =", str(4 * d + 6), "test") for d in range(4)]
"""Four prompt groups: one `/generate` request each (two samples of one prompt)."""


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture
def fake_servers():
    """Starts `count` fake servers in this process; stopped after the test."""
    started: list[FakeServer] = []

    def start(count: int) -> list[FakeServer]:
        started.extend(FakeServer() for _ in range(count))
        return started[-count:]

    yield start
    for server in started:
        server.kill()


def tiny(tmp_path: Path, engines: int):
    return load_config(
        REPO / "recipes" / "tiny.yaml",
        {
            "rollout.num_engines": str(engines),
            "rollout.samples_per_prompt": "2",
            "train.num_workers": "1",
            "logging.output_dir": str(tmp_path),
        },
    ).validate()


def counting(servers, hold) -> threading.Semaphore:
    """Every server calls `hold(body)` on each `/generate`; the semaphore counts arrivals."""
    arrived = threading.Semaphore(0)

    def arrive_and_hold(body: dict) -> None:
        arrived.release()
        hold(body)

    for server in servers:
        server.before_reply = arrive_and_hold
    return arrived


def test_cancelling_a_generation_aborts_its_requests_at_once(local_ray, fake_servers, tmp_path):
    """`rollout.partial: abort` cancels a running generate (`ray.cancel`, as RolloutQueue does):
    the engine aborts the request it has out on its server and sends no other, and the call ends
    cancelled within seconds instead of running to the end (the server holds the request until
    it is aborted)."""
    (server,) = fake_servers(1)
    server.hold_until_aborted = True
    arrived = counting([server], lambda body: None)
    actor = RemoteServed.options(num_cpus=0).remote(tiny(tmp_path, 1), 0)
    ray.get(actor.serve_at.remote(server.url), timeout=300)
    call = actor.generate.remote(PROMPTS, 0, 1)
    assert arrived.acquire(timeout=60)  # one request out (one slot); three groups wait for it
    ray.cancel(call, recursive=False)
    cancelled_at = time.monotonic()
    with pytest.raises((TaskCancelledError, GenerationAborted)):
        ray.get(call, timeout=30)
    assert time.monotonic() - cancelled_at < 5
    assert server.generate_count == 1
    assert sorted(server.aborted) == sorted(server.sent_rids()) and len(server.aborted) == 2
    ray.kill(actor)


def test_an_engine_found_down_is_dropped_from_its_peers_at_once(
    local_ray, fake_servers, tmp_path, monkeypatch
):
    """A killed rollout actor's server outlives it (here: its fake server stays up): once the
    driver finds the engine down, the live engines stop sending it requests at once, in the
    middle of their generation, not at the next weight update; `connect_peers` lists an engine
    again once it is back."""
    monkeypatch.setattr(groups, "RemoteRolloutActor", RemoteServed)
    fakes = fake_servers(3)
    gate = threading.Event()
    arrived = counting(fakes, lambda body: gate.wait(60))
    u0, u1, u2 = (fake.url for fake in fakes)
    config = tiny(tmp_path, 3)
    placement = create_placement(plan_layout(read_cluster_shape(), config))
    try:
        group = RolloutGroup(config, placement)
        ray.get([a.serve_at.remote(f.url) for a, f in zip(group.actors, fakes, strict=True)])
        group.connect_peers()
        told = ray.get([a.server_urls.remote() for a in group.actors])
        assert told == [[u0, u1, u2], [u1, u0, u2], [u2, u0, u1]]

        running = [group.actors[e].generate.remote(PROMPTS, 0, e) for e in (0, 1)]
        for _ in range(6):  # each engine: one request on every server, its fourth group waits
            assert arrived.acquire(timeout=60)
        assert fakes[2].generate_count == 2
        ray.kill(group.actors[2], no_restart=True)
        assert group.dead_members([0, 1, 2], probe_s=60) == [2] and group.live() == [0, 1]

        assert ray.wait(running, timeout=0)[0] == []  # still generating, and already told
        peers_call = [a.server_urls.options(concurrency_group=PEER_CALLS) for a in group.actors]
        assert ray.get([peers_call[e].remote() for e in (0, 1)]) == [[u0, u1], [u1, u0]]
        gate.set()
        results = ray.get(running, timeout=120)
        assert [r.stats.samples for r in results] == [8, 8]
        assert fakes[2].generate_count == 2  # the waiting groups went to the live engines' servers

        group.went_down(1, "a weight update it was stuck in")  # alive, as WeightSync marks it
        assert ray.get(group.actors[0].server_urls.remote()) == [u0]
        group.wait_until_all_up()  # engine 1 answers again; engine 2 is gone for good
        assert group.live() == [0, 1]
        assert ray.get([group.actors[e].server_urls.remote() for e in (0, 1)]) == [
            [u0, u1],
            [u1, u0],
        ]
    finally:
        gate.set()
        placement.remove()
