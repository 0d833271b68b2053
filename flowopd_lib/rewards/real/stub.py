"""Loopback stand-ins for Flow-GRPO's GenEval and DeQA reward servers, judging with the toy scorers.

They speak the protocol of `server.py` (POST a pickle of JPEG images [+ GenEval metadata], get a
pickle of scores back), so a run wired for real servers runs unchanged on a CPU: the dry run of
`papermill_runs/sd35m.yaml` (`flowopd_lib.dryrun`) starts them and points FLOWOPD_GENEVAL_URL /
FLOWOPD_DEQA_URL at them. The answers are the toy world's detector and quality score, so they
are meaningful only on toy-like images; what the stand-ins test is the wiring, not SD3.5-M.

Requests are decoded by the clients' `restricted_loads` (plain containers, numbers, strings,
bytes, numpy arrays): any local process can POST to a loopback port, and a plain `pickle.loads`
would run whatever callable its pickle names. A pickle naming anything else is answered 400.

    with toy_reward_servers() as urls:   # {"geneval": "http://127.0.0.1:PORT", "deqa": ...}
        ...
"""
from __future__ import annotations

import collections
import contextlib
import io
import pickle
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from ...toy.grammar import Prompt
from .. import deqa, geneval
from .server import DEQA_MAX_SCORE, restricted_loads


def decode_images(request: dict) -> torch.Tensor:
    """The request's JPEGs as float [B, 3, H, W] in [0, 1]."""
    arrays = [np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")) for jpeg in request["images"]]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def geneval_answer(request: dict) -> dict:
    """GenEval server response: partial credit, strict correctness and per-tag groups."""
    metadata = request["meta_datas"]
    prompts = [Prompt(m.get("prompt", ""), "geneval", m) for m in metadata]
    out = geneval.score(decode_images(request), prompts)
    scores, strict = out["reward"].tolist(), out["strict"].tolist()
    groups, strict_groups = collections.defaultdict(list), collections.defaultdict(list)
    for m, s, c in zip(metadata, scores, strict):
        groups[m["tag"]].append(s)
        strict_groups[m["tag"]].append(c)
    return {"scores": scores, "rewards": strict, "strict_rewards": strict,
            "group_rewards": dict(groups), "group_strict_rewards": dict(strict_groups)}


def deqa_answer(request: dict) -> dict:
    """DeQA server response: the quality score / 5."""
    return {"outputs": (deqa.score(decode_images(request))["reward"] / DEQA_MAX_SCORE).tolist()}


def serve(respond: Callable[[dict], tuple[int, bytes]]) -> ThreadingHTTPServer:
    """Start a loopback server on a free port (daemon thread): each POST's request, decoded by
    `restricted_loads`, goes to `respond(request) -> (status, body)`; a request naming a callable
    or class answers 400, an exception in `respond` 500 with the traceback."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            status, body = reply(respond, self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.handle_error = lambda request, address: None  # a client that timed out closed its socket
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


def reply(respond: Callable[[dict], tuple[int, bytes]], data: bytes) -> tuple[int, bytes]:
    """(status, body) for one request body: 400 if it does not decode under `restricted_loads`
    (a hostile pickle, or not a pickle at all: the client must not retry it), else `respond`'s
    answer, or 500 with the traceback if `respond` raised."""
    try:
        request = restricted_loads(data)
    except Exception as refused:
        return 400, f"bad request: {type(refused).__name__}: {refused}".encode()
    try:
        return respond(request)
    except Exception:
        return 500, traceback.format_exc().encode()


def answering(answer: Callable[[dict], dict]) -> Callable[[dict], tuple[int, bytes]]:
    return lambda request: (200, pickle.dumps(answer(request)))


@contextlib.contextmanager
def toy_reward_servers() -> Iterator[dict[str, str]]:
    """GenEval and DeQA stand-in servers for the duration of the block; yields their URLs."""
    servers = {"geneval": serve(answering(geneval_answer)), "deqa": serve(answering(deqa_answer))}
    try:
        yield {name: f"http://127.0.0.1:{s.server_address[1]}" for name, s in servers.items()}
    finally:
        for s in servers.values():
            s.shutdown()
            s.server_close()
