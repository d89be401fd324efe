"""`python -m vit_jax.serve --checkpoint PATH [--host 127.0.0.1] [--port 8000]`: an HTTP server.

Endpoints:
  GET  /            a page: drop or pick an image, see the top-k classes and the attention map
  GET  /healthz     {"status": "ok", "model", "classes", "resolution", "attention", ...}
  POST /predict     the image file as the body (or a multipart form's file field) -> predict's
                    `--json` object, {"image", "top_k": [{"label", "index", "probability"}]}
  POST /attention   same body -> PNG: attention rollout over the image (models with a class token)

`?name=` names a raw-body upload in the answer (a form's file name is used otherwise) and
`?top_k=N` asks for N classes. Errors are JSON `{"error": message}` with a 4xx status: 400 a
malformed request (a Content-Length that is not one non-negative number, or sent twice), 411 no
Content-Length, 413 a body over `--max-bytes` or an image over `--max-pixels`, 415 a body that
is not an image, 422 attention for a model without a class token; a bad request never stops the
server.

Memory is bounded. At most `--max-requests` (16) uploads are read and answered at once (the
others wait, holding no body), each body only when its Content-Length is within `--max-bytes`
(8 MiB). An image's size is read from its header (JPEG, PNG, GIF, BMP, WebP) before anything
decodes it, and one over `--max-pixels` (64 million by default, e.g. 8000 x 8000) is refused
there with 413: a decompression bomb (a 50 kB PNG of 20000 x 20000 pixels decodes to 1.2 GB)
costs no more than its body. At most `--max-decodes` (2) images are decoded at once, each taking
at most 20 bytes per pixel at its peak (BMP and progressive JPEG 10-16, baseline JPEG / PNG /
GIF / WebP about 4). A request holds at most 3 copies of its body (the body, a form's image, the
decoder's input). Beyond the model and a thread per open connection, the server's memory stays
under
  3 x `--max-requests` x `--max-bytes` + 20 x `--max-decodes` x `--max-pixels` bytes
(0.4 + 2.6 GB at the defaults; about 0.4 + 0.5 GB when the uploads are JPEG / PNG).

The model is compiled once at start-up, for each batch size bucket (powers of two up to
`--max-batch`), before the server listens; requests arriving within `--batch-window-ms` of each
other run as one batch, padded to the next bucket, so nothing compiles while serving.
Preprocessing is predict's (`vit_jax.inference.preprocess_bytes`). SIGINT / SIGTERM stop it.

Exit status: 0 stopped by a signal; 1 cannot listen on the address; 2 a configuration error
(bad flag, a checkpoint that is missing, damaged or does not fit the model).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import email.message
import email.parser
import email.policy
import http
import http.server
import importlib.resources
import io
import json
import queue
import quopri
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from absl import logging

from vit_jax import cli, predict, visualize
from vit_jax.data import image_header

if TYPE_CHECKING:
    from vit_jax import inference

__all__ = ["Batcher", "HttpError", "Service", "main", "make_server"]

DEFAULT_MAX_BYTES = 8 << 20
DEFAULT_MAX_PIXELS = image_header.DEFAULT_MAX_PIXELS  # the one cap of every CLI
DEFAULT_MAX_DECODES = 2
DEFAULT_MAX_REQUESTS = 16
_FIELDS = ("image", "file")  # form fields read as the image when no field carries a file name
_LINGER_SECONDS = 2.0  # how long an oversized body is read and dropped after the 413 is sent


class _Answered(Exception):  # noqa: N818 - a signal, not an error
    """The request was answered already (an oversized body); nothing more to send."""


class HttpError(Exception):
    """A request the server answers with `status` and `{"error": message}`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass
class _Job:
    item: np.ndarray
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None


