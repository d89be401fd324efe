"""What the CLIs share: one start-up, one flag vocabulary, exit codes and one-line errors.

Start-up: `start()` sets up the console and TensorFlow's device policy; `python -m vit_jax.X`
runs it first (`run(main)`), before anything imports TensorFlow. Importing a vit_jax module does
nothing of the kind (no hooks, no redirected descriptors, no hidden devices, no environment
read or written); a notebook or a program that wants the CLIs' console calls `start()` itself.

Flags: every CLI that reads weights takes `--checkpoint` (what to read), `--model` (a zoo name
for files that record no model), `--resolution` (the input size; default what the weights were
made for) and `--verbose` (`add_weights_flags`, `ArgumentParser`).

Exit codes: 0 success; 1 a runtime failure (an input image that cannot be read, a test set that
fails while evaluating, an output that cannot be written); 2 a configuration error, found before
any work is done (a bad or missing flag, a checkpoint that is missing, damaged or does not fit
the model, an unknown model name, classes that differ from the dataset's, an output path that
is taken). Each error is one `error: ...` line on stderr, never a traceback.

The console (stderr): one short line per event of ours (`HH:MM:SS message` for the trainer,
`warning: ...` / `error: ...`), libraries' warnings and errors as their first line, and none of
their INFO chatter (TensorFlow's C++ banners while it loads, JAX's accelerator probing, Orbax
and absl INFO). `--verbose` keeps all of it, in absl's format. Environment variables the user
set (`TF_CPP_MIN_LOG_LEVEL`) are never overridden.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import NoReturn

__all__ = [
    "CLI_MODULES",
    "EXIT_CONFIG",
    "EXIT_OK",
    "EXIT_RUNTIME",
    "Failure",
    "MODEL_HELP",
    "RESOLUTION_HELP",
    "VERBOSE_HELP",
    "add_deprecated_alias",
    "add_max_pixels_flag",
    "add_weights_flags",
    "config_argv",
    "config_error",
    "ArgumentParser",
    "ConsoleHandler",
    "fail",
    "load_model",
    "one_line",
    "positive_int",
    "quiet_libraries",
    "reports_failures",
    "run",
    "setup_console",
    "start",
    "wants_verbose",
]

# `python -m NAME` for each of our CLIs.
CLI_MODULES = frozenset(
    f"vit_jax.{name}"
    for name in (
        "train",
        "predict",
        "evaluate",
        "visualize",
        "convert.__main__",
        "benchmark",
        "probe",
        "serve",
        "export",
        "models.__main__",
        "install_missing",
    )
)

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2

VERBOSE_HELP = "also show the libraries' logs (TensorFlow, JAX, Orbax) in absl's format"


def one_line(error: BaseException | str) -> str:
    """The message of `error` on one line (continuation lines joined with '; ')."""
    text = str(error).strip() or type(error).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def fail(error: BaseException | str, code: int = EXIT_CONFIG) -> int:
    """Prints `error: <message>` as one line on stderr and returns `code`."""
    print(f"error: {one_line(error)}", file=sys.stderr)
    return code


class Failure(Exception):
    """Raised anywhere below a CLI's `main` (decorated by `reports_failures`): printed as one
    `error:` line, and `main` returns `code`."""

    def __init__(self, error: BaseException | str, code: int = EXIT_CONFIG):
        super().__init__(one_line(error))
        self.code = code


def reports_failures(main: Callable[..., int]) -> Callable[..., int]:
    """Decorates a CLI's `main(argv)`: a `Failure` raised inside becomes its one line on stderr
    and its exit code (also when a test or program calls `main(argv)` in-process)."""

    @functools.wraps(main)
    def checked_main(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except Failure as e:
            return fail(e, e.code)

    return checked_main


def load_model(args: argparse.Namespace, *, resolution: int | None = None):
    """The trained model the weights flags name (`--checkpoint`, `--model`, `--resolution`, or
    `resolution` when given): a `vit_jax.inference.TrainedModel`; a `Failure` (exit 2) naming the
    file when it cannot be read."""
    from vit_jax import inference  # the CLI layer stays light until weights are read

    try:
        return inference.load_model(
            args.checkpoint,
            model=args.model,
            resolution=resolution or getattr(args, "resolution", None),
        )
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        raise Failure(e, EXIT_CONFIG) from None


# ----------------------------------------------------------------------------- flags


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error: ...` line (exit 2) instead of usage + error,
    with the shared flags: `--verbose` (unless `verbose=False`: a CLI without a console), the
    weights flags (`weights=True`: `add_weights_flags`) and `--max-pixels` (`max_pixels=True`).
    The description (the module docstring) is shown as written."""

    def __init__(
        self,
        *args,
        verbose: bool = True,
        weights: bool = False,
        max_pixels: bool = False,
        **kwargs,
    ):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        if verbose:
            self.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
        if weights:
            add_weights_flags(self)
        if max_pixels:
            add_max_pixels_flag(self)

    def error(self, message: str) -> NoReturn:
        sys.exit(fail(f"{message} (see {self.prog} --help)", EXIT_CONFIG))


