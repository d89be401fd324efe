"""The 20 fault probes, black-box: `python tests/fault_probes.py [--only N,M] [--keep DIR]`.

Each probe injects one fault from outside the process (a signal, a file made unreadable or
truncated, a dangling link, a FIFO, a size limit on writes, a hostile image, a broken config)
into the command-line tools run on the embedded default config (a few dozen steps on CPU) or a
server on 127.0.0.1, and checks what a user sees: the exit status, exactly one `error:` line
naming what went wrong (no traceback), nothing the user had changed or lost, a bit-exact resume.
It prints one row per probe (PASS / FAIL with the reason, seconds) and exits 1 if any failed.
The unit tests inject the same faults one by one (tests/test_*); this is the end-to-end round
that found them (README, "When things go wrong"). About 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["--config.total_steps=60", "--config.checkpoint_every=20", "--config.eval_every=60"]
STEPS += ["--config.progress_every=20", "--config.max_to_keep=5"]
TRACEBACK = re.compile(r"^Traceback \(most recent call last\)", re.M)


class ProbeFailed(AssertionError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ProbeFailed(message)


def env(**changes: str) -> dict[str, str]:
    e = dict(os.environ)
    e.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS="", **changes)
    return e


def tool(
    module: str, *args, timeout: float = 300, wrapper=(), **kwargs
) -> subprocess.CompletedProcess:
    """`python -m vit_jax.<module> args...` (after the `wrapper` command, if any), captured."""
    cmd = [*wrapper, sys.executable, "-m", f"vit_jax.{module}", *map(str, args)]
    return subprocess.run(
        cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kwargs
    )


def train(workdir: Path, *extra: str, **kwargs) -> subprocess.CompletedProcess:
    config = "--config=configs/default.py"
    return tool("train", config, f"--workdir={workdir}", *STEPS, *extra, **kwargs)


def start_train(workdir: Path, *extra: str, **kwargs) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vit_jax.train", "--config=configs/default.py"]
    cmd += [f"--workdir={workdir}", *STEPS, *extra]
    return subprocess.Popen(
        cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        **kwargs,
    )  # fmt: skip


def one_error_line(proc, code: int, *words: str) -> str:
    """The run exited with `code` and printed one `error:` line containing `words`, no traceback."""
    err = proc.stderr if isinstance(proc.stderr, str) else ""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    check(proc.returncode == code, f"exit {proc.returncode}, expected {code}: {err[-600:]!r}")
    check(not TRACEBACK.search(err), f"a traceback: {err[-800:]!r}")
    check(len(errors) == 1, f"{len(errors)} error lines, expected 1: {errors or err[-600:]!r}")
    for w in words:
        check(w in errors[0], f"{w!r} not in {errors[0]!r}")
    return errors[0]


def steps_of(workdir: Path) -> list[str]:
    folder = workdir / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def final_params(workdir: Path) -> dict[str, np.ndarray]:
    with np.load(workdir / "final.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def same_params(a: Path, b: Path) -> bool:
    pa, pb = final_params(a), final_params(b)
    return pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        check(time.monotonic() < deadline, f"timed out waiting for {what}")
        time.sleep(0.01)


def digit_folder(root: Path, per_class: int = 8, classes: int = 3) -> Path:
    """train/ and test/ with `classes` class folders of 16x16 PNG digits."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for split, offset in (("train", 0), ("test", 500)):
        for c in range(classes):
            (root / split / str(c)).mkdir(parents=True)
            picks = np.flatnonzero(d.target == c)[offset // 50 : offset // 50 + per_class]
            for i in picks:
                pixels = (d.images[i] * 255 / 16).astype(np.uint8)
                Image.fromarray(pixels).resize((16, 16)).save(root / split / str(c) / f"{i}.png")
    return root


def png_bomb(path: Path, side: int) -> None:
    """A grayscale PNG of side x side zero pixels: ~side²/1000 bytes on disk, side² in memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    z = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte 0 + the row
    parts = [z.compress(row * 64) for _ in range(side // 64)]
    parts += [z.compress(row * (side % 64)), z.flush()]
    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
    data += chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
    path.write_bytes(data)


def start_server(checkpoint: Path, port: int, log: Path) -> subprocess.Popen:
    """`python -m vit_jax.serve` on 127.0.0.1:port; its output goes to `log` (a pipe nobody
    reads would fill up and block the server)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "vit_jax.serve", f"--checkpoint={checkpoint}", f"--port={port}"],
            env=env(), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: bytes, headers=None, path="/predict") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.putrequest("POST", path)
    for key, value in headers or [("Content-Length", str(len(body)))]:
        conn.putheader(key, value)
    conn.endheaders()
    conn.send(body)
    r = conn.getresponse()
    text = r.read()
    conn.close()
    try:
        return r.status, json.loads(text)
    except ValueError:
        return r.status, {}