class Batcher:
    """Runs `fn` on batches of inputs submitted one at a time by concurrent threads.

    A worker thread takes the first waiting input, gathers those arriving within `window_s`
    (up to the largest bucket), pads them with zeros to the smallest bucket that holds them and
    calls `fn(batch)`; row i of the result goes back to the i-th caller. Inputs all have
    `shape`, so `fn` only ever sees `len(buckets)` shapes: `warm_up` compiles them all.
    """

    def __init__(
        self,
        fn: Callable[[np.ndarray], np.ndarray],
        shape: tuple[int, ...],
        *,
        buckets: tuple[int, ...] = (1, 2, 4, 8),
        window_s: float = 0.005,
        name: str = "batcher",
    ):
        self.fn = fn
        self.shape = tuple(shape)
        self.buckets = tuple(sorted(set(buckets)))
        self.window_s = window_s
        self.batch_sizes: list[int] = []  # requests per batch run (the last 1000)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def warm_up(self) -> None:
        """Calls `fn` once at every bucket size (jit compiles here, not on a request)."""
        for size in self.buckets:
            self.fn(np.zeros((size, *self.shape), np.float32))

    def __call__(self, item: np.ndarray) -> np.ndarray:
        """`fn`'s row for `item`, computed in a batch with whatever else is waiting."""
        if item.shape != self.shape:
            raise ValueError(f"input of shape {item.shape}, expected {self.shape}")
        job = _Job(item)
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def close(self) -> None:
        """Stops the worker after the inputs already waiting."""
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, stop = [first], False
            deadline = time.monotonic() + self.window_s
            while len(jobs) < self.buckets[-1]:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            self._run(jobs)
            if stop:
                return

    def _run(self, jobs: list[_Job]) -> None:
        size = next(b for b in self.buckets if b >= len(jobs))
        batch = np.zeros((size, *self.shape), np.float32)
        for i, job in enumerate(jobs):
            batch[i] = job.item
        try:
            out = np.asarray(self.fn(batch))
            for i, job in enumerate(jobs):
                job.result = out[i]
        except Exception as e:  # noqa: BLE001 - handed to each caller, the worker lives on
            for job in jobs:
                job.error = e
        finally:
            self.batch_sizes = [*self.batch_sizes[-999:], len(jobs)]
            for job in jobs:
                job.done.set()


