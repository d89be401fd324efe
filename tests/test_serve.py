"""`python -m vit_jax.serve` over real HTTP on localhost, and its page in headless Chromium."""

import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import image_bombs
import jax
import numpy as np
import pytest
import tensorflow as tf
import tiny
from PIL import Image

from vit_jax import serve

pytestmark = pytest.mark.slow

MAX_BYTES = 64 << 10
MAX_PIXELS = 1_000_000
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory) -> list[tuple[str, int]]:
    """20 test digits as PNG files named with their label: [(path, label)]."""
    from vit_jax.data import digits

    root = tmp_path_factory.mktemp("serve_digits")
    split = digits.open_split("test")
    files = []
    for i in range(0, 355, 18):
        image, label = split.load(tf.constant(i, tf.int64))
        path = root / f"{i}_{int(label)}.png"
        Image.fromarray(image.numpy()).save(path)
        files.append((str(path), int(label)))
    return files


class Client:
    """Plain http.client requests to the server under test."""

    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url)
        self.url, self.host, self.port = url, parts.hostname, parts.port

    def request(self, method: str, path: str, body: bytes | None = None, headers=None):
        """(status, content type, body bytes)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.getheader("Content-Type"), response.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: bytes | None = None, headers=None):
        status, content_type, data = self.request(method, path, body, headers)
        assert content_type == "application/json", (status, content_type, data[:200])
        return status, json.loads(data)


def _start(checkpoint: Path, log_dir: Path, *extra: str):
    """Starts the server on a free port; returns (process, url, stderr file) once it listens."""
    out, err = log_dir / "serve.out", log_dir / "serve.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vit_jax.serve", "--checkpoint", str(checkpoint), "--port", "0",
             *extra],
            cwd=tiny.ROOT, env=tiny.env(), stdin=subprocess.DEVNULL, stdout=o, stderr=e,
        )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        lines = out.read_text().splitlines()
        if lines:
            assert len(lines) == 1 and lines[0].startswith("serving "), lines
            return proc, lines[0].split(" on ", 1)[1].strip(), err
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}):\n{err.read_text()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the server did not start in 300 s:\n{err.read_text()}")


def _serving(checkpoint: Path, log_dir: Path, *flags: str):
    """(client, process) of a server started with `flags`; stopped with SIGTERM, which must exit
    it with 0."""
    started = time.monotonic()
    proc, url, err = _start(checkpoint, log_dir, *flags)
    print(f"server up in {time.monotonic() - started:.1f} s at {url}")
    try:
        yield Client(url), proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("SIGTERM did not stop the server in 30 s") from None
    assert code == 0, err.read_text()
    assert err.read_text().splitlines()[-1] == "stopped"


@pytest.fixture(scope="module")
def server(trained_workdir, tmp_path_factory):
    """The server on the trained digits model, with small --max-bytes and --max-pixels."""
    log_dir = tmp_path_factory.mktemp("serve_logs")
    limits = ("--max-bytes", str(MAX_BYTES), "--max-pixels", str(MAX_PIXELS))
    for client, _ in _serving(trained_workdir, log_dir, *limits):
        yield client


@pytest.fixture(scope="module")
def default_server(trained_workdir, tmp_path_factory):
    """(client, process) of the server with every limit at its default."""
    yield from _serving(trained_workdir, tmp_path_factory.mktemp("serve_default_logs"))


def test_healthz(server):
    status, health = server.json("GET", "/healthz")
    assert status == 200
    assert health["status"] == "ok" and health["model"] == "ViT-digits"
    assert health["classes"] == 10 and health["resolution"] == 16 and health["attention"] is True


def test_predict_equals_the_cli(server, trained_workdir, digit_files):
    """Raw bodies and multipart forms answer exactly predict --json's objects (each image run
    alone, at batch size 1, on both sides)."""
    paths = [p for p, _ in digit_files]
    cli = tiny.run(
        [sys.executable, "-m", "vit_jax.predict", "--checkpoint", str(trained_workdir),
         "--json", "--batch", "1", "--top-k", "3", *paths]
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    expected = [json.loads(line) for line in cli.stdout.splitlines()]
    assert [e["image"] for e in expected] == paths
    correct = 0
    for path, label in digit_files:
        want = expected[paths.index(path)]
        data = Path(path).read_bytes()
        name = urllib.parse.quote(path)
        status, raw = server.json("POST", f"/predict?name={name}&top_k=3", data)
        assert status == 200 and raw == want
        boundary = "vitjaxboundary"
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="image"; filename="{path}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        )
        form = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
        status, multipart = server.json(
            "POST", "/predict?top_k=3", form,
            {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )  # fmt: skip
        assert status == 200 and multipart == want
        correct += want["top_k"][0]["index"] == label
    # The model is good, so the comparison is about real answers. The fixture's model gets > 0.75
    # of the test set right: fewer than 10 of these 20 has probability < 0.4% (binomial,
    # p = 0.75); chance (0.1) reaches 10 with probability < 1e-5.
    assert correct >= 10, correct


def test_default_top_k_is_five(server, digit_files):
    status, answer = server.json("POST", "/predict", Path(digit_files[0][0]).read_bytes())
    assert status == 200 and answer["image"] == "upload" and len(answer["top_k"]) == 5
    probs = [t["probability"] for t in answer["top_k"]]
    assert probs == sorted(probs, reverse=True)


def test_attention_png_equals_visualizes_rollout_picture(
    server, trained_workdir, digit_files, tmp_path
):
    """/attention answers, pixel for pixel, the `_rollout.png` `python -m vit_jax.visualize`
    writes for the same file and model (up to one uint8 level, the two processes' float32
    rounding); a picture of another map (the class token's last-layer attention alone, or the
    rollout of a patch token's row) differs far more, so the comparison tells maps apart."""
    from vit_jax import inference, visualize

    path = digit_files[1][0]
    status, content_type, data = server.request("POST", "/attention", Path(path).read_bytes())
    assert status == 200 and content_type == "image/png"
    with Image.open(io.BytesIO(data)) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
        served = np.asarray(picture, np.int16)
    out = tmp_path / "maps"
    assert visualize.main(["--checkpoint", str(trained_workdir), "--out", str(out), path]) == 0
    stem = Path(path).stem
    with Image.open(out / f"{stem}_rollout.png") as picture:
        written = np.asarray(picture, np.int16)
    assert served.shape == written.shape == (224, 224, 3)
    assert np.abs(served - written).max() <= 1

    trained = inference.load_model(str(trained_workdir))
    image = trained.preprocess_file(path)
    weights = trained.intermediates(image[None])["attention_weights"]
    grid = visualize.token_grid(trained)
    others = [
        weights[-1, 0].mean(axis=0)[0, 1:] / weights[-1, 0].mean(axis=0)[0, 1:].sum(),
        visualize.attention_rollout(weights, token=5)[0],
    ]
    for other in others:
        wrong = np.asarray(visualize.rollout_overlay(image, other, grid, 224), np.int16)
        assert np.abs(wrong - written).max() > 20


def test_bad_requests_get_json_errors_and_the_server_keeps_serving(server, digit_files):
    good = Path(digit_files[0][0]).read_bytes()
    status, error = server.json("POST", "/predict", b"\0" * (MAX_BYTES + 1))
    assert status == 413 and f"--max-bytes {MAX_BYTES}" in error["error"]
    status, error = server.json("POST", "/attention", os.urandom(3 * MAX_BYTES))
    assert status == 413
    status, error = server.json("POST", "/predict?name=notes.txt", b"hello, not an image")
    assert status == 415 and error["error"].startswith("notes.txt: not a readable image")
    status, error = server.json("POST", "/predict?name=broken.png", good[:40])  # truncated PNG
    assert status == 415 and "broken.png" in error["error"]
    status, error = server.json("POST", "/predict", b"")
    assert status == 400 and "empty body" in error["error"]
    status, error = server.json(
        "POST", "/predict", b"--x\r\n\r\n", {"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert status == 400
    status, error = server.json("POST", "/predict?top_k=zero", good)
    assert status == 400 and "top_k" in error["error"]
    status, error = server.json("POST", "/nowhere", good)
    assert status == 404
    status, error = server.json("GET", "/predict")
    assert status == 405
    buffer = io.BytesIO()  # 2 Mpx, a few kB as PNG: under --max-bytes, over --max-pixels
    Image.new("L", (2000, 1000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < MAX_BYTES
    status, error = server.json("POST", "/predict", buffer.getvalue())
    assert (
        status == 413 and f"2000x1000 pixels, more than --max-pixels {MAX_PIXELS}" in error["error"]
    )
    status, error = server.json("PUT", "/predict", good)  # the base class's own errors: JSON
    assert status == 501 and "PUT" in error["error"]
    status, answer = server.json("POST", "/predict", good)
    assert status == 200 and len(answer["top_k"]) == 5
    assert server.json("GET", "/healthz")[0] == 200


def test_expect_100_continue_refuses_an_oversized_body_before_it_is_sent(server):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        conn.putrequest("POST", "/predict")
        conn.putheader("Content-Length", str(MAX_BYTES + 1))
        conn.putheader("Expect", "100-continue")
        conn.endheaders()  # no body follows
        response = conn.getresponse()
        assert response.status == 413 and response.getheader("Connection") == "close"
        assert "--max-bytes" in json.loads(response.read())["error"]
    finally:
        conn.close()


def test_keep_alive_connection_survives_an_error(server, digit_files):
    """A 415 leaves the connection usable (its body was read); a POST to an unknown path,
    whose body was not read, closes it."""
    good = Path(digit_files[0][0]).read_bytes()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        conn.request("POST", "/predict", body=b"not an image")
        response = conn.getresponse()
        assert response.status == 415 and response.getheader("Connection") is None
        response.read()
        conn.request("POST", "/predict", body=good)
        response = conn.getresponse()
        assert response.status == 200 and len(json.loads(response.read())["top_k"]) == 5
        conn.request("POST", "/elsewhere", body=good)
        response = conn.getresponse()
        assert response.status == 404 and response.getheader("Connection") == "close"
    finally:
        conn.close()


def test_concurrent_requests_all_answered(server, digit_files):
    """16 requests from 8 threads (batched together by the server) each get their own image's
    answer: the same classes as asked one at a time, probabilities equal to float precision."""
    alone = {}
    for path, _ in digit_files[:8]:
        alone[path] = server.json("POST", "/predict", Path(path).read_bytes())[1]

    def ask(path):
        return path, server.json("POST", "/predict", Path(path).read_bytes())

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, [p for p, _ in digit_files[:8]] * 2))
    assert len(answers) == 16
    for path, (status, answer) in answers:
        assert status == 200
        want = alone[path]["top_k"]
        assert [t["index"] for t in answer["top_k"]] == [t["index"] for t in want]
        np.testing.assert_allclose(
            [t["probability"] for t in answer["top_k"]],
            [t["probability"] for t in want],
            rtol=0,
            atol=1e-6,
        )


def _raw_request(client: Client, head: str, body: bytes = b"") -> tuple[int, dict]:
    """Sends a hand-written request (headers http.client would not send) and reads the JSON
    answer: (status, object)."""
    with socket.create_connection((client.host, client.port), timeout=60) as conn:
        conn.sendall(head.replace("\n", "\r\n").encode("latin-1") + b"\r\n" + body)
        response = http.client.HTTPResponse(conn)
        response.begin()
        return response.status, json.loads(response.read())


def test_content_length_twice_or_not_a_number_is_400(server, digit_files):
    """Two Content-Length headers (equal or not: which one framed the body is ambiguous) and
    values that are not one non-negative decimal number are refused with 400, the server
    keeps serving."""
    good = Path(digit_files[0][0]).read_bytes()
    for lengths in [(len(good), len(good)), (len(good), 5), (5, len(good))]:
        head = "POST /predict HTTP/1.1\nHost: x\n"
        head += "".join(f"Content-Length: {n}\n" for n in lengths)
        status, error = _raw_request(server, head, good)
        assert status == 400, (lengths, error)
        assert error["error"] == (
            f"2 Content-Length headers ('{lengths[0]}', '{lengths[1]}'): send exactly one"
        )
    for value in ["-5", "+5", "5.0", "0x10", "\u00b2", "1,1"]:  # \u00b2: '²'.isdigit()
        head = f"POST /predict HTTP/1.1\nHost: x\nContent-Length: {value}\n"
        status, error = _raw_request(server, head, b"12345")
        assert status == 400, (value, error)
        assert error["error"] == f"Content-Length {value!r} is not a non-negative number"
    status, answer = server.json("POST", "/predict", good)
    assert status == 200 and len(answer["top_k"]) == 5


def _bombs() -> list[tuple[str, bytes, tuple[int, int]]]:
    """(name, bytes, size): a 20000^2 PNG and a 14000^2 JPEG, each under the default
    --max-bytes, each over the default --max-pixels and PIL's own bomb limit."""
    return [
        ("bomb.png", image_bombs.png(20000, 20000), (20000, 20000)),
        ("bomb.jpg", image_bombs.jpeg(14000, 14000), (14000, 14000)),
    ]


def _memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak since the last reset) of a process, in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def test_decompression_bombs_get_413_from_their_header(default_server):
    """At the default limits, as a raw body and as a form: 413 naming the size, in well under a
    second (decoding the PNG took 4.4 s and 1.2 GB)."""
    client, _ = default_server
    cap = serve.DEFAULT_MAX_PIXELS
    for name, data, (w, h) in _bombs():
        assert len(data) < serve.DEFAULT_MAX_BYTES
        started = time.monotonic()
        status, error = client.json("POST", f"/predict?name={name}", data)
        assert status == 413, error
        assert error["error"] == f"{name}: {w}x{h} pixels, more than --max-pixels {cap}"
        assert time.monotonic() - started < 2.0
        boundary = "bombboundary"
        disposition = f'form-data; name="image"; filename="{name}"'
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        form = head + data + f"\r\n--{boundary}--\r\n".encode()
        kind = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        status, error = client.json("POST", "/attention", form, kind)
        assert status == 413 and error["error"].startswith(f"{name}: {w}x{h} pixels"), error


def test_many_bombs_at_once_stay_within_the_memory_bound(default_server, digit_files):
    """16 bombs from 8 threads at once. The stated bound for an upload refused from its header
    is its body (at most 3 copies); here that is 16 x 3 x 766 kB = 37 MB, and the server's peak
    resident memory (VmHWM, reset first) may grow by that plus 32 MiB of slack (threads,
    allocator), where decoding a single bomb would take 588 MB to 1.2 GB. It answers after."""
    client, proc = default_server
    bombs = _bombs() * 8
    Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _memory_kb(proc.pid)["VmRSS"]

    def send(bomb):
        return client.json("POST", f"/predict?name={bomb[0]}", bomb[1])

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, bombs))
    assert [status for status, _ in answers] == [413] * len(bombs)
    grown_kb = _memory_kb(proc.pid)["VmHWM"] - before
    bound_kb = (3 * sum(len(data) for _, data, _ in bombs) + (32 << 20)) // 1024
    assert grown_kb < bound_kb, f"peak grew by {grown_kb} kB, bound {bound_kb} kB"
    print(f"peak resident memory grew by {grown_kb / 1024:.1f} MiB under {len(bombs)} bombs")
    assert client.json("GET", "/healthz")[0] == 200
    status, answer = client.json("POST", "/predict", Path(digit_files[0][0]).read_bytes())
    assert status == 200 and len(answer["top_k"]) == 5


