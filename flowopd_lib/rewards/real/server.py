"""`geneval_server`, `deqa_server`: clients for Flow-GRPO's reward servers (reward-server repo).

The GenEval detector (mmdet Mask2Former + CLIP colour classifier) and the DeQA MLLM need their
own environments, so Flow-GRPO runs them as HTTP servers and the trainer posts images to them.
The protocol, one POST to the server's root URL per batch:

    request  body = pickle of {"images": [JPEG bytes, ...], ...}
             GenEval adds "meta_datas": [GenEval metadata dict per image] and "only_strict": bool
    response 200: pickle of
             GenEval {"scores": partial credit, "rewards": GenEval correctness (0/1, only
                      computed when only_strict is False), "strict_rewards": strict correctness
                      (0/1), "group_rewards"/"group_strict_rewards": per-tag lists}
             DeQA    {"outputs": DeQA score / 5 per image, in [0.2, 1]}
             500: the server's traceback as text

What the scorers return ([B] float tensors):
    geneval_server  reward (partial credit, Flow-GRPO's training signal), strict (0/1), and
                    with `only_strict=False` also correct (GenEval's original 0/1 correctness)
    deqa_server     reward (the server's output, DeQA / 5 as Flow-GRPO trains on it) and
                    quality (the DeQA score on its own 1-5 scale)

Server URLs: the `url` argument, else the environment variables FLOWOPD_GENEVAL_URL and
FLOWOPD_DEQA_URL, else Flow-GRPO's defaults http://127.0.0.1:18085 (GenEval) and
http://127.0.0.1:18086 (DeQA); read at each call, so they can be set after import.
Batches of `batch_size` images (Flow-GRPO: 64) are posted one after the other; each POST has
`timeout` seconds.

Retries: a multi-day run must ride out a reward worker that restarts (Flow-GRPO's client retries
for many minutes), so a POST that fails with a connection error, a timeout or a 5xx answer is
retried for a time budget, not a number of tries: pauses of `backoff`, 2x, 4x... seconds, capped
at `max_backoff` (30 s), each failed try logged as a warning naming the URL, until the next try
would start more than `retry_minutes` after the first (default: the environment variable
FLOWOPD_REWARD_RETRY_MINUTES, else 10 minutes; a try under way is not cut short). Then
`RewardServerError` names the URL, how many tries over how long, the last error and the
variables to set. `attempts` optionally caps the number of tries as well (None = no cap); 4xx
answers are not retried. `clock` and `sleep` are injectable so tests need not wait.

Start check: `check_servers({env var: URL})` raises a one-line `RewardServerError` naming the
URL and the variable that sets it unless every server answers an HTTP GET (Flow-GRPO's servers
are POST-only, so any HTTP status counts, except 502/503/504: a proxy whose server is not up);
with `wait`, it polls servers that are still starting. From the shell (papermill_runs/slurm.sbatch
runs it on each node before training):

    python -m flowopd_lib.rewards.real.server --check [CONFIG.yaml] [--wait SECONDS]

checks the servers among the config's `rewards` (a stage config: an OPD stage, or a toy reward,
needs none) or, without a config, all of them; exit status 1 with the one-line error otherwise.

SECURITY: the responses are pickles, and unpickling runs whatever callables a pickle names, so
a hostile or compromised server could run code in the trainer. Responses are therefore decoded
by `restricted_loads`, which admits only plain containers (list, dict, tuple, set, frozenset,
OrderedDict, defaultdict), numbers, strings, bytes, bools, None and numpy arrays, scalars and
dtypes; a pickle that names any other global (os.system, eval, a class...) is refused with
`pickle.UnpicklingError`. Pickles of protocol 3 or later (Python's default) are supported.
"""
from __future__ import annotations

import argparse
import http.client
import io
import itertools
import logging
import os
import pickle
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch

from .inputs import prompt_text, to_jpeg