class Service:
    """The model behind the endpoints: preprocessing, batched logits and attention rollout."""

    def __init__(
        self,
        trained: inference.TrainedModel,
        *,
        top_k: int = 5,
        max_batch: int = 8,
        window_s: float = 0.005,
        max_decodes: int = DEFAULT_MAX_DECODES,
    ):
        import jax

        from vit_jax import models

        self.trained = trained
        self.top_k = top_k
        self.decoding = threading.BoundedSemaphore(max_decodes)  # images decoded at once
        self.shape = (trained.crop, trained.crop, 3)
        self.picture_size = max(224, trained.crop)
        buckets = tuple(sorted({min(2**i, max_batch) for i in range(max_batch.bit_length())}))
        self.logits = Batcher(
            trained.logits, self.shape, buckets=buckets, window_s=window_s, name="logits"
        )
        self.attention_unsupported = visualize.rollout_unsupported(trained.model_config)
        self.rollout = None
        if self.attention_unsupported is None:
            prefix = models.num_prefix_tokens(trained.model_config)
            weights_fn = jax.jit(
                lambda p, x: trained.model.apply(
                    {"params": p}, x, train=False, return_intermediates=True
                )[1]["attention_weights"]
            )

            def rollout(images: np.ndarray) -> np.ndarray:
                weights = np.asarray(weights_fn(trained.params, images))
                return visualize.attention_rollout(weights, num_prefix_tokens=prefix)

            self.rollout = Batcher(
                rollout, self.shape, buckets=buckets, window_s=window_s, name="attention"
            )

    def warm_up(self) -> None:
        """Compiles logits (and attention) at every bucket size."""
        self.logits.warm_up()
        if self.rollout is not None:
            self.rollout.warm_up()

    def close(self) -> None:
        """Stops the batch workers after the requests already waiting."""
        self.logits.close()
        if self.rollout is not None:
            self.rollout.close()

    def health(self) -> dict:
        """`GET /healthz`'s answer: the model and how the server batches."""
        return {
            "status": "ok",
            "model": self.trained.model_config.get("name") or "unnamed",
            "model_type": self.trained.model_config.get("model_type"),
            "classes": len(self.trained.class_names),
            "resolution": self.trained.crop,
            "attention": self.attention_unsupported is None,
            "max_batch": self.logits.buckets[-1],
            "batches": len(self.logits.batch_sizes),
        }

    def image(self, data: bytes, name: str, max_pixels: int) -> np.ndarray:
        """The model input for an upload; HttpError 413 / 415 when it is too big / no image.

        The size comes from the header, before any decoding (and without waiting for a decode
        slot); then at most `max_decodes` uploads decode at once."""
        try:
            image_header.check_pixels(data, name, max_pixels)
            with self.decoding:
                return self.trained.preprocess_bytes(data, what=name, max_pixels=max_pixels)
        except image_header.ImageTooLargeError as e:
            raise HttpError(413, str(e)) from None
        except ValueError as e:
            raise HttpError(415, str(e)) from None

    def predict(self, image: np.ndarray, name: str, k: int | None) -> dict:
        """predict's `--json` object for one model input (`k` None: the server's --top-k)."""
        names = self.trained.class_names
        row = self.logits(image)
        return predict.answer(name, row, predict.top_k_size(k or self.top_k, names), names)

    def attention_png(self, image: np.ndarray) -> bytes:
        """The rollout overlay of one model input as PNG bytes (visualize's picture)."""
        if self.rollout is None:
            raise HttpError(
                422, f"{self.trained.model_config.get('name')}: {self.attention_unsupported}"
            )
        grid = visualize.token_grid(self.trained)
        picture = visualize.rollout_overlay(
            image, self.rollout(image), grid, self.picture_size, self.trained.normalization
        )
        out = io.BytesIO()
        picture.save(out, format="PNG")
        return out.getvalue()


def _page() -> bytes:
    return (importlib.resources.files("vit_jax") / "serve_page.html").read_bytes()


def _upload(content_type: str, body: bytes, query: dict) -> tuple[str, bytes]:
    """(name, image bytes) from a raw body or a multipart form (its first file field, else
    the field named `image` or `file`)."""
    name = (query.get("name") or ["upload"])[0]
    if not content_type.lower().startswith("multipart/form-data"):
        return name, body
    parts = _form_parts(content_type, body)
    files = [(h, c) for h, c in parts if h.get_filename()]
    named = [
        (h, c) for h, c in parts if h.get_param("name", header="content-disposition") in _FIELDS
    ]
    chosen = (files or named or [None])[0]
    if chosen is None:
        raise HttpError(400, "the multipart form has no file field (send the image as 'image')")
    headers, content = chosen
    encoding = (headers.get("Content-Transfer-Encoding") or "").strip().lower()
    data = bytes(content)  # the one copy: the chosen part's content
    try:
        if encoding == "base64":
            data = base64.b64decode(data)
        elif encoding == "quoted-printable":
            data = quopri.decodestring(data)
    except ValueError:
        raise HttpError(400, f"malformed {encoding} content in the multipart form") from None
    return headers.get_filename() or name, data


