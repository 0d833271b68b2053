"""Real-scale rewards, offline: RapidOCR on text rendered with PIL, PickScore_v1's scoring on a
tiny random CLIP, the reward-server clients against a loopback stub server speaking Flow-GRPO's
protocol (batching, retries within a time budget on a fake clock, timeouts, unreachable servers,
hostile pickles), and AsyncScorer."""
import collections
import http.server
import logging
import os
import pickle
import socket
import threading
import time
import urllib.error
import urllib.request
import contextlib
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from flowopd_lib import rewards, toy
from flowopd_lib.rewards.real import (AsyncScorer, DeQAServer, GenEvalServer, PickScoreV1, RewardServerError,
                                      restricted_loads)
from flowopd_lib.rewards.real.pickscore_v1 import tiny_clip
from flowopd_lib.rewards.real.stub import serve


# ----------------------------------------------------------------------------- rapidocr

def rendered_text(text: str, size=(320, 96)) -> torch.Tensor:
    """Black text on white, float [3, H, W] in [0, 1]."""
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((12, size[1] // 2 - 20), text, fill="black", font=ImageFont.load_default(size=36))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def test_rapidocr_reads_rendered_text_with_flow_grpo_scoring():
    images = torch.stack([rendered_text("FLOW 42"), rendered_text("HELLO WORLD"), rendered_text("ABCD"),
                          torch.ones(3, 96, 320)])
    prompts = [toy.Prompt('a sign that says "Flow 42"', "ocr", {}),  # case and spaces are ignored
               'a poster with the text "world"',                     # a substring counts as read in full
               'a label that reads "ABXY"',                          # 2 edits out of 4
               'a sign that says "blank"']
    out = rewards.score("rapidocr", images, prompts)
    assert out["reward"].tolist() == pytest.approx([1.0, 1.0, 0.5, 0.0])
    assert out["exact"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert rewards.judges("rapidocr", "ocr") and not rewards.judges("rapidocr", "geneval")


def test_rapidocr_needs_quoted_text():
    with pytest.raises(ValueError, match="double quotes"):
        rewards.score("rapidocr", torch.ones(1, 3, 32, 32), ["a sign without quotes"])
    with pytest.raises(ValueError, match="""OCR prompt 'a sign that says ""' quotes no text"""):
        rewards.score("rapidocr", torch.ones(1, 3, 32, 32), ['a sign that says ""'])


# ----------------------------------------------------------------------------- pickscore_v1

PROMPTS = ["a red cat", "a square", toy.Prompt("a red square", "pickscore", {})]


def test_pickscore_v1_equals_clip_logits_over_26():
    model, processor = tiny_clip()
    images = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    scorer = PickScoreV1(model=model, processor=processor)
    out = scorer(images, PROMPTS)
    assert out["reward"].shape == (3,) and out["reward"].dtype == torch.float32
    assert torch.equal(out["reward"], scorer(images, PROMPTS)["reward"])
    inputs = processor(text=["a red cat", "a square", "a red square"],
                       images=[Image.fromarray(a) for a in (images * 255).round().byte().permute(0, 2, 3, 1).numpy()],
                       padding=True, return_tensors="pt")
    with torch.no_grad():
        direct = model(**inputs).logits_per_image.diagonal() / 26
    torch.testing.assert_close(out["reward"], direct)


def test_pickscore_v1_loads_lazily_once(monkeypatch):
    import transformers

    model, processor = tiny_clip()
    loads = []
    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", lambda hub_id: loads.append(hub_id) or model)
    monkeypatch.setattr(transformers.CLIPProcessor, "from_pretrained", lambda hub_id: loads.append(hub_id) or processor)
    scorer = PickScoreV1(model_id="my/pickscore", processor_id="my/clip-h")
    assert loads == []
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    first = scorer(images, PROMPTS)["reward"]
    assert torch.equal(first, scorer(images, PROMPTS)["reward"])
    assert sorted(loads) == ["my/clip-h", "my/pickscore"]
    with pytest.raises(ValueError, match="both"):
        PickScoreV1(model=model)


# ----------------------------------------------------------------------------- reward servers

@contextmanager
def stub_server(respond):
    """A loopback HTTP server; respond(request dict, call number) -> (status, body bytes).
    Yields its URL and the list of requests it received (decoded by the restricted unpickler)."""
    received = []

    def record(request):
        received.append(request)
        return respond(request, len(received))

    server = serve(record)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def brightness(request: dict) -> np.ndarray:
    return np.array([np.asarray(Image.open(BytesIO(jpeg))).mean() / 255 for jpeg in request["images"]])


def geneval_answer(request: dict, call: int):
    """Score = brightness (so order and batching show), strict = 1 for counting prompts."""
    strict = [float(m["tag"] == "counting") for m in request["meta_datas"]]
    groups = collections.defaultdict(list, {"counting": strict})
    return 200, pickle.dumps({"scores": brightness(request), "rewards": [0.5] * len(strict), "strict_rewards": strict,
                              "group_rewards": groups, "group_strict_rewards": groups})


def gray_images(n: int) -> torch.Tensor:
    return torch.linspace(0.1, 0.9, n)[:, None, None, None].expand(n, 3, 16, 16).contiguous()


def test_geneval_server_batches_in_order():
    prompts = toy.sample_prompts("geneval", 7, split="test", seed=0)
    images = gray_images(7)
    with stub_server(geneval_answer) as (url, received):
        out = GenEvalServer(url=url, batch_size=3)(images, prompts)
        full = GenEvalServer(url=url, only_strict=False)(images, prompts)
    assert [len(r["images"]) for r in received] == [3, 3, 1, 7]
    assert received[0]["only_strict"] is True and received[-1]["only_strict"] is False
    assert [m for r in received[:3] for m in r["meta_datas"]] == [p.spec for p in prompts]
    torch.testing.assert_close(out["reward"], torch.linspace(0.1, 0.9, 7), atol=0.01, rtol=0)
    assert out["strict"].tolist() == [float(p.spec["tag"] == "counting") for p in prompts]
    assert set(out) == {"reward", "strict"} and full["correct"].tolist() == [0.5] * 7
    with pytest.raises(ValueError, match="GenEval metadata"):
        GenEvalServer(url=url)(images[:1], ["a photo of a cat"])


def test_deqa_server_url_from_environment(monkeypatch):
    answer = lambda request, call: (200, pickle.dumps({"outputs": [0.8] * len(request["images"])}))
    with stub_server(answer) as (url, received):
        monkeypatch.setenv("FLOWOPD_DEQA_URL", url)
        out = rewards.score("deqa_server", gray_images(2), ["anything", "at all"])
    assert set(received[0]) == {"images"}
    torch.testing.assert_close(out["reward"], torch.full((2,), 0.8))
    torch.testing.assert_close(out["quality"], torch.full((2,), 4.0))


def test_server_retries_with_backoff_then_answers():
    def flaky(request, call):
        if call <= 2:
            return 500, b"Traceback (most recent call last):\nRuntimeError: CUDA out of memory"
        return geneval_answer(request, call)

    prompts = toy.sample_prompts("geneval", 2, split="test", seed=1)
    clock = FakeClock()
    with stub_server(flaky) as (url, received):
        out = GenEvalServer(url=url, backoff=0.05, clock=clock, sleep=clock.sleep)(gray_images(2), prompts)
    assert len(received) == 3 and out["reward"].shape == (2,)
    assert clock.sleeps == [0.05, 0.1]  # backoff 0.05 s, then twice that

    with stub_server(lambda request, call: (500, b"Traceback\nRuntimeError: detector crashed")) as (url, received):
        with pytest.raises(RewardServerError, match=f"{url}.*failed 2 times.*detector crashed"):
            GenEvalServer(url=url, attempts=2, backoff=0.01)(gray_images(2), prompts)
    with stub_server(lambda request, call: (400, b"bad request")) as (url, received):
        with pytest.raises(RewardServerError, match="refused the request: HTTP 400"):
            GenEvalServer(url=url, attempts=3, backoff=0.01)(gray_images(2), prompts)
        assert len(received) == 1  # a client error is not retried


def test_server_timeout_is_retried():
    def slow_first(request, call):
        if call == 1:
            time.sleep(0.6)
        return 200, pickle.dumps({"outputs": [0.5] * len(request["images"])})

    with stub_server(slow_first) as (url, received):
        out = DeQAServer(url=url, timeout=0.2, attempts=2, backoff=0.01)(gray_images(1), ["x"])
    assert len(received) == 2 and out["reward"].tolist() == [0.5]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_names_the_url_and_the_variable():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RewardServerError, match=f"{url} failed 2 times.*FLOWOPD_GENEVAL_URL"):
        GenEvalServer(url=url, attempts=2, backoff=0.01)(gray_images(1), toy.sample_prompts("geneval", 1))


class FakeClock:
    """time.monotonic / time.sleep stand-ins: sleeping advances the clock at once, so retry budgets of
    minutes are tested without waiting."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_retries_back_off_to_30_s_until_the_time_budget_then_say_what_happened(caplog):
    url, clock = dead_url(), FakeClock()
    client = GenEvalServer(url=url, backoff=1.0, retry_minutes=2, clock=clock, sleep=clock.sleep)
    with caplog.at_level(logging.WARNING, logger="flowopd_lib.rewards.real.server"):
        with pytest.raises(RewardServerError) as raised:
            client(gray_images(1), toy.sample_prompts("geneval", 1))
    # 1+2+4+8+16+30+30 = 91 s; one more 30 s pause would start a try after the 120 s budget
    assert clock.sleeps == [1, 2, 4, 8, 16, 30, 30]
    message = str(raised.value)
    for part in (url, "failed 8 times over 91 s", "2 min budget", "FLOWOPD_REWARD_RETRY_MINUTES", "FLOWOPD_GENEVAL_URL"):
        assert part in message, (part, message)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 7 and all(url in w and "retrying in" in w for w in warnings)


def test_retry_budget_comes_from_the_environment_at_each_call(monkeypatch):
    url, clock = dead_url(), FakeClock()
    client = DeQAServer(url=url, clock=clock, sleep=clock.sleep)
    monkeypatch.delenv("FLOWOPD_REWARD_RETRY_MINUTES", raising=False)
    with pytest.raises(RewardServerError, match="10 min budget"):  # the default
        client(gray_images(1), ["x"])
    assert max(clock.sleeps) == 30 and 600 - 30 < sum(clock.sleeps) <= 600
    clock.sleeps.clear()
    monkeypatch.setenv("FLOWOPD_REWARD_RETRY_MINUTES", "0.5")
    with pytest.raises(RewardServerError, match="failed 5 times over 15 s"):
        client(gray_images(1), ["x"])
    assert clock.sleeps == [1, 2, 4, 8]
    monkeypatch.setenv("FLOWOPD_REWARD_RETRY_MINUTES", "0")
    with pytest.raises(RewardServerError, match="failed 1 time over 0 s"):  # no budget: one try
        client(gray_images(1), ["x"])
    monkeypatch.setenv("FLOWOPD_REWARD_RETRY_MINUTES", "soon")
    with pytest.raises(ValueError, match="FLOWOPD_REWARD_RETRY_MINUTES='soon'"):
        client(gray_images(1), ["x"])
    with pytest.raises(ValueError, match="retry_minutes"):
        DeQAServer(retry_minutes=-1)


@contextmanager
def deqa_on(port: int):
    """A DeQA-like server on a given port (a worker coming back where it was)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            request = restricted_loads(self.rfile.read(int(self.headers["Content-Length"])))
            body = pickle.dumps({"outputs": [0.9] * len(request["images"])})
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_server_restart_of_minutes_is_ridden_out():
    port, clock, restarted = free_port(), FakeClock(), contextlib.ExitStack()
    back = []

    def sleep(seconds):  # the worker is back 5 minutes after it went away
        clock.sleep(seconds)
        if clock.now >= 300 and not back:
            back.append(restarted.enter_context(deqa_on(port)))

    with restarted:
        out = DeQAServer(url=f"http://127.0.0.1:{port}", clock=clock, sleep=sleep)(gray_images(2), ["x", "y"])
    assert out["reward"].tolist() == pytest.approx([0.9, 0.9])
    assert 300 <= clock.now <= 300 + 30  # it tried again within one capped pause of the return


class Exploit:
    """A pickle that would run a shell command when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code_and_admits_data(tmp_path):
    marker = tmp_path / "pwned"
    for hostile in (pickle.dumps(Exploit(marker)), pickle.dumps({"scores": [Exploit(marker)]}),
                    pickle.dumps(eval), pickle.dumps(Exploit)):
        with pytest.raises(pickle.UnpicklingError, match="refused"):
            restricted_loads(hostile)
    assert not marker.exists()
    data = {"a": np.arange(3.0), "b": np.float32(2), "c": {1, 2}, "d": collections.OrderedDict(x=1),
            "e": collections.defaultdict(list, k=[1]), "f": 1 + 2j, "g": (None, True, "s", b"b"),
            "h": np.array([[1, 2]], dtype=np.int64), "i": np.bool_(True)}
    for protocol in (3, 4, 5):
        loaded = restricted_loads(pickle.dumps(data, protocol=protocol))
        assert loaded.keys() == data.keys()
        for key, value in data.items():
            np.testing.assert_equal(loaded[key], value)

    with stub_server(lambda request, call: (200, pickle.dumps({"outputs": Exploit(marker)}))) as (url, received):
        with pytest.raises(RewardServerError, match="refused"):
            DeQAServer(url=url)(gray_images(1), ["x"])
    assert not marker.exists()


class MarkerExploit:
    """A pickle that, loaded by a plain `pickle.loads`, would create a marker file (harmless proof of
    code execution): it names `pathlib.Path.touch`, a callable outside the admitted types."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def post(url: str, body: bytes) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_stub_server_refuses_hostile_requests(tmp_path):
    """Any local process can POST to the stub's loopback port: its requests are decoded with the
    clients' restricted unpickler, so a pickle naming a callable runs nothing and is answered 400."""
    marker = tmp_path / "pwned"
    assert pickle.loads(pickle.dumps(MarkerExploit(marker))) is None and marker.exists()  # the payload works ...
    marker.unlink()
    called = []
    with stub_server(lambda request, call: called.append(request) or (200, b"scored")) as (url, received):
        for hostile in (pickle.dumps(MarkerExploit(marker)), pickle.dumps({"images": [MarkerExploit(marker)]}),
                        pickle.dumps(Exploit(marker)), b"not a pickle"):
            status, body = post(url, hostile)
            assert status == 400 and body.startswith(b"bad request"), (status, body)
        assert not marker.exists() and not called  # ... but not here
        assert b"refused to load" in post(url, pickle.dumps(Exploit(marker)))[1]
        assert post(url, pickle.dumps({"images": [b"jpeg"], "only_strict": True})) == (200, b"scored")


# ----------------------------------------------------------------------------- AsyncScorer

def test_async_scorer_matches_the_synchronous_call():
    prompts = toy.sample_prompts("ocr", 8, split="test", seed=0)
    images = toy.render(prompts, seed=0)
    expected = rewards.score("ocr", images, prompts)
    with AsyncScorer("ocr") as scorer:
        pending = [scorer.submit(images[:5], prompts[:5]), scorer.submit(images[5:], prompts[5:])]
        results = [p.result(timeout=30) for p in pending]
    for key in expected:
        assert torch.equal(torch.cat([r[key] for r in results]), expected[key])


def test_async_scorer_returns_before_scoring_finishes():
    release, threads = threading.Event(), []

    def slow(images, prompts):
        release.wait(5)
        threads.append(threading.current_thread())
        return {"reward": images.mean((1, 2, 3))}

    with AsyncScorer(slow) as scorer:
        pending = scorer.submit(torch.ones(2, 3, 4, 4), [None, None])
        assert not pending.done()
        release.set()
        assert pending.result(timeout=5)["reward"].tolist() == [1.0, 1.0]
    assert threads[0] is not threading.current_thread()
