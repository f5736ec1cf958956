"""Each sample's `weight_version` is the version that generated it: what the answering server
reported where the engine says (SGLang's client balances requests over every engine's server),
else the rollout actor's own engine's. Real Ray, the real RolloutActor and transformers engine;
only the versions the completions report are set by the test (as replies from a peer's server at
another version would set them)."""

from pathlib import Path

import pyarrow as pa
import pytest
import ray

from config import load_config
from data.prompts import PromptRecord
from tests.peer_served_rollout_actor import PEER_VERSION, PeerServedRolloutActor

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def actor():
    config = load_config(
        REPO / "recipes" / "tiny.yaml",
        {"rollout.samples_per_prompt": "2", "train.num_workers": "1", "rollout.num_engines": "1"},
    ).validate()
    ray.init(address="local", num_cpus=2)
    yield ray.remote(PeerServedRolloutActor).options(num_cpus=0).remote(config, 0)
    ray.shutdown()


def test_samples_carry_the_version_their_server_reported(actor):
    ray.get(actor.serve_even_samples_at_peer_version.remote())
    own = ray.get(actor.weight_version.remote())
    groups = [PromptRecord("1 2 3 4 =", "10", "test"), PromptRecord("2 3 4 5 =", "14", "test")]
    result = ray.get(actor.generate.remote(groups, 0, 1), timeout=300)
    table = pa.Table.from_batches([ray.get(batch.ref) for batch in result.batches])
    assert table.column("weight_version").to_pylist() == [PEER_VERSION, own, PEER_VERSION, own]
    # what the driver's staleness check reads (the oldest version of each result)
    assert result.stats.weight_versions == {PEER_VERSION, own}