def add_weights_flags(p: argparse.ArgumentParser, *, resolution: bool = True) -> None:
    """`--checkpoint`, `--model` and (with `resolution`) `--resolution`: what every CLI that
    reads weights (`vit_jax.inference.load_model`) takes."""
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a run (workdir, checkpoints/ or a step dir), an .npz, a transformers dir, "
        "a timm file or hub folder",
    )
    p.add_argument("--model", help=MODEL_HELP)
    if resolution:
        p.add_argument("--resolution", type=int, help=RESOLUTION_HELP)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (`--batch`, `--top-k`, `--max-pixels`)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_max_pixels_flag(p: argparse.ArgumentParser) -> None:
    """`--max-pixels`: the largest image a CLI decodes, read from its header first."""
    from vit_jax.data import image_header  # light: no TensorFlow until an image is read

    default = image_header.DEFAULT_MAX_PIXELS
    p.add_argument(
        "--max-pixels",
        type=positive_int,
        default=default,
        help=f"largest image, read from its header before decoding (default {default})",
    )


MODEL_HELP = "zoo name, for files that don't record their model"
RESOLUTION_HELP = "input size (default: what the weights were made for)"


class _DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: stores into the new flag's place, with a one-line warning."""

    def __init__(self, option_strings, dest, *, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(p: argparse.ArgumentParser, old: str, new: str, **kwargs) -> None:
    """`old` keeps working as `new` (same value type), warns once per use, and is left out of
    --help."""
    dest = new.lstrip("-").replace("-", "_")
    p.add_argument(
        old,
        dest=dest,
        action=_DeprecatedAlias,
        new=new,
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
        **kwargs,
    )


# ----------------------------------------------------------------------------- --config


def config_argv(argv: Sequence[str]) -> list[str]:
    """argv with a `--config` that names a packaged recipe (`configs/NAME.py[:ARG]`, `NAME`)
    replaced by the installed recipe's file, so one command works from a checkout, from an
    installed wheel and from any directory (a file at the given path wins)."""
    from vit_jax import configs

    out, argv = [], list(argv)
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            a = "--config=" + configs.recipe_file(a[len("--config=") :])
        elif i > 0 and argv[i - 1] == "--config":
            a = configs.recipe_file(a)
        out.append(a)
    return out


def config_error(argv: Sequence[str], error: BaseException) -> str:
    """The one-line reason why absl/ml_collections could not parse `--config` in `argv`.

    config_flags wraps whatever the config file raised into a message that carries the file's
    traceback; this loads the file again itself and names what failed: a file that does not
    exist or cannot be imported, `get_config(ARG)` raising (an unknown model name), or a
    `--config.KEY=VALUE` naming no field (with the valid keys and the closest one). Other
    errors (a bad value for a known key, an unknown flag) keep the library's message.
    """
    specs = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    specs += [b for a, b in zip(argv, argv[1:], strict=False) if a == "--config"]
    if not specs:
        return one_line(error)
    spec = specs[-1]
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        return f"--config={spec}: no such file {path}"
    try:
        module_spec = importlib.util.spec_from_file_location("_vit_jax_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - whatever the config file raises while importing
        return f"--config={spec}: cannot load {path}: {type(e).__name__}: {one_line(e)}"
    if not callable(getattr(module, "get_config", None)):
        return f"--config={spec}: {path} defines no get_config()"
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # noqa: BLE001 - whatever get_config raises for its argument
        call = f"get_config({arg!r})" if arg else "get_config()"
        return f"--config={spec}: {call} failed: {one_line(e)}"
    return _unknown_override(argv, config) or one_line(error)


def _unknown_override(argv: Sequence[str], config) -> str | None:
    """For a `--config.a.b=v` naming no field of `config`: which one, and the valid keys."""
    import difflib

    for a in argv:
        if not a.startswith("--config."):
            continue
        keys = a[len("--config.") :].split("=", 1)[0].split(".")
        node, where = config, "config"
        for key in keys:
            if not hasattr(node, "keys") or key not in node:
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                return f"unknown config key {where}.{key}{hint}; valid keys: {', '.join(valid)}"
            node, where = node[key], f"{where}.{key}"
    return None


def wants_verbose(argv: Sequence[str]) -> bool:
    """Whether argv asks for `--verbose` (argparse and absl spellings)."""
    verbose = False
    for a in argv:
        if a == "--":
            break
        if a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1"):
            verbose = True
        elif a in ("--noverbose", "--verbose=false", "--verbose=False", "--verbose=0"):
            verbose = False
    return verbose


# ----------------------------------------------------------------------------- start-up


def start(verbose: bool | None = None, *, timestamps: bool = False) -> ConsoleHandler | None:
    """The start-up of every CLI, and of any program or notebook that wants their console.

    1. TensorFlow's policy: it runs on the CPU only (tf.data needs no accelerator; a GPU build
       would otherwise reserve the memory JAX uses) and, unless `verbose`, its C++ load banners
       are dropped: `TF_CPP_MIN_LOG_LEVEL` becomes 2 (errors) when the user has not set it, and
       that level is applied to the lines TensorFlow prints while it loads.
    2. The console (`setup_console`): one short line per event, libraries' INFO dropped
       (`verbose`: absl's handler and format, everything).

    Both act on TensorFlow when it is imported, so call this before anything imports it (or
    jax, which sets its own TF_CPP_MIN_LOG_LEVEL default). The CLIs guarantee that by
    construction: their modules import only the standard library and `vit_jax.cli` at module
    level (`tests/test_cli_start.py` checks it), `python -m vit_jax.X` calls `run(main)`, which
    calls this first, and everything heavy is imported inside functions after it. Called later
    (TensorFlow already loaded), the device policy is applied at once, with a warning when
    TensorFlow has already placed work on a GPU. `verbose` None: as `--verbose` in sys.argv.
    Calling it again replaces the console set up before. Returns the console handler (None
    when verbose).
    """
    if verbose is None:
        verbose = wants_verbose(sys.argv[1:])
    _tensorflow_policy(verbose)
    return setup_console(verbose, timestamps=timestamps)


def quiet_libraries(argv: Sequence[str] | None = None) -> bool:
    """The TensorFlow half of `start()` alone (for a CLI that sets up its console later);
    verbose as `--verbose` in argv (default sys.argv). Returns verbose."""
    verbose = wants_verbose(sys.argv[1:] if argv is None else argv)
    _tensorflow_policy(verbose)
    return verbose


def _tensorflow_policy(verbose: bool) -> None:
    """TensorFlow on the CPU only, and quiet while it loads unless verbose (see `start`)."""
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        min_level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        min_level = 0
    chatter = None if verbose or min_level <= 0 else _tf_load_chatter(min_level)
    if "tensorflow" in sys.modules:
        _tensorflow_on_cpu(sys.modules["tensorflow"])
        return
    loader = next((f for f in sys.meta_path if isinstance(f, _TensorFlowLoader)), None)
    if loader is None:
        sys.meta_path.insert(0, _TensorFlowLoader(chatter))
    else:
        loader.chatter = chatter


def _tensorflow_on_cpu(tf) -> None:
    """Hides the GPUs from TensorFlow (it must not have initialised its devices yet)."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        if tf.config.list_logical_devices("GPU"):
            from absl import logging as absl_logging

            absl_logging.warning(
                "TensorFlow already uses the GPU; call vit_jax.cli.start() before using TensorFlow"
            )


def _tf_load_chatter(min_level: int) -> re.Pattern:
    """What TensorFlow prints from C++ while it loads, below TF_CPP_MIN_LOG_LEVEL=`min_level`.

    Its glog-format lines (`I0000 00:00:17... port.cc:153] oneDNN custom operations are on`)
    come from absl C++ logging, which ignores TF_CPP_MIN_LOG_LEVEL: the level is applied here.
    """
    levels = "IW"[: max(0, min(min_level, 2))]
    return re.compile(
        r"^(WARNING: All log messages before absl::InitializeLog\(\)"
        rf"|[{levels}]\d{{4}} [\d:.]+ +\d+ \S+:\d+\]"
        r"|To enable the following instructions:)"
    )


class _TensorFlowLoader(importlib.abc.MetaPathFinder):
    """Loads `tensorflow` as `start()` wants it: with file descriptor 2 captured and replayed
    without `chatter` (None: not captured), then kept off the GPUs. Removes itself once used."""

    name = "tensorflow"

    def __init__(self, chatter: re.Pattern | None):
        self.chatter = chatter
        self.finding = False

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name or self.finding:
            return None
        self.finding = True  # the finders after this one find the real spec
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.finding = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def policy_exec_module(module):
            if self in sys.meta_path:  # loaded once (find_spec alone may be a probe)
                sys.meta_path.remove(self)
            quiet = _CapturedStderr(self.chatter) if self.chatter else contextlib.nullcontext()
            with quiet:
                exec_module(module)
                _tensorflow_on_cpu(module)

        spec.loader.exec_module = policy_exec_module
        return spec


class _CapturedStderr:
    """Within: fd 2 goes to a temporary file. After: its lines but `drop`'s go to stderr."""

    def __init__(self, drop: re.Pattern):
        self.drop = drop

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.file = tempfile.TemporaryFile(mode="w+b")
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        try:
            sys.stderr.flush()
        finally:
            os.dup2(self.saved, 2)
            os.close(self.saved)
        self.file.seek(0)
        text = self.file.read().decode(errors="replace")
        self.file.close()
        kept = [line for line in text.splitlines() if not self.drop.match(line)]
        if kept:
            sys.stderr.write("\n".join(kept) + "\n")
            sys.stderr.flush()
        return False


# ----------------------------------------------------------------------------- the console


_OWN_CODE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _LibraryFilter(logging.Filter):
    """Our records pass; a library's only from WARNING up, and only its first line.

    A failed save makes Orbax and asyncio log the same error once per array, with tracebacks;
    the trainer reports it in one line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.pathname.startswith(_OWN_CODE):
            return True
        if record.levelno < logging.WARNING:
            return False
        if record.name == "asyncio" and "never retrieved" in str(record.msg):
            return False
        first_line = record.getMessage().split("\n", 1)[0]
        record.msg, record.args, record.exc_info, record.exc_text = first_line, (), None, None
        return True


class _ShortFormatter(logging.Formatter):
    """`[HH:MM:SS ]message`; warnings and errors say so (`warning: ...`, `error: ...`)."""

    def __init__(self, timestamps: bool):
        super().__init__("%(asctime)s %(message)s" if timestamps else "%(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        if record.levelno >= logging.ERROR:
            record.message = f"error: {record.message}"
        elif record.levelno >= logging.WARNING:
            record.message = f"warning: {record.message}"
        return super().formatMessage(record)


class ConsoleHandler(logging.Handler):
    """One line per record on stderr; progress records (`extra={"progress": (step, total)}`,
    optionally `"postfix": text` for the bar) drive a tqdm bar instead when the stream is a
    terminal at least 40 columns wide (other records are written above the bar)."""

    def __init__(self, stream=None, *, timestamps: bool = True, progress_bar: bool | None = None):
        super().__init__()
        self.stream = stream
        self.progress_bar = progress_bar
        self.bar = None
        self.setFormatter(_ShortFormatter(timestamps))

    def _stream(self):
        return self.stream if self.stream is not None else sys.stderr

    def _use_bar(self) -> bool:
        if self.progress_bar is not None:
            return self.progress_bar
        stream = self._stream()
        isatty = getattr(stream, "isatty", None)
        if not (isatty and isatty()):
            return False
        try:
            return os.get_terminal_size(stream.fileno()).columns >= 40
        except (AttributeError, OSError, ValueError):  # no descriptor (a test's fake terminal)
            return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            progress = getattr(record, "progress", None)
            if progress is not None and self._use_bar():
                self._progress(record, *progress)
                return
            line = self.format(record)
            if self.bar is not None:
                from tqdm import tqdm

                tqdm.write(line, file=self._stream())
            else:
                self._stream().write(line + "\n")
                self._stream().flush()
        except Exception:  # noqa: BLE001 - logging's contract: report, never raise
            self.handleError(record)

    def _progress(self, record: logging.LogRecord, step: int, total: int) -> None:
        from tqdm import tqdm

        message = record.getMessage()
        if self.bar is None:
            self._stream().write(self.format(record) + "\n")
            self.bar = tqdm(
                total=total, initial=step, unit="step", file=self._stream(), dynamic_ncols=True
            )
            return
        postfix = getattr(record, "postfix", None) or message.split(": ", 1)[-1]
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(step - self.bar.n)
        self.bar.refresh()
        if step >= total:
            self.close_bar()

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        super().close()


def setup_console(verbose: bool, *, timestamps: bool = False) -> ConsoleHandler | None:
    """Routes logging to the console as described in the module docstring.

    Verbose: absl's handler and format, INFO from every library. Otherwise: a `ConsoleHandler`
    replaces the root logger's stderr handlers (absl's included), INFO from our code only,
    Python warnings as one line. A console set up before is replaced. Returns the handler
    (None when verbose).
    """
    from absl import logging as absl_logging

    root = logging.getLogger()
    for h in list(root.handlers):  # set up before (start() called again)
        if isinstance(h, ConsoleHandler):
            root.removeHandler(h)
            h.close()
    if verbose:
        absl_logging.use_absl_handler()  # (sets levels from absl's flags: set ours after it)
    root.setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.INFO)
    if verbose:
        return None
    for h in list(root.handlers):
        if h is absl_logging.get_absl_handler() or (
            isinstance(h, logging.StreamHandler) and h.stream in (sys.stderr, sys.__stderr__)
        ):
            root.removeHandler(h)
    handler = ConsoleHandler(timestamps=timestamps)
    handler.addFilter(_LibraryFilter())
    root.addHandler(handler)
    logging.captureWarnings(True)
    return handler


def run(main: Callable[[], int | None], *, timestamps: bool = False) -> int:
    """`python -m vit_jax.X`'s entry point: `start()` (verbose as `--verbose` in sys.argv asks),
    then `main()`; its exit code (None: 0). `main(argv)` itself starts nothing, so tests and
    programs can call it in-process."""
    start(wants_verbose(sys.argv[1:]), timestamps=timestamps)
    return main() or EXIT_OK
