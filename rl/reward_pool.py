"""Scoring samples with the reward function in worker processes, as the engine produces them.

A rollout actor owns one `RewardScorer` (`rollout.reward_workers` processes, or none: then it
scores in the actor's own thread after the generation, as a debugging aid). Each worker is a
plain Python process (`python -m rl.reward_pool`: it imports neither Ray nor torch) that
imports the reward function by its `module:function` path with `load_reward_fn` and scores one
sample at a time in its main thread (so signal-based timeouts, math_verify's, work there). In
the actor, one thread per worker takes samples from a shared queue (one, or while many are
queued a share of them that shrinks with the queue), hands them to its worker, and waits at
most `rollout.reward_timeout_s` for each one's answer:

- an answer: the reward, checked by `compute_reward`; a `UserError` there (the function raised,
  or returned a non-number) is raised in the actor as it would be inline, with the worker's
  traceback as its cause, and ends the run;
- no answer in time: the worker is killed and replaced; the sample scores 0.0 (`timeout`);
- the worker died while scoring (SIGKILL, a crash, `os._exit`): it is replaced; the sample
  scores 0.0 (`crash`).
The samples it held after that one go to the new worker, at no cost to them.

What waits for what: `Scores.add` (the engine's per-completion callback, any thread) only
queues a sample; `Scores.collect` (the actor's thread, once the generation returned) waits for
the batch's answers, checking the actor's cancellation flag every `CANCEL_POLL_S`. A cancelled
batch's queued samples are dropped; those already in a worker finish there (each bounded by the
timeout) before the worker takes the next batch's. A worker exits when its actor's process
ends, even in the middle of a call: a thread in it reads the task pipe and exits on its EOF.
"""

import os
import queue
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

from config.errors import UserError
from rl.rewards import compute_reward, load_reward_fn

START_TIMEOUT_S = 300.0
"""How long a new worker may take to import the reward function (a verifier's imports can take
many seconds on a busy machine)."""

MAX_SHARE = 16
"""Most samples a worker is handed at once (while many are queued)."""

CANCEL_POLL_S = 0.05
"""How often `Scores.collect` checks the actor's cancellation flag while it waits."""

Failure = Literal["timeout", "crash"]


@dataclass(frozen=True)
class Sample:
    """What a reward call gets (the contract's keyword arguments)."""

    prompt: str
    response: str
    label: str


@dataclass(frozen=True)
class Score:
    reward: float
    failure: Failure | None = None
    """Why the sample scored 0.0 without an answer from the function: the call outlasted the
    timeout, or its worker process died."""


class WorkerTraceback(Exception):
    """The traceback of a reward function's error, as the worker process printed it (the
    cause of the `UserError` raised in the actor, so that it reaches error.log)."""


class RewardWorkerFailed(RuntimeError):
    """A worker could not be started, or died before it took a sample."""


# --- the worker process ---------------------------------------------------------------------