def test_page_is_self_contained(server):
    status, content_type, page = server.request("GET", "/")
    assert status == 200 and content_type.startswith("text/html")
    text = page.decode()
    assert 'id="file"' in text and "/predict" in text and "/attention" in text
    assert "http://" not in text and "https://" not in text  # no external assets


def _chrome():
    """Headless Chromium through the system chromedriver (never Selenium Manager downloads)."""
    if not (shutil.which(CHROMEDRIVER) and shutil.which(CHROMIUM)):
        if os.environ.get("VIT_JAX_REQUIRE_BROWSER"):
            pytest.fail(
                f"{CHROMIUM} / {CHROMEDRIVER} missing: apt-get install chromium chromium-driver"
            )
        pytest.skip("no chromium/chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=900,700", "--force-device-scale-factor=1"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def test_page_in_a_browser(server, digit_files, tmp_path):
    """Loads /, picks a digit with the file input and sees its label first and the overlay."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # a digit the model gets right with the most confidence: the page must show its label
    answers = [(server.json("POST", "/predict", Path(p).read_bytes())[1], p, label)
               for p, label in digit_files]  # fmt: skip
    right = [(a["top_k"][0]["probability"], p, label) for a, p, label in answers
             if a["top_k"][0]["index"] == label]  # fmt: skip
    _, path, label = max(right)
    driver = _chrome()
    try:
        driver.get(server.url)
        chrome = driver.execute_script("return window.outerHeight - window.innerHeight")
        driver.set_window_size(900, 520 + chrome)  # a viewport of 900 x 520 for the screenshot
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.execute_script("return document.body.dataset.ready") == "1")
        driver.find_element(By.ID, "file").send_keys(path)
        wait.until(lambda d: d.execute_script("return document.body.dataset.state")
                   in ("done", "error"))  # fmt: skip
        state = driver.execute_script("return document.body.dataset.state")
        assert state == "done", driver.find_element(By.ID, "status").text
        assert driver.find_element(By.ID, "top1").text == str(label)
        rows = driver.find_elements(By.CSS_SELECTOR, "#results tr")
        assert len(rows) == 5
        width = driver.execute_script(
            "const i = document.getElementById('overlay'); return i.complete && i.naturalWidth"
        )
        assert width == 224
        assert driver.find_element(By.ID, "overlay").is_displayed()
        shot = tmp_path / "serve.png"
        assert driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        if os.environ.get("VIT_JAX_WRITE_SCREENSHOT") == "1":
            (tiny.ROOT / "docs").mkdir(exist_ok=True)
            shutil.copyfile(shot, tiny.ROOT / "docs" / "serve.png")
    finally:
        driver.quit()
    with Image.open(shot) as picture:
        assert picture.size[0] > 400


# In-process: the batcher, and a model without a class token.


def test_batcher_gathers_waiting_requests_into_padded_buckets():
    seen = []
    hold, release = threading.Event(), threading.Event()

    def double(batch):
        seen.append(batch.shape)
        if hold.is_set() and len(seen) == 1:
            release.wait(30)  # hold the first batch while the others queue up
        return batch * 2

    batcher = serve.Batcher(double, (3,), buckets=(1, 2, 4, 8), window_s=0.5)
    try:
        batcher.warm_up()
        assert seen == [(1, 3), (2, 3), (4, 3), (8, 3)]
        seen.clear()
        hold.set()
        with ThreadPoolExecutor(6) as pool:
            first = pool.submit(batcher, np.full(3, 1.0, np.float32))
            while not seen:
                time.sleep(0.01)
            rest = [pool.submit(batcher, np.full(3, float(i), np.float32)) for i in range(2, 7)]
            time.sleep(0.2)
            release.set()
            results = [first.result(30)] + [f.result(30) for f in rest]
        assert seen == [(1, 3), (8, 3)]  # five waiting requests: one batch, padded to 8
        assert batcher.batch_sizes[-2:] == [1, 5]
        for i, row in zip([1, 2, 3, 4, 5, 6], results, strict=True):
            np.testing.assert_array_equal(row, np.full(3, 2.0 * i))
        with pytest.raises(ValueError, match=r"expected \(3,\)"):
            batcher(np.zeros(4, np.float32))
    finally:
        release.set()
        batcher.close()


def test_batcher_hands_errors_to_the_caller_and_keeps_working():
    def fragile(batch):
        if (batch < 0).any():
            raise RuntimeError("negative input")
        return batch + 1

    batcher = serve.Batcher(fragile, (2,), buckets=(1,), window_s=0.0)
    try:
        with pytest.raises(RuntimeError, match="negative input"):
            batcher(np.full(2, -1.0, np.float32))
        np.testing.assert_array_equal(batcher(np.zeros(2, np.float32)), [1.0, 1.0])
    finally:
        batcher.close()


def test_model_without_class_token_has_no_attention(tmp_path):
    """A GAP-pooled ViT: /predict works, /attention is a 422 JSON error naming the reason."""
    import jax
    import jax.numpy as jnp

    from vit_jax import inference, models, weights

    config = models.get_config(tiny.tiny_config().model, classifier="gap", name="ViT-gap")
    module = models.get_model(config, num_classes=10)
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)["params"]
    assert "cls" not in params
    path = tmp_path / "gap.npz"
    meta = {"model": config.to_dict(), "class_names": list("0123456789"), "image_size": 16}
    weights.save(params, meta, path)
    service = serve.Service(inference.load_model(str(path)), max_batch=1)
    service.warm_up()
    httpd = serve.make_server(service, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        client = Client(f"http://127.0.0.1:{httpd.server_address[1]}/")
        image = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(image, format="PNG")
        status, health = client.json("GET", "/healthz")
        assert status == 200 and health["attention"] is False and health["model"] == "ViT-gap"
        status, error = client.json("POST", "/attention", image.getvalue())
        assert status == 422 and "class token" in error["error"]
        status, answer = client.json("POST", "/predict", image.getvalue())
        assert status == 200 and len(answer["top_k"]) == 5
    finally:
        httpd.shutdown()
        httpd.server_close()
        service.close()


def test_uploads_handled_and_decoded_at_once_are_bounded(tmp_path):
    """--max-requests 3 and --max-decodes 2 under 8 simultaneous uploads: at most 3 are read and
    answered at a time and at most 2 decoded (decoding is made slow here so that they would all
    overlap); every one is answered."""
    from vit_jax import inference, models, weights

    config = models.get_config(tiny.tiny_config().model)
    module = models.get_model(config, num_classes=10)
    params = module.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3)), train=False)["params"]
    path = tmp_path / "tiny.npz"
    weights.save(params, {"model": config.to_dict(), "image_size": 8}, path)
    service = serve.Service(inference.load_model(str(path)), max_batch=1, max_decodes=2)
    lock = threading.Lock()
    active, peak = {"image": 0, "decode": 0}, {"image": 0, "decode": 0}

    def counted(kind, fn, pause=0.0):
        def wrapper(*args, **kwargs):
            with lock:
                active[kind] += 1
                peak[kind] = max(peak[kind], active[kind])
            try:
                time.sleep(pause)
                return fn(*args, **kwargs)
            finally:
                with lock:
                    active[kind] -= 1

        return wrapper

    service.trained.preprocess_bytes = counted(
        "decode", lambda data, **_: np.zeros(service.shape, np.float32), pause=0.3
    )
    service.image = counted("image", service.image)
    service.predict = lambda image, name, k: {"image": name, "top_k": []}
    httpd = serve.make_server(service, "127.0.0.1", 0, max_requests=3)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = Client(f"http://127.0.0.1:{httpd.server_address[1]}/")
        png = io.BytesIO()
        Image.new("RGB", (8, 8)).save(png, format="PNG")
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(lambda _: client.json("POST", "/predict", png.getvalue()), range(8))
            )
        assert [status for status, _ in answers] == [200] * 8
        assert peak == {"image": 3, "decode": 2}
    finally:
        httpd.shutdown()
        httpd.server_close()
        service.close()
