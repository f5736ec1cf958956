"""A reward function told by each sample's label what to do, for the reward-pool tests.

- `hang:PATH`, `die:PATH`: the one call that takes the file PATH (an atomic rename, so exactly
  one sample does, whichever worker scores it) sleeps for ten minutes (a verifier that never
  answers), or sends SIGKILL to its own process (the OOM killer, a segfault in a C verifier);
  every other call of such a group scores 1.0;
- `mark:PATH`: creates the file PATH (that a reward call has started), then scores 1.0;
- `raise`: raises ValueError (a bug in the function);
- a number: that number;
- anything else: 1.0.
"""

import os
import signal
import time
from pathlib import Path


def reward(prompt: str, response: str, label: str) -> float:
    action, _, path = label.partition(":")
    if action == "mark":
        Path(path).touch()
    elif action == "raise":
        raise ValueError("no answer found")
    elif action == "hang" and _take(path):
        time.sleep(600)
    elif action == "die" and _take(path):
        os.kill(os.getpid(), signal.SIGKILL)
    elif action.replace(".", "", 1).isdigit():
        return float(action)
    return 1.0


def _take(path: str) -> bool:
    try:
        os.rename(path, f"{path}.{os.getpid()}")
    except FileNotFoundError:
        return False  # another call took it
    return True