GENEVAL_URL_ENV, GENEVAL_DEFAULT_URL = "FLOWOPD_GENEVAL_URL", "http://127.0.0.1:18085"
DEQA_URL_ENV, DEQA_DEFAULT_URL = "FLOWOPD_DEQA_URL", "http://127.0.0.1:18086"
RETRY_MINUTES_ENV, DEFAULT_RETRY_MINUTES = "FLOWOPD_REWARD_RETRY_MINUTES", 10.0
DEQA_MAX_SCORE = 5.0
UNAVAILABLE = (502, 503, 504)  # a proxy or load balancer answering for a server that is not up
CHECK_POLL_SECONDS = 5.0

log = logging.getLogger(__name__)

SAFE_GLOBALS = frozenset({
    ("builtins", name) for name in ("list", "dict", "tuple", "set", "frozenset", "complex", "bytearray")
} | {
    ("collections", "OrderedDict"), ("collections", "defaultdict"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
} | {
    (f"numpy.{core}.{module}", name)  # numpy 2 pickles name numpy._core, numpy 1 numpy.core
    for core in ("_core", "core")
    for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
})


class RewardServerError(RuntimeError):
    """The reward server could not be reached, failed, or answered something unusable."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in `SAFE_GLOBALS`."""

    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: reward-server responses may only hold plain "
                "containers, numbers, strings and numpy arrays")
        return super().find_class(module, name)