def _form_parts(content_type: str, body: bytes) -> list[tuple[email.message.Message, memoryview]]:
    """[(part headers, part content)] of a multipart body (RFC 2046), the contents views into
    `body`: parsing costs no copy of it (email's parser holds several)."""
    malformed = HttpError(400, f"malformed multipart body ({content_type})")
    boundary = email.message.Message()
    boundary["Content-Type"] = content_type
    boundary = boundary.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise malformed
    delimiter = b"--" + boundary.encode("latin-1")
    view = memoryview(body)
    pos = body.find(delimiter)
    if pos < 0:
        raise malformed
    parts = []
    pos += len(delimiter)
    while not body.startswith(b"--", pos):  # "--" after a delimiter closes the body
        line_end = body.find(b"\r\n", pos)  # the rest of the delimiter line (padding)
        end = body.find(b"\r\n" + delimiter, line_end)
        if line_end < 0 or end < 0:
            raise malformed
        start = line_end + 2
        if body.startswith(b"\r\n", start):  # no headers
            head, content_start = b"", start + 2
        else:
            split = body.find(b"\r\n\r\n", start, end)
            if split < 0:
                raise malformed
            head, content_start = body[start : split + 2], split + 4
        headers = email.parser.BytesHeaderParser(policy=email.policy.HTTP).parsebytes(head)
        parts.append((headers, view[content_start:end]))
        pos = end + 2 + len(delimiter)
    return parts


class Handler(http.server.BaseHTTPRequestHandler):
    """One request: routes, size limits and JSON errors; the model work is the Service's."""

    server_version = "vit_jax"
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a client may stay silent mid-request

    service: Service  # set by make_server on a subclass
    max_bytes: int
    max_pixels: int
    max_requests: int
    in_progress: threading.BoundedSemaphore  # POSTs holding a body: at most max_requests

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        logging.info("%s %s", self.address_string(), format % args)

    def handle_expect_100(self) -> bool:
        error = self._length_error()
        if error is not None:
            self.close_connection = True  # the client may send the body anyway
            self._send_error(*error)
            return False
        return super().handle_expect_100()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        """The base class's own errors (bad request line, unknown method …) as JSON too."""
        self.close_connection = True
        self._send_error(code, message or explain or http.HTTPStatus(code).phrase)

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        path = urllib.parse.urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(200, _page(), "text/html; charset=utf-8")
        elif path == "/healthz":
            self._send_json(200, self.service.health())
        elif path in ("/predict", "/attention"):
            self._send_error(405, f"{path} takes POST with an image")
        else:
            self._send_error(404, f"{path}: no such endpoint (/, /healthz, /predict, /attention)")

    def do_POST(self) -> None:  # noqa: N802 - the base class's name
        url = urllib.parse.urlsplit(self.path)
        keep_alive, self.close_connection = not self.close_connection, True  # until body read
        try:
            if url.path not in ("/predict", "/attention"):
                raise HttpError(404, f"{url.path}: no such endpoint (POST /predict, /attention)")
            if not self.in_progress.acquire(timeout=self.timeout):
                raise HttpError(
                    503, f"busy: {self.max_requests} requests in progress (--max-requests)"
                )
            try:
                self._answer(url, keep_alive)
            finally:
                self.in_progress.release()
        except HttpError as e:
            self._send_error(e.status, e.message)
        except (_Answered, ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - one bad request never stops the server
            logging.exception("%s %s failed", self.command, self.path)
            self._send_error(500, f"internal error: {cli.one_line(e)}")

    def _answer(self, url: urllib.parse.SplitResult, keep_alive: bool) -> None:
        """Reads the body of a POST to an endpoint and sends the answer."""
        body = self._body()
        self.close_connection = not keep_alive
        query = urllib.parse.parse_qs(url.query)
        name, data = _upload(self.headers.get("Content-Type", ""), body, query)
        del body  # a form's image is a copy: the body can go
        if not data:
            raise HttpError(400, "empty body: send the image file as the body or a form field")
        image = self.service.image(data, name, self.max_pixels)
        if url.path == "/predict":
            self._send_json(200, self.service.predict(image, name, _top_k(query)))
        else:
            self._send(200, self.service.attention_png(image), "image/png")

    def _length_error(self) -> tuple[int, str] | None:
        if self.headers.get("Transfer-Encoding"):
            return 411, "chunked bodies are not accepted: send Content-Length"
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return 411, "Content-Length required"
        if len(lengths) > 1:
            sent = ", ".join(repr(v) for v in lengths)
            return 400, f"{len(lengths)} Content-Length headers ({sent}): send exactly one"
        length = lengths[0]
        if not (length.isascii() and length.isdigit()):
            return 400, f"Content-Length {length!r} is not a non-negative number"
        if int(length) > self.max_bytes:
            return 413, f"body of {int(length)} bytes, more than --max-bytes {self.max_bytes}"
        return None

    def _body(self) -> bytes:
        error = self._length_error()
        if error is not None:
            if error[0] == 413:
                self._send_error(*error)
                self._linger()
                raise _Answered

            raise HttpError(*error)
        length = int(self.headers["Content-Length"])
        data = self.rfile.read(length)
        if len(data) < length:
            raise ConnectionError("the client closed the connection mid-body")
        return data

    def _linger(self) -> None:
        """Reads and drops what the client still sends (for at most a few seconds), so that it
        sees the 413 instead of a connection reset."""
        self.close_connection = True
        self.wfile.flush()
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.5)
            end = time.monotonic() + _LINGER_SECONDS
            while time.monotonic() < end and self.connection.recv(1 << 16):
                pass
        except OSError:
            pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _send_error(self, status: int, message: str) -> None:
        self._send_json(status, {"error": message, "status": status})