# ----------------------------------------------------------------------------- the probes


class Probes:
    """Probe methods `p01_...` to `p20_...`; `self.ref` is an uninterrupted 60-step run."""

    def __init__(self, root: Path):
        self.root = root
        self._ref: Path | None = None

    def fresh(self, name: str) -> Path:
        path = self.root / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    @property
    def ref(self) -> Path:
        if self._ref is None:
            ref = self.fresh("ref")
            proc = train(ref)
            check(proc.returncode == 0, f"the reference run failed: {proc.stderr[-800:]}")
            self._ref = ref
        return self._ref

    def copy_of_ref(self, name: str) -> Path:
        path = self.fresh(name)
        shutil.copytree(self.ref, path, symlinks=True)
        (path / "final.npz").unlink()
        return path

    # -- the twelve that passed on 2026-12-05 ---------------------------------------------------

    def p01_misspelt_config_key(self):
        proc = train(self.fresh("p01"), "--config.bach=3")
        one_error_line(proc, 2, "config.bach", "did you mean 'batch'")

    def p02_empty_dataset_folder(self):
        data = self.root / "p02-data"
        for split in ("train", "test"):
            (data / split / "a").mkdir(parents=True, exist_ok=True)
        one_error_line(train(self.fresh("p02"), f"--config.dataset={data}"), 2, str(data))

    def p03_corrupt_image_in_a_folder(self):
        data = digit_folder(self.fresh("p03-data"))
        bad = data / "train" / "1" / "broken.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
        one_error_line(train(self.fresh("p03"), f"--config.dataset={data}"), 1, "broken.png")

    def _interrupted_then_resumed(self, name: str, sig: int, *, in_save: bool = False):
        workdir = self.fresh(name)
        proc = start_train(workdir)
        ckpt = workdir / "checkpoints"
        if in_save:  # an Orbax temporary directory of a save in flight
            wait_for(
                lambda: ckpt.is_dir() and any("tmp" in p.name for p in ckpt.iterdir()),
                240, "a save in flight",
            )  # fmt: skip
        else:
            wait_for(lambda: (ckpt / "20").is_dir(), 240, "checkpoint 20")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=240)
        expected = 0 if sig in (signal.SIGTERM, signal.SIGINT) else -signal.SIGKILL
        check(proc.returncode == expected, f"exit {proc.returncode}: {err[-600:]!r}")
        check(not TRACEBACK.search(err), f"a traceback: {err[-800:]!r}")
        resumed = train(workdir)
        check(resumed.returncode == 0, f"the restart failed: {resumed.stderr[-600:]}")
        check(same_params(workdir, self.ref), "the resumed run differs from the uninterrupted one")

    def p04_sigterm_then_resume_bit_exact(self):
        self._interrupted_then_resumed("p04", signal.SIGTERM)

    def p05_sigkill_then_resume_bit_exact(self):
        self._interrupted_then_resumed("p05", signal.SIGKILL)

    def p06_sigkill_inside_a_save_then_resume_bit_exact(self):
        self._interrupted_then_resumed("p06", signal.SIGKILL, in_save=True)

    def p07_nan_loss_stops_with_the_last_good_checkpoint(self):
        workdir = self.copy_of_ref("p07")
        shutil.rmtree(workdir / "checkpoints" / "60")
        proc = train(workdir, "--config.base_lr=1e30", "--config.warmup_steps=0")
        one_error_line(proc, 1, "not finite" if "not finite" in proc.stderr else "nan")
        check("40" in steps_of(workdir), f"checkpoints now {steps_of(workdir)}")

    def p08_two_trainers_on_one_workdir(self):
        workdir = self.fresh("p08")
        first = start_train(workdir, "--config.total_steps=400")
        try:
            wait_for(lambda: (workdir / "checkpoints").is_dir(), 240, "the first trainer")
            one_error_line(train(workdir), 2, str(workdir))
        finally:
            first.kill()
            first.communicate()

    def p09_restart_with_a_changed_model_is_refused(self):
        workdir = self.copy_of_ref("p09")
        one_error_line(train(workdir, "--config.model.hidden_size=32"), 2)

    def p10_truncated_checkpoint_is_moved_aside(self):
        workdir = self.copy_of_ref("p10")
        files = [p for p in (workdir / "checkpoints" / "60").rglob("*") if p.is_file()]
        biggest = max(files, key=lambda p: p.stat().st_size)
        biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
        proc = train(workdir)
        check(proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-600:]}")
        check("60.damaged" in steps_of(workdir), f"checkpoints now {steps_of(workdir)}")
        check(same_params(workdir, self.ref), "the replayed steps differ")

    def p11_pickle_payloads_and_escaping_shard_paths(self):
        work = self.fresh("p11")
        work.mkdir()
        marker = work / "pwned"
        payload = np.array([{"x": 1}], dtype=object)
        np.save(work / "unused.npy", np.zeros(1))
        with open(work / "evil.npz", "wb") as f:
            np.savez(f, **{"embedding/kernel": payload})
        image = work / "digit.png"
        from PIL import Image

        Image.fromarray(np.zeros((16, 16), np.uint8)).save(image)
        one_error_line(tool("predict", "--checkpoint", work / "evil.npz", image), 2, "evil.npz")
        hf = work / "hf"
        hf.mkdir()
        (hf / "config.json").write_text(json.dumps({"model_type": "vit"}))
        index = {"weight_map": {"vit.embeddings.cls_token": "../../outside.safetensors"}}
        (hf / "model.safetensors.index.json").write_text(json.dumps(index))
        one_error_line(tool("predict", "--checkpoint", hf, image), 2, "outside.safetensors")
        check(not marker.exists(), "a payload ran")

    def p12_sigint_saves_and_exits_0(self):
        self._interrupted_then_resumed("p12", signal.SIGINT)

    # -- the eight that failed on 2026-12-05 ----------------------------------------------------

    def p13_unreadable_or_dangling_checkpoint_is_not_damage(self):
        """Permission denied on a file of the newest checkpoint and a dangling link for its
        folder: one line, exit 1, nothing renamed; once readable again the run continues."""
        workdir = self.copy_of_ref("p13")
        manifest = next((workdir / "checkpoints" / "60").rglob("manifest.ocdbt"))
        before = steps_of(workdir)
        manifest.chmod(0)
        # Root reads any file: as root, the restart runs without the capabilities that let it
        # (setpriv drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH), as a user's process would.
        drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search"]
        drop += ["--bounding-set=-dac_override,-dac_read_search"]
        proc = train(workdir, wrapper=drop if os.geteuid() == 0 else [])
        one_error_line(proc, 1, "manifest.ocdbt")
        check(steps_of(workdir) == before, f"checkpoints changed: {before} -> {steps_of(workdir)}")
        manifest.chmod(0o644)
        step = workdir / "checkpoints" / "60"
        aside = workdir / "p13-60"
        step.rename(aside)
        step.symlink_to(workdir / "no-such-folder")
        proc = train(workdir)
        one_error_line(proc, 1, str(step))
        check(step.is_symlink(), "the dangling link was replaced")
        step.unlink()
        aside.rename(step)
        proc = train(workdir)
        check(proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-600:]}")
        check(same_params(workdir, self.ref), "the run changed after a transient error")

    def p14_decompression_bombs(self):
        """A 20000² PNG (~0.4 MB) to predict (one line, exit 2) and four at once to the server
        (413 each, RSS within 300 MB of the idle server, /healthz 200 after)."""
        bomb = self.fresh("p14")
        bomb.mkdir()
        png = bomb / "bomb.png"
        png_bomb(png, 20000)
        started = time.monotonic()
        one_error_line(tool("predict", "--checkpoint", self.ref, png), 2, "bomb.png", "20000")
        check(time.monotonic() - started < 60, "predict spent over a minute on the bomb")
        port = free_port()
        server = start_server(self.ref, port, self.root / "p14-server.log")
        try:

            def up() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return True
                except OSError:
                    check(server.poll() is None, "the server stopped (see its .log)")
                    return False

            wait_for(up, 240, "the server")
            idle = rss_kib(server.pid)
            data = png.read_bytes()
            statuses, peak = [], [idle]
            threads = [
                threading.Thread(target=lambda: statuses.append(post(port, data)[0]))
                for _ in range(4)
            ]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                peak.append(rss_kib(server.pid))
                time.sleep(0.02)
            check(statuses == [413] * 4, f"statuses {statuses}")
            grown = (max(peak) - idle) / 1024
            check(grown < 300, f"the server's RSS grew {grown:.0f} MB")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/healthz")
            check(conn.getresponse().status == 200, "/healthz after the bombs")
        finally:
            server.terminate()
            server.communicate(timeout=60)

    def p15_writes_failing_mid_run_are_one_line(self):
        """Every file write over 64 KiB fails (RLIMIT_FSIZE: EFBIG, as a full disk fails it):
        the TensorBoard events file or a save fails; one line naming the last checkpoint."""
        import resource

        workdir = self.copy_of_ref("p15")
        shutil.rmtree(workdir / "checkpoints" / "60")
        shutil.rmtree(workdir / "checkpoints" / "40")

        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

        proc = train(workdir, "--config.total_steps=200", preexec_fn=limit)
        one_error_line(proc, 1, "20")

    def p16_readers_on_a_damaged_newest_checkpoint(self):
        """predict, evaluate and probe on a run whose newest checkpoint is truncated: the
        answer from the previous one, nothing moved, no asyncio tracebacks (4 tries each)."""
        workdir = self.copy_of_ref("p16")
        files = [p for p in (workdir / "checkpoints" / "60").rglob("*") if p.is_file()]
        biggest = max(files, key=lambda p: p.stat().st_size)
        biggest.write_bytes(biggest.read_bytes()[:100])
        image = self.root / "p16.png"
        from PIL import Image

        Image.fromarray(np.zeros((16, 16), np.uint8)).save(image)
        runs = [("predict", "--checkpoint", workdir, image)] * 4
        runs += [("evaluate", f"--checkpoint={workdir}", "--config=configs/default.py")] * 2
        runs += [("probe", f"--checkpoint={workdir}", "--method=knn")] * 2
        for args in runs:
            proc = tool(*args)
            check(proc.returncode == 0, f"{args[0]} exit {proc.returncode}: {proc.stderr[-600:]}")
            check("Event loop is closed" not in proc.stderr, f"{args[0]}: asyncio tracebacks")
            check(not TRACEBACK.search(proc.stderr), f"{args[0]}: {proc.stderr[-800:]}")
        check("60" in steps_of(workdir), f"a reader moved a checkpoint: {steps_of(workdir)}")

    def p17_convert_and_export_never_clobber(self):
        work = self.fresh("p17")
        data = digit_folder(work / "data")
        run = work / "run3"
        proc = train(run, f"--config.dataset={data}", "--config.batch=8")
        check(proc.returncode == 0, f"the 3-class run failed: {proc.stderr[-600:]}")
        hf = work / "hf10"
        check(tool("convert", self.ref / "final.npz", hf).returncode == 0, "convert to hf")
        before = {p.name: p.read_bytes() for p in hf.iterdir()}
        one_error_line(tool("convert", run / "final.npz", hf), 2, str(hf))
        after = {p.name: p.read_bytes() for p in hf.iterdir()}
        check(after == before, "the existing transformers dir changed")
        fifo_dir = work / "fifo"
        shutil.copytree(hf, fifo_dir)
        weights = next(p for p in fifo_dir.iterdir() if p.suffix == ".safetensors")
        weights.unlink()
        os.mkfifo(weights)
        one_error_line(tool("convert", fifo_dir, work / "x.npz", timeout=60), 2, weights.name)
        out = work / "exported"
        proc = subprocess.Popen(
            [sys.executable, "-m", "vit_jax.export", f"--checkpoint={self.ref}",
             "--format=saved_model", f"--out={out}"],
            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        staging = lambda: any(p.name.startswith(".exported") for p in work.iterdir())  # noqa: E731
        wait_for(staging, 240, "export's staging folder")
        proc.kill()
        proc.communicate()
        again = tool("export", f"--checkpoint={self.ref}", "--format=saved_model", f"--out={out}")
        check(again.returncode == 0, f"export after a kill: {again.stderr[-600:]}")
        left = [p.name for p in work.iterdir() if p.name.startswith(".exported")]
        check(not left, f"staging left behind: {left}")
        one_error_line(
            tool("export", f"--checkpoint={self.ref}", "--format=saved_model", f"--out={out}"), 2
        )

    def p18_probe_on_an_empty_split(self):
        for pp in ("test=test[:0]", "train=train[:0]"):
            proc = tool("probe", f"--checkpoint={self.ref}", f"--pp={pp}")
            one_error_line(proc, 2, "has no examples")

    def p19_config_errors_are_one_line_exit_2(self):
        for spec in ("configs/nonexistent.py", "configs/vit.py:nosuchmodel,cifar10"):
            one_error_line(tool("train", f"--config={spec}", f"--workdir={self.root / 'p19'}"), 2)
            one_error_line(tool("evaluate", f"--config={spec}", f"--checkpoint={self.ref}"), 2)

    def p20_visualize_overwrite_and_duplicate_content_length(self):
        work = self.fresh("p20")
        (work / "out").mkdir(parents=True)
        from PIL import Image

        Image.fromarray(np.zeros((16, 16), np.uint8)).save(work / "digit.png")
        mine = work / "out" / "digit_rollout.png"
        mine.write_bytes(b"the user's own file")
        args = [f"--checkpoint={self.ref}", f"--out={work / 'out'}", work / "digit.png"]
        one_error_line(tool("visualize", *args), 2, "digit_rollout.png")
        check(mine.read_bytes() == b"the user's own file", "visualize overwrote a user's file")
        check(tool("visualize", *args, "--overwrite").returncode == 0, "visualize --overwrite")
        port = free_port()
        server = start_server(self.ref, port, self.root / "p20-server.log")
        try:
            wait_for(lambda: _listening(port, server), 240, "the server")
            body = (work / "digit.png").read_bytes()
            headers = [("Content-Length", str(len(body))), ("Content-Length", "5")]
            status, answer = post(port, body, headers)
            check(status == 400, f"duplicate Content-Length: {status} {answer}")
        finally:
            server.terminate()
            server.communicate(timeout=60)


def _listening(port: int, server: subprocess.Popen) -> bool:
    check(server.poll() is None, "the server stopped")
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated probe numbers, e.g. 4,13")
    p.add_argument("--keep", help="work in this directory and keep it (default: a temporary one)")
    args = p.parse_args()
    names = sorted(n for n in dir(Probes) if re.fullmatch(r"p\d\d_\w+", n))
    if args.only:
        wanted = {int(n) for n in args.only.split(",")}
        names = [n for n in names if int(n[1:3]) in wanted]
    root = Path(args.keep or tempfile.mkdtemp(prefix="vit_jax-probes-"))
    root.mkdir(parents=True, exist_ok=True)
    probes = Probes(root)
    failed = 0
    for name in names:
        started = time.monotonic()
        try:
            getattr(probes, name)()
            verdict = "PASS"
        except ProbeFailed as e:
            verdict, failed = f"FAIL  {e}", failed + 1
        except Exception:  # noqa: BLE001 - a probe that breaks is a failure, with its traceback
            verdict, failed = f"FAIL  {traceback.format_exc(limit=3)}", failed + 1
        print(f"{name:58s} {time.monotonic() - started:6.1f}s  {verdict}", flush=True)
    print(f"{len(names) - failed} of {len(names)} probes passed")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
