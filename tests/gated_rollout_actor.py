"""A RolloutActor whose engine can be held back at one point: tests/test_reward_pool.py uses it
to show that rewards are scored while the engine still generates.

`hold_second_batch_until(path)` arms the hold: in the next generation, the transformers
engine's second static batch (of `rollout.max_batch_size` prompts) does not start until the
file `path` exists or `timeout_s` passed; `gate_opened()` then says which came first. With
rewards scored only after the generation, nothing can create the file in between.
"""

import time
from pathlib import Path

from actors.rollout_actor import RolloutActor


class GatedRolloutActor(RolloutActor):
    gate: bool | None = None

    def hold_second_batch_until(self, path: str, timeout_s: float) -> None:
        decode = self.engine._generate_static
        batches = 0

        def held(prompts, params):
            nonlocal batches
            batches += 1
            if batches == 2:
                self.gate = _appears(Path(path), timeout_s)
            return decode(prompts, params)

        self.engine._generate_static = held

    def gate_opened(self) -> bool | None:
        """True: the file appeared before the second batch started; False: it did not within
        the timeout; None: there was no second batch."""
        return self.gate


def _appears(path: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