def _top_k(query: dict) -> int | None:
    value = (query.get("top_k") or [None])[0]
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise HttpError(400, f"top_k={value!r}: expected a positive integer")
    return int(value)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_server(
    service: Service,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_requests: int = DEFAULT_MAX_REQUESTS,
) -> http.server.ThreadingHTTPServer:
    """A listening (not yet serving) HTTP server for `service`; port 0 picks a free port.
    At most `max_requests` POSTs are read and answered at once; the others wait (503 after
    the handler's timeout)."""
    handler = type(
        "BoundHandler",
        (Handler,),
        {
            "service": service,
            "max_bytes": max_bytes,
            "max_pixels": max_pixels,
            "max_requests": max_requests,
            "in_progress": threading.BoundedSemaphore(max_requests),
        },
    )
    server_class = _Server
    if ":" in host:
        server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
    return server_class((host, port), handler)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        prog="python -m vit_jax.serve", description=__doc__, weights=True, max_pixels=True
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port")
    count = cli.positive_int
    p.add_argument("--top-k", type=count, default=5, help="classes per answer (default 5)")
    p.add_argument(
        "--max-bytes", type=count, default=DEFAULT_MAX_BYTES, help="largest upload (default 8 MiB)"
    )
    p.add_argument(
        "--max-requests",
        type=count,
        default=DEFAULT_MAX_REQUESTS,
        help=f"most uploads handled at once; others wait (default {DEFAULT_MAX_REQUESTS})",
    )
    p.add_argument(
        "--max-decodes",
        type=count,
        default=DEFAULT_MAX_DECODES,
        help=f"most images decoded at once (default {DEFAULT_MAX_DECODES})",
    )
    p.add_argument("--max-batch", type=count, default=8, help="most requests run as one batch")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="how long a batch waits")
    args = p.parse_args(argv)
    if not 0 <= args.port < 65536 or args.batch_window_ms < 0:
        p.error("--port must be in 0..65535 and --batch-window-ms at least 0")
    return args


@cli.reports_failures
def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    trained = cli.load_model(args)
    service = Service(
        trained,
        top_k=args.top_k,
        max_batch=args.max_batch,
        window_s=args.batch_window_ms / 1e3,
        max_decodes=args.max_decodes,
    )
    service.warm_up()
    try:
        server = make_server(
            service,
            args.host,
            args.port,
            max_bytes=args.max_bytes,
            max_pixels=args.max_pixels,
            max_requests=args.max_requests,
        )
    except OSError as e:
        service.close()
        return cli.fail(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})", 1)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"serving {service.health()['model']} on http://{host}:{port}/", flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    server.server_close()
    service.close()
    print("stopped", file=sys.stderr, flush=True)
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(cli.run(main))