def restricted_loads(data: bytes):
    """`pickle.loads` for untrusted data: only the types listed in the module docstring."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


class _Retryable(Exception):
    """A failure worth another try (connection refused or reset, timeout, 5xx)."""


@dataclass
class RewardServerClient:
    """Batching, POST with retries and restricted decoding; subclasses build requests and read responses."""

    url: str | None = None
    batch_size: int = 64
    timeout: float = 120.0
    attempts: int | None = None  # optional cap on tries; the time budget is what normally ends retrying
    backoff: float = 1.0
    max_backoff: float = 30.0
    retry_minutes: float | None = None  # None: $FLOWOPD_REWARD_RETRY_MINUTES, else DEFAULT_RETRY_MINUTES
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)
    url_env: ClassVar[str]
    default_url: ClassVar[str]

    def __post_init__(self):
        if (self.attempts is not None and self.attempts < 1) or self.batch_size < 1:
            raise ValueError(f"attempts ({self.attempts}) and batch_size ({self.batch_size}) must be >= 1")
        if self.retry_minutes is not None and self.retry_minutes < 0:
            raise ValueError(f"retry_minutes ({self.retry_minutes}) must be >= 0")

    def resolved_url(self) -> str:
        return self.url or os.environ.get(self.url_env) or self.default_url

    def retry_seconds(self) -> float:
        """The retry budget in seconds: `retry_minutes`, else the environment's, else the default
        (read at each call, like the URL, so a running notebook can change it)."""
        if self.retry_minutes is not None:
            return 60 * self.retry_minutes
        text = os.environ.get(RETRY_MINUTES_ENV, "").strip()
        if not text:
            return 60 * DEFAULT_RETRY_MINUTES
        try:
            minutes = float(text)
        except ValueError:
            minutes = -1.0
        if not minutes >= 0:  # also refuses nan
            raise ValueError(f"${RETRY_MINUTES_ENV}={text!r}: give the minutes to keep retrying a reward "
                             "server as a number >= 0")
        return 60 * minutes

    def __call__(self, images: torch.Tensor, prompts: list) -> dict[str, torch.Tensor]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        starts = range(0, len(images), self.batch_size)
        batches = [self.score_batch(images[i:i + self.batch_size], prompts[i:i + self.batch_size]) for i in starts]
        if not batches:
            return {"reward": torch.zeros(0)}
        return {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}

    def score_batch(self, images: torch.Tensor, prompts: list) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def post(self, request: dict) -> dict:
        """Send one pickled request; the decoded response dict. Retries within the time budget
        (module docstring), then RewardServerError."""
        url, body, budget = self.resolved_url(), pickle.dumps(request), self.retry_seconds()
        start, pause = self.clock(), min(self.backoff, self.max_backoff)
        for tries in itertools.count(1):
            try:
                return self._decode(url, self._post_once(url, body))
            except _Retryable as error:
                elapsed = self.clock() - start
                if tries == self.attempts or elapsed + pause > budget:
                    raise self._gave_up(url, tries, elapsed, budget, error) from error
                log.warning("reward server %s: try %d failed, %.0f s after the first (%s); retrying in %.3g s, "
                            "for up to %.3g min in all ($%s)", url, tries, elapsed, error, pause, budget / 60,
                            RETRY_MINUTES_ENV)
                self.sleep(pause)
                pause = min(2 * pause, self.max_backoff)

    def _gave_up(self, url: str, tries: int, elapsed: float, budget: float, error: Exception) -> RewardServerError:
        limit = f"attempts={self.attempts}" if tries == self.attempts else f"the {budget / 60:.3g} min budget"
        return RewardServerError(
            f"reward server {url} failed {tries} time{'s' * (tries != 1)} over {elapsed:.0f} s, giving up at {limit} "
            f"(${RETRY_MINUTES_ENV} sets the minutes to keep retrying); last error: {error}. Is the server "
            f"running and reachable? Set the URL with the `url` argument or ${self.url_env}.")

    def _post_once(self, url: str, body: bytes) -> bytes:
        request = urllib.request.Request(url, data=body, method="POST",
                                         headers={"Content-Type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", "replace").strip().splitlines()[-3:]
            message = f"HTTP {error.code}: {' | '.join(detail)}"
            if error.code >= 500:
                raise _Retryable(message) from error
            raise RewardServerError(f"reward server {url} refused the request: {message}") from error
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as error:
            raise _Retryable(f"{type(error).__name__}: {error}") from error

    def _decode(self, url: str, content: bytes) -> dict:
        try:
            response = restricted_loads(content)
        except pickle.UnpicklingError as error:
            raise RewardServerError(f"reward server {url} sent a response that was refused: {error}") from error
        except Exception as error:  # truncated or not a pickle at all
            raise RewardServerError(f"reward server {url} sent an unreadable response: {error!r}") from error
        if not isinstance(response, dict):
            raise RewardServerError(f"reward server {url} answered a {type(response).__name__}, not a dict")
        return response

    def values(self, response: dict, key: str, count: int) -> torch.Tensor:
        """response[key] as a float tensor [count], or RewardServerError saying what came instead."""
        if key not in response:
            raise RewardServerError(f"reward server {self.resolved_url()} answered keys {sorted(response)}, no {key!r}")
        try:
            values = np.asarray(response[key], dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise RewardServerError(f"reward server {self.resolved_url()} sent non-numeric {key}: {error}") from error
        if values.shape != (count,):
            raise RewardServerError(f"reward server {self.resolved_url()} sent {key} of shape {values.shape} "
                                    f"for {count} images")
        return torch.from_numpy(values).float()


def geneval_metadata(prompt) -> dict:
    """The GenEval metadata dict a prompt carries in `.spec` (tag, include, [exclude], prompt)."""
    spec = getattr(prompt, "spec", None)
    if not isinstance(spec, dict) or "include" not in spec or "tag" not in spec:
        raise ValueError(f"geneval_server needs GenEval metadata (prompt.spec with 'tag' and 'include'); "
                         f"got {prompt!r}")
    return {"prompt": prompt_text(prompt), **spec}


@dataclass
class GenEvalServer(RewardServerClient):
    """Scores GenEval prompts on Flow-GRPO's GenEval server (see the module docstring)."""

    only_strict: bool = True
    url_env: ClassVar[str] = GENEVAL_URL_ENV
    default_url: ClassVar[str] = GENEVAL_DEFAULT_URL

    def score_batch(self, images: torch.Tensor, prompts: list) -> dict[str, torch.Tensor]:
        response = self.post({"images": to_jpeg(images), "meta_datas": [geneval_metadata(p) for p in prompts],
                              "only_strict": self.only_strict})
        out = {"reward": self.values(response, "scores", len(images)),
               "strict": self.values(response, "strict_rewards", len(images))}
        if not self.only_strict:
            out["correct"] = self.values(response, "rewards", len(images))
        return out