def _serve(path: str, task_fd: int, result_fd: int) -> None:
    """A worker's life: import the function, say so, then score each sample sent until the
    actor closes the task pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the driver's to handle
    for fd in (task_fd, result_fd):
        os.set_inheritable(fd, False)  # a process the reward starts must not hold our pipes
    results = Connection(result_fd, readable=False)
    try:
        fn = load_reward_fn(path)
    except UserError as error:
        results.send(_error_answer(error))
        return
    results.send(("ready",))
    samples: queue.SimpleQueue = queue.SimpleQueue()
    tasks = Connection(task_fd, writable=False)
    threading.Thread(target=_read_tasks, args=(tasks, samples), daemon=True).start()
    while True:
        for prompt, response, label in samples.get():  # one answer per sample, as it comes
            try:
                results.send(("reward", compute_reward(fn, path, prompt, response, label)))
            except UserError as error:
                results.send(_error_answer(error))


def _read_tasks(tasks: Connection, samples: queue.SimpleQueue) -> None:
    """Hand lists of samples to the main thread; end the process once the actor closes the pipe (it
    ended, or gave up on us), even while a reward call still runs."""
    try:
        while True:
            samples.put(tasks.recv())
    except (EOFError, OSError):
        os._exit(0)


def _error_answer(error: UserError) -> tuple[str, str, str]:
    return ("error", str(error), "".join(traceback.format_exception(error)))


# --- the actor's side -------------------------------------------------------------------------


class _Worker:
    """One worker process and its two pipes; driven by one thread of the pool."""

    def __init__(self, path: str):
        task_read, task_write = os.pipe()
        result_read, result_write = os.pipe()
        # The actor's own import path: the repository, the job's working directory, and
        # wherever Ray put the user's modules.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        command = [sys.executable, "-m", "rl.reward_pool", path, str(task_read), str(result_write)]
        self.process = subprocess.Popen(command, pass_fds=(task_read, result_write), env=env)
        os.close(task_read)
        os.close(result_write)
        self.tasks = Connection(task_write, readable=False)
        self.results = Connection(result_read, writable=False)
        self._wait_ready(path)

    def _wait_ready(self, path: str) -> None:
        """Return once the worker has imported the function; raise its UserError if the
        import failed, RewardWorkerFailed if it died or took too long."""
        if not self.results.poll(START_TIMEOUT_S):
            self.kill()
            raise RewardWorkerFailed(
                f"a reward worker for {path} did not start within {START_TIMEOUT_S:g} s"
            )
        try:
            answer = self.results.recv()
        except (EOFError, OSError):
            code = self.process.wait()
            self.kill()
            raise RewardWorkerFailed(
                f"a reward worker for {path} exited with code {code} as it started (its "
                f"output is in the rollout actor's log)"
            ) from None
        if answer != ("ready",):
            self.kill()
            raise _user_error(answer)

    def send(self, samples: list[Sample]) -> None:
        """Hand samples over, scored in order; RewardWorkerFailed if the worker is dead."""
        try:
            self.tasks.send([(s.prompt, s.response, s.label) for s in samples])
        except OSError as error:  # BrokenPipeError: it died since its last sample
            raise RewardWorkerFailed(f"the reward worker exited ({error})") from error

    def next_score(self, timeout_s: float) -> Score:
        """The score of the next sample sent, which has `timeout_s` from now (the previous
        one's answer, or the send); raises the function's UserError."""
        if not self.results.poll(timeout_s):
            return Score(0.0, "timeout")
        try:
            answer = self.results.recv()
        except (EOFError, OSError):
            return Score(0.0, "crash")
        if answer[0] == "error":
            raise _user_error(answer)
        return Score(answer[1])

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.tasks.close()
        self.results.close()


def _user_error(answer: tuple) -> UserError:
    _, message, worker_traceback = answer
    error = UserError(message)
    error.__cause__ = WorkerTraceback(f"\n(in the reward worker process)\n{worker_traceback}")
    return error


def _start_eagerly(path: str) -> "_Worker | None":
    """A started worker, or None if it failed (the first sample starts one again and reports
    why), so that the import cost is paid before the first generation ends."""
    try:
        return _Worker(path)
    except Exception:
        return None


class RewardPool:
    """`workers` worker processes scoring queued samples, each call bounded by `timeout_s`."""

    def __init__(self, path: str, workers: int, timeout_s: float):
        self.path = path
        self.timeout_s = timeout_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._drive, name=f"reward-worker-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, sample: Sample) -> "Future[Score]":
        """Queue a sample; returns at once (any thread may call it)."""
        future: Future[Score] = Future()
        self._queue.put((future, sample))
        return future

    def close(self) -> None:
        """Each worker exits once its current sample (if any) is done."""
        for _ in self._threads:
            self._queue.put(None)

    def _drive(self) -> None:
        """One worker's thread: score queued samples until `close`."""
        worker = _start_eagerly(self.path)
        while (batch := self._take()) is not None:
            while batch:  # (what is left after a worker was lost goes to a new one)
                worker, batch = self._score(worker, batch)
        if worker is not None:
            worker.kill()

    def _take(self) -> "list[tuple[Future, Sample]] | None":
        """The next samples for one worker (None once closed): one, and while many are queued
        a share of them, so that fast calls do not each pay a round trip between processes;
        the share shrinks with the queue (guided self-scheduling), so workers end together."""
        items = [self._queue.get()]
        share = min(MAX_SHARE, self._queue.qsize() // (2 * len(self._threads)))
        while items[-1] is not None and len(items) <= share:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if items[-1] is None:  # closed: the sentinel stays for this thread's next take
            self._queue.put(items.pop())
            if not items:
                return None
        # Those of a cancelled generation are dropped here; the rest cannot be cancelled now.
        return [(f, sample) for f, sample in items if f.set_running_or_notify_cancel()]

    def _score(
        self, worker: "_Worker | None", batch: list[tuple[Future, Sample]]
    ) -> "tuple[_Worker | None, list[tuple[Future, Sample]]]":
        """Score the batch into its futures, in order, until a call times out or the worker
        dies. Returns the worker for what comes next (None: start one) and the samples not
        scored yet (after such a loss: not theirs to pay for)."""
        try:
            worker = self._hand_over(worker, [sample for _, sample in batch])
        except BaseException as error:  # no worker starts (its UserError, or why not)
            for future, _ in batch:
                future.set_exception(error)
            return None, []
        for done, (future, _) in enumerate(batch, start=1):
            try:
                score = worker.next_score(self.timeout_s)
            except UserError as error:  # the function raised: the worker goes on
                future.set_exception(error)
                continue
            except BaseException as error:  # a bug here: fail the rest, leave none waiting
                for waiting, _ in batch[done - 1 :]:
                    waiting.set_exception(error)
                worker.kill()
                return None, []
            future.set_result(score)
            if score.failure is not None:  # stuck or dead: a new one for the rest
                worker.kill()
                return None, batch[done:]
        return worker, []

    def _hand_over(self, worker: "_Worker | None", samples: list[Sample]) -> _Worker:
        """A live worker that holds `samples`: `worker`, or a new one if it is gone."""
        worker = worker or _Worker(self.path)
        try:
            worker.send(samples)
        except RewardWorkerFailed:  # it died while idle: no sample's doing
            worker.kill()
            worker = _Worker(self.path)
            worker.send(samples)
        return worker


class RewardScorer:
    """The reward function `path`, scored in `workers` processes (or inline if 0)."""

    def __init__(self, path: str, workers: int, timeout_s: float):
        self.path = path
        self.timeout_s = timeout_s
        self.fn = load_reward_fn(path)  # a broken path fails the actor's start, with its fix
        self.pool = RewardPool(path, workers, timeout_s) if workers else None

    def batch(self, sample_of: Callable[[int, Any], Sample]) -> "Scores":
        """Scores for one generation; `sample_of(i, completion)` is completion i's sample."""
        return Scores(self, sample_of)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


class Scores:
    """The rewards of one generation's completions: each queued as the engine reports it
    (`add`, its callback), then all collected in order (`collect`)."""

    def __init__(self, scorer: RewardScorer, sample_of: Callable[[int, Any], Sample]):
        self.scorer = scorer
        self.sample_of = sample_of
        self._futures: dict[int, Future[Score]] = {}

    def add(self, index: int, completion: Any) -> None:
        """Queue completion `index` for scoring (a no-op when scoring inline)."""
        if self.scorer.pool is not None:
            self._futures[index] = self.scorer.pool.submit(self.sample_of(index, completion))

    def collect(self, completions: list, cancelled: Callable[[], bool]) -> list[Score] | None:
        """Every completion's score, in order; None once `cancelled()` (the queued samples are
        dropped). Raises the reward function's UserError, the first one to come."""
        if self.scorer.pool is None:
            return self._score_inline(completions, cancelled)
        for index, completion in enumerate(completions):
            if index not in self._futures:  # an engine that did not report it
                self.add(index, completion)
        futures = [self._futures[index] for index in range(len(completions))]
        if not _wait_all(futures, cancelled):
            return None
        return [future.result() for future in futures]

    def cancel(self) -> None:
        """Drop the samples still queued (the generation failed)."""
        _cancel(list(self._futures.values()))

    def _score_inline(self, completions: list, cancelled: Callable[[], bool]) -> list[Score] | None:
        scores = []
        for index, completion in enumerate(completions):
            if cancelled():
                return None
            s = self.sample_of(index, completion)
            fn, path = self.scorer.fn, self.scorer.path
            scores.append(Score(compute_reward(fn, path, s.prompt, s.response, s.label)))
        return scores


def _wait_all(futures: list[Future], cancelled: Callable[[], bool]) -> bool:
    """Wait until every future is done: False (the queued ones cancelled) once `cancelled()`;
    the first error is raised (the rest cancelled)."""
    pending = set(futures)
    while pending:
        if cancelled():
            _cancel(futures)
            return False
        done, pending = wait(pending, CANCEL_POLL_S, FIRST_EXCEPTION)
        for future in done:
            if future.exception() is not None:
                _cancel(futures)
                raise future.exception()
    return True


def _cancel(futures: list[Future]) -> None:
    for future in futures:
        future.cancel()  # only queued ones; those in a worker finish there


def failure_counts(scores: list[Score]) -> tuple[int, int]:
    """(timeouts, crashes) among `scores`."""
    timeouts = sum(score.failure == "timeout" for score in scores)
    return timeouts, sum(score.failure == "crash" for score in scores)


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
