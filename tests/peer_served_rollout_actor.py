"""A RolloutActor whose engine's completions report versions as if a peer's server served
them: tests/test_sample_weight_versions.py uses it (a module of its own so that Ray's workers
can import the class)."""

from actors.rollout_actor import RolloutActor

PEER_VERSION = 5
"""The version a peer engine's server reports for the samples it served."""


class PeerServedRolloutActor(RolloutActor):
    """Its engine's even-numbered completions come back as if served by a peer at
    PEER_VERSION; the others carry no version (this engine's own, as the transformers engine)."""

    def serve_even_samples_at_peer_version(self) -> None:
        generate = self.engine.generate

        def stamped(prompts, params, on_completion=None):
            completions = generate(prompts, params, on_completion)
            for i, completion in enumerate(completions):
                completion.weight_version = PEER_VERSION if i % 2 == 0 else None
            return completions

        self.engine.generate = stamped