@dataclass
class DeQAServer(RewardServerClient):
    """Scores image quality on Flow-GRPO's DeQA server (prompts are not sent)."""

    url_env: ClassVar[str] = DEQA_URL_ENV
    default_url: ClassVar[str] = DEQA_DEFAULT_URL

    def score_batch(self, images: torch.Tensor, prompts: list) -> dict[str, torch.Tensor]:
        outputs = self.values(self.post({"images": to_jpeg(images)}), "outputs", len(images))
        return {"reward": outputs, "quality": outputs * DEQA_MAX_SCORE}


# ----------------------------------------------------------------------------- start check

SERVER_REWARDS = {"geneval_server": GenEvalServer, "deqa_server": DeQAServer}  # reward name -> its client


def servers_needed(config: dict) -> dict[str, str]:
    """{env var: URL} of the reward servers a stage config's `rewards` name (as the trainer will
    resolve them). A config without `rewards` (OPD, which learns from teachers) needs none."""
    names = (config or {}).get("rewards") or {}
    clients = [SERVER_REWARDS[name]() for name in names if name in SERVER_REWARDS]
    return {client.url_env: client.resolved_url() for client in clients}


def all_servers() -> dict[str, str]:
    """{env var: URL} of every reward server."""
    return servers_needed({"rewards": dict.fromkeys(SERVER_REWARDS, 1.0)})


def server_problem(url: str, timeout: float) -> str | None:
    """None if `url` answers an HTTP GET, else what went wrong (one line). Flow-GRPO's servers
    route only POST: Flask answers a GET 405, http.server 501, and either shows the server is up."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout):
            return None
    except urllib.error.HTTPError as error:
        error.close()
        return f"HTTP {error.code}" if error.code in UNAVAILABLE else None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as error:
        reason = getattr(error, "reason", error)
        return " ".join(f"{type(reason).__name__}: {reason}".split())


def check_servers(urls: dict[str, str], wait: float = 0.0, timeout: float = 10.0,
                  clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
    """Raise RewardServerError unless every server of `urls` ({env var: URL}) answers. `wait`:
    seconds to keep polling the ones that do not yet (servers loading their models); 0 = ask once.
    The error is one line naming each silent URL and the variable that sets it."""
    deadline = clock() + wait
    silent = dict(urls)
    while True:
        problems = {var: (url, problem) for var, url in silent.items() if (problem := server_problem(url, timeout))}
        if not problems:
            return
        left = deadline - clock()
        if left <= 0:
            waited = f" after {wait:.0f} s" if wait > 0 else ""
            raise RewardServerError("; ".join(
                f"reward server {url} does not answer{waited} ({problem}): start it or set ${var} to one that runs"
                for var, (url, problem) in problems.items()))
        silent = {var: url for var, (url, _) in problems.items()}
        sleep(min(CHECK_POLL_SECONDS, left))


def main(argv: list[str] | None = None) -> int:
    """`--check [CONFIG]`: check the reward servers a stage config needs (all without one); exit status."""
    parser = argparse.ArgumentParser(description="Check that the reward servers answer (module docstring).")
    parser.add_argument("--check", nargs="?", const="", metavar="CONFIG", required=True,
                        help="a stage config YAML: check the servers among its `rewards` (none: all servers)")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait for servers still starting")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds one probe may take")
    args = parser.parse_args(argv)
    import yaml

    where = socket.gethostname()
    if args.check and not Path(args.check).is_file():
        print(f"{where}: no config file {args.check} here (every node must see it: a shared filesystem)",
              file=sys.stderr)
        return 1
    urls = servers_needed(yaml.safe_load(Path(args.check).read_text()) or {}) if args.check else all_servers()
    if not urls:
        print(f"{where}: {args.check} uses no reward server")
        return 0
    try:
        check_servers(urls, wait=args.wait, timeout=args.timeout)
    except RewardServerError as error:
        print(f"{where}: {error}", file=sys.stderr)
        return 1
    print(f"{where}: reward servers answer: " + ", ".join(f"{var}={url}" for var, url in urls.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
