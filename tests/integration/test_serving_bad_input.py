"""Bad input never takes the service down (issue 17, item 11).

One small digits project is trained with params.yaml's serving limits as
committed (ingest.max_pixels, serve.max_body_mb, serve.max_instances) and
served by `python -m serving` in a child process. A corpus of bad requests,
each followed by a good one, is sent to it: every bad request must get its
4xx with an `error` naming the problem (and the instance or file), every good
one the evaluate stage's predicted class, the process must stay the same live
process, and its memory must not grow round after round.
"""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serving_support import (
    Service,
    ServingProject,
    b64,
    evaluate_predictions,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MODEL = "image-classifier"
PREDICT = f"/v1/models/{MODEL}:predict"
UPLOAD = "/predict"
JSON = "application/json"
ROUNDS = 5
# RSS may grow this much over the ROUNDS rounds after the warm-up round. It catches a request that
# keeps what it read or decoded: each round the service reads 16 MB of the chunked over-limit body
# (80 MB over 5 rounds), and the 12000x12000 PNG decoded would be 432 MB. It is not ~0 because a
# warm service's RSS still moves by a few MB (allocator arenas, TensorFlow's per-batch-size kernels).
RSS_GROWTH_LIMIT_MB = 50
TEXT_FIELD = b'--xyz\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--xyz--\r\n'


@dataclass(frozen=True)
class Case:
    """One request of the corpus and the answer it must get.

    `status` None: the client hangs up mid-body, so there is no answer to check here (the service
    counts it as a 499). `words` must appear in a refusal's `error`; `classes` are a good request's
    predicted classes, in order.
    """

    name: str
    send: Callable[[httpx.Client], httpx.Response | None]
    status: int | None
    words: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()


@pytest.fixture(scope="module")
def project(serving_project: ServingProject) -> ServingProject:
    return serving_project


@pytest.fixture(scope="module")
def service(champion_service: Service) -> Service:
    return champion_service


@pytest.fixture(scope="module")
def corpus(project: ServingProject) -> list[Case]:
    """Every bad request of the corpus, each followed by a good one."""
    files = project.test_files()
    classes = evaluate_predictions(project)[0]
    goods = good_cases(files, classes)
    bad = bad_cases(project, files[0].read_bytes())
    return [case for index, item in enumerate(bad) for case in (item, goods[index % len(goods)])]


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def post(path: str, body: bytes, content_type: str | None = JSON) -> Callable[[httpx.Client], httpx.Response]:
    headers = {"Content-Type": content_type} if content_type else {}
    return lambda client: client.post(path, content=body, headers=headers)


def instances(*images: bytes) -> bytes:
    return json.dumps({"instances": [b64(image) for image in images]}).encode()


def multipart(path: str, files: list[tuple[str, bytes]]) -> Callable[[httpx.Client], httpx.Response]:
    """A multipart/form-data POST of `files` as "file" fields."""
    fields = [("file", (name, content, "application/octet-stream")) for name, content in files]
    request = httpx.Request("POST", f"http://service{path}", files=fields)
    body = request.read()
    headers = {"Content-Type": request.headers["Content-Type"]}
    return lambda client: client.post(path, content=body, headers=headers)


def chunked(path: str, size: int) -> Callable[[httpx.Client], httpx.Response]:
    """A JSON body of `size` bytes sent without Content-Length (chunked), so only reading it tells."""

    def chunks() -> Iterator[bytes]:
        yield b'{"instances": [{"b64": "'
        block = b"A" * (1 << 20)
        for _ in range(size // len(block)):
            yield block
        yield b'"}]}'

    return lambda client: client.post(path, content=chunks(), headers={"Content-Type": JSON})


def hang_up(path: str, content_type: str, declared: int, part: bytes) -> Callable[[httpx.Client], None]:
    """Send headers promising `declared` bytes, then `part` of them, then close the socket."""

    def send(client: httpx.Client) -> None:
        url = urlsplit(str(client.base_url))
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {declared}\r\n\r\n"
        ).encode()
        with socket.create_connection((url.hostname, url.port), timeout=10) as raw:
            raw.sendall(head + part)
            time.sleep(0.1)  # the handler is now waiting for the rest of the body

    return send


def good_cases(files: list[Path], classes: list[str]) -> list[Case]:
    """Real test images, alone, together, uploaded, and re-encoded without loss as GIF and WebP."""
    cases = []
    for index, file in enumerate(files):
        data = file.read_bytes()
        send = multipart(UPLOAD, [(file.name, data)]) if index % 3 == 2 else post(PREDICT, instances(data))
        cases.append(Case(f"test image {file.name}", send, 200, classes=(classes[index],)))
    first = Image.open(files[0])
    lossless = [("GIF", encode(first, "GIF")), ("WebP", encode(first, "WEBP", lossless=True))]
    for fmt, data in lossless:
        cases.append(Case(f"a valid {fmt}", post(PREDICT, instances(data)), 200, classes=(classes[0],)))
    upload = [(f"first.{fmt.lower()}", data) for fmt, data in lossless]
    cases.append(Case("GIF and WebP uploads", multipart(UPLOAD, upload), 200, classes=(classes[0],) * 2))
    many = instances(*(f.read_bytes() for f in files))
    cases.append(Case("the whole test split", post(PREDICT, many), 200, classes=tuple(classes)))
    return cases


def bad_cases(project: ServingProject, good: bytes) -> list[Case]:
    """Requests the service must refuse with a 4xx naming the problem."""
    serve, max_pixels = project.cfg.serve, project.cfg.ingest.max_pixels
    limit = int(serve.max_body_mb * 1024 * 1024)
    html = b"<!doctype html><html><body><h1>Not a photo</h1></body></html>"
    jpeg = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)), "JPEG")
    cut = jpeg[: len(jpeg) // 2]
    big = encode(Image.new("RGB", (12000, 12000), (200, 30, 30)), "PNG")
    huge = encode(Image.new("1", (20000, 20000), 1), "PNG")
    assert max_pixels < 12000 * 12000 and len(instances(big)) < limit, (max_pixels, len(big))
    assert serve.max_instances < 1000
    over = b'{"instances": [{"b64": "' + b"A" * limit + b'"}]}'
    tiff = encode(Image.open(io.BytesIO(good)), "TIFF")
    one_bit = encode(Image.open(io.BytesIO(good)).convert("1"), "BMP")  # Pillow reads it, TF does not
    max_instances = f"serve.max_instances = {serve.max_instances}"
    return [
        Case("empty body", post(PREDICT, b""), 400, ("empty",)),
        Case("text/plain body", post(PREDICT, b"a photo of a 3", "text/plain"), 400, ("not JSON",)),
        Case(
            "form-urlencoded body",
            post(PREDICT, b"instances=abc", "application/x-www-form-urlencoded"),
            400,
            ("not JSON",),
        ),
        Case("no content type", post(PREDICT, b"instances", None), 400, ("not JSON",)),
        Case("broken JSON", post(PREDICT, b'{"instances": [{"b64": '), 400, ("not JSON",)),
        Case("invalid UTF-8", post(PREDICT, b'{"instances": "\xc3\x28"}'), 400, ("not JSON",)),
        Case("JSON list", post(PREDICT, b"[]"), 400, ("JSON object", "list")),
        Case("JSON string", post(PREDICT, b'"x"'), 400, ("JSON object", "str")),
        Case("JSON null", post(PREDICT, b"null"), 400, ("JSON object",)),
        Case(
            "JSON nested 100,000 deep",
            post(PREDICT, b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
            400,
            ("JSON",),
        ),
        Case(
            "JSON integer of 5,000 digits",
            post(PREDICT, b'{"instances": [' + b"7" * 5000 + b"]}"),
            400,
            ("JSON",),
        ),
        Case("instances not a list", post(PREDICT, b'{"instances": "abc"}'), 400, ("non-empty list",)),
        Case("instances are numbers", post(PREDICT, b'{"instances": [1, 2]}'), 400, ("instance 0", "b64")),
        Case(
            "an instance is a nested list",
            post(PREDICT, json.dumps({"instances": [b64(good), [[1, 2], [3, 4]]]}).encode()),
            400,
            ("instance 1", "b64", "list"),
        ),
        Case(
            "b64 is a number",
            post(PREDICT, json.dumps({"instances": [{"b64": 12}]}).encode()),
            400,
            ("instance 0", "b64"),
        ),
        Case(
            "instances and inputs",
            post(PREDICT, json.dumps({"instances": [b64(good)], "inputs": [b64(good)]}).encode()),
            400,
            ("exactly one",),
        ),
        Case(
            "inputs name another input",
            post(PREDICT, json.dumps({"inputs": {"images": [b64(good)]}}).encode()),
            400,
            ("image_bytes",),
        ),
        Case(
            "unknown signature_name",
            post(PREDICT, json.dumps({"signature_name": "classify", "instances": [b64(good)]}).encode()),
            400,
            ("signature_name", "classify"),
        ),
        Case(
            "bad base64",
            post(PREDICT, json.dumps({"instances": [b64(good), {"b64": "***not base64***"}]}).encode()),
            400,
            ("instance 1", "base64"),
        ),
        Case("empty image", post(PREDICT, instances(b"")), 400, ("instance 0", "empty")),
        Case(
            "HTML saved as .jpg",
            post(PREDICT, instances(good, good, html)),
            400,
            ("instance 2", "not an image"),
        ),
        Case(
            "HTML uploaded as page.jpg",
            multipart(UPLOAD, [("digit.png", good), ("page.jpg", html)]),
            400,
            ("file 1 (page.jpg)", "not an image"),
        ),
        Case("truncated JPEG", post(PREDICT, instances(cut)), 400, ("instance 0", "truncated")),
        Case(
            "truncated JPEG uploaded",
            multipart(UPLOAD, [("cut.jpg", cut)]),
            400,
            ("file 0 (cut.jpg)", "truncated"),
        ),
        Case("a TIFF", post(PREDICT, instances(good, tiff)), 400, ("instance 1", "TIFF")),
        Case(
            "a 1-bit BMP the model's decoder cannot read",
            post(PREDICT, instances(good, one_bit)),
            400,
            ("instance 1", "decoder"),
        ),
        Case(
            "12000x12000 PNG",
            post(PREDICT, instances(big)),
            400,
            ("instance 0", "12000x12000", "ingest.max_pixels"),
        ),
        Case(
            "20000x20000 PNG (over Pillow's decompression-bomb limit)",
            post(PREDICT, instances(good, huge)),
            400,
            ("instance 1", "ingest.max_pixels"),
        ),
        Case(
            "1,000 instances",
            post(PREDICT, instances(*[good] * 1000)),
            400,
            ("1000 images", max_instances),
        ),
        Case(
            "1,000 uploaded files",
            multipart(UPLOAD, [(f"d{i}.png", good) for i in range(1000)]),
            400,
            (max_instances,),
        ),
        Case("body over max_body_mb", post(PREDICT, over), 413, ("serve.max_body_mb",)),
        Case(
            "chunked body over max_body_mb", chunked(PREDICT, limit + (1 << 20)), 413, ("serve.max_body_mb",)
        ),
        Case("upload over max_body_mb", multipart(UPLOAD, [("big.png", over)]), 413, ("serve.max_body_mb",)),
        Case("hang up mid-body", hang_up(PREDICT, JSON, 100_000, instances(good)[:1000]), None),
        Case(
            "hang up mid-upload",
            hang_up(UPLOAD, "multipart/form-data; boundary=xyz", 100_000, b"--xyz\r\n" + good[:500]),
            None,
        ),
        Case("upload as text/plain", post(UPLOAD, b"a photo", "text/plain"), 400, ("multipart/form-data",)),
        Case(
            "upload as form-urlencoded",
            post(UPLOAD, b"file=abc", "application/x-www-form-urlencoded"),
            400,
            ("multipart/form-data",),
        ),
        Case(
            "upload of a text field only",
            post(UPLOAD, TEXT_FIELD, "multipart/form-data; boundary=xyz"),
            400,
            ("field 0", "not a file"),
        ),
        Case(
            "upload of no field at all",
            post(UPLOAD, b"--xyz--\r\n", "multipart/form-data; boundary=xyz"),
            400,
            ("no file uploaded",),
        ),
        Case(
            "upload with a broken multipart body",
            post(UPLOAD, b"--xyz\r\ngarbage", "multipart/form-data; boundary=xyz"),
            400,
            (),
        ),
        Case("top_k not a number", multipart(f"{UPLOAD}?top_k=abc", [("d.png", good)]), 400, ("top_k",)),
        Case("negative top_k", multipart(f"{UPLOAD}?top_k=-5", [("d.png", good)]), 400, ("top_k",)),
        Case("unknown model", post("/v1/models/other:predict", instances(good)), 404, ("unknown model",)),
        Case("GET on predict", lambda client: client.get(PREDICT), 405),
    ]


def check(case: Case, answer: httpx.Response | None) -> str | None:
    """What is wrong with `answer` to `case`, or None."""
    if case.status is None:
        return None if answer is None else f"{case.name}: expected no answer"
    assert answer is not None
    got = f"{case.name}: got {answer.status_code} {answer.text[:300]!r}"
    if answer.status_code != case.status:
        return got
    try:
        body = answer.json()
    except ValueError:
        return got
    if case.status == 200:
        predicted = tuple(p["predicted_class"] for p in body["predictions"])
        return None if predicted == case.classes else f"{got}; expected classes {case.classes}"
    message = body.get("error") if isinstance(body, dict) else None
    if not (isinstance(message, str) and message.strip()):
        return f"{got}; no error message"
    missing = [word for word in case.words if word not in message]
    return f"{got}; the message lacks {missing}" if missing else None


def send(client: httpx.Client, case: Case) -> str | None:
    try:
        return check(case, case.send(client))
    except httpx.HTTPError as error:
        return f"{case.name}: {error.__class__.__name__}: {error}"


def run_round(service: Service, corpus: list[Case], workers: int = 1) -> list[str]:
    """Send the corpus (by `workers` threads at once); the problems found, one line each."""
    with service.client(timeout=60.0) as client, ThreadPoolExecutor(max_workers=workers) as pool:
        return [problem for problem in pool.map(lambda c: send(client, c), corpus) if problem]


def counter(samples: dict[str, float], name: str, **labels: str) -> float:
    return sum(
        value
        for key, value in samples.items()
        if key.partition("{")[0] == name and all(f'{k}="{v}"' in key for k, v in labels.items())
    )


def hung_up(service: Service) -> float:
    return counter(service.metrics(), "serving_requests_total", status="499")


def wait_for_hang_ups(service: Service, expected: float, timeout: float = 15.0) -> float:
    deadline = time.monotonic() + timeout
    while (seen := hung_up(service)) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return seen


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def listening_inodes(port: int) -> set[str]:
    """The inodes of the sockets listening on `port` (IPv4 and IPv6)."""
    inodes = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        for line in table.read_text().splitlines()[1:] if table.exists() else []:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(fields[9])
    return inodes


def serves_in_process(service: Service) -> bool:
    """Whether the uvicorn server listens in the started process itself (so its RSS is the service's)."""
    pid = service.process.popen.pid
    sockets = {f"socket:[{inode}]" for inode in listening_inodes(urlsplit(service.url).port or 0)}
    fds = Path(f"/proc/{pid}/fd")
    return bool(sockets) and any(str(fd.readlink()) in sockets for fd in fds.iterdir())


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def assert_alive(service: Service, pid: int) -> None:
    assert service.process.popen.poll() is None, service.process.tail()
    assert service.process.popen.pid == pid
    with service.client() as client:
        assert client.get("/v2/health/live").status_code == 200
    in_flight = counter(service.metrics(), "serving_requests_in_flight")
    assert in_flight == 1, f"{in_flight - 1} requests still being handled after the round"  # 1: the scrape


def test_every_bad_request_gets_its_4xx_naming_the_problem_and_every_good_one_its_prediction(service, corpus):
    pid = service.process.popen.pid
    hang_ups = sum(case.status is None for case in corpus)
    before = hung_up(service)

    problems = run_round(service, corpus)

    assert problems == [], "\n".join(problems) + f"\n--- service log ---\n{service.process.tail(60)}"
    assert wait_for_hang_ups(service, before + hang_ups) == before + hang_ups
    assert_alive(service, pid)


def test_rounds_of_bad_input_in_parallel_leave_the_same_process_alive_with_bounded_memory(service, corpus):
    pid = service.process.popen.pid
    assert serves_in_process(service), "uvicorn does not listen in the started process"
    assert children(pid) == [], "the service runs in child processes: the RSS read is not its own"
    hang_ups = sum(case.status is None for case in corpus)
    problems: set[str] = set()

    def one_round() -> None:
        before = hung_up(service)
        problems.update(run_round(service, corpus, workers=4))
        if wait_for_hang_ups(service, before + hang_ups) != before + hang_ups:
            problems.add("a client that hung up mid-body was not counted as a 499")

    one_round()  # warm-up: TensorFlow's kernels for each batch size, allocator arenas, connections
    warm = rss_mb(pid)
    after = []
    for _ in range(ROUNDS):
        one_round()
        after.append(rss_mb(pid))
    rounds = ", ".join(f"{mb:.1f}" for mb in after)
    print(f"\nservice RSS (MB) after the warm-up round: {warm:.1f}; after each of {ROUNDS} more: {rounds}")

    assert_alive(service, pid)
    assert after[-1] - warm < RSS_GROWTH_LIMIT_MB, (warm, after)
    assert sorted(problems) == [], "\n".join(sorted(problems))
