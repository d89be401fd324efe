"""Exact resume with every random source on: dropout, attention dropout, stochastic depth, random
crop + flip, RandAugment and mixup. "Every random number is a function of (seed, step)", so a run
stopped by SIGTERM and resumed ends bit-identical to one that ran straight through, and a resume
on another mesh agrees to 1e-5."""

import json
import shutil
import signal
import sys

import jax
import numpy as np
import pytest
import tiny

from vit_jax import trainer
from vit_jax import workdir as workdir_lib

# Every random source of the trainer on, small enough to stay cheap on 2 CPU cores.
RANDOM = {
    "model.transformer.dropout_rate": 0.1,
    "model.transformer.attention_dropout_rate": 0.1,
    "model.transformer.stochastic_depth_rate": 0.2,
    "pp.resize": 10,  # random 8x8 crops of a 10x10 image
    "pp.crop": 8,
    "pp.flip": True,
    "pp.randaugment_layers": 2,
    "pp.randaugment_magnitude": 10,
    "pp.mixup_alpha": 0.5,
    "batch": 16,
    "total_steps": 20,
    "warmup_steps": 3,
    "eval_every": 10,
    "progress_every": 5,
    "checkpoint_every": 4,
    "max_to_keep": 2,
    "async_checkpointing": False,
}
STOP_AT = 15  # a progress step (rows stay comparable), not a checkpoint step: the stop saves


def _rows(workdir):
    """metrics.jsonl without the one timing column."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "img_per_sec_per_device"} for r in rows]


def _flat(workdir):
    params, meta = workdir_lib.load_trained(workdir)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}, meta


def _checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _signal_at(monkeypatch, step: int, sig=signal.SIGTERM, times: int = 1) -> None:
    """Raises a real `sig` (`times` times) in this process as the trainer finishes `step`."""

    class StopAt(trainer.StopRequest):
        polls = 0

        def poll(self, save_failed=False):
            self.polls += 1  # once per step, after its eval / checkpoint
            if self.polls == step:
                for _ in range(times):
                    signal.raise_signal(sig)  # the handler runs before this returns
            return super().poll(save_failed)

    monkeypatch.setattr(trainer, "StopRequest", StopAt)


@pytest.fixture(scope="module")
def straight_and_stopped(build_once):
    """(straight workdir, stopped-at-STOP_AT workdir, resumed workdir), built once per session
    (the tests only read them or copy them)."""

    def build(base):
        config = tiny.tiny_config(**RANDOM)
        straight, stopped, resumed = base / "straight", base / "stopped", base / "resumed"
        trainer.train_and_evaluate(config, str(straight))

        with pytest.MonkeyPatch.context() as mp:
            _signal_at(mp, STOP_AT)
            out = trainer.train_and_evaluate(config, str(stopped))
        assert out["step"] == STOP_AT, out
        assert _checkpoint_steps(stopped) == [12, STOP_AT]
        assert not (stopped / workdir_lib.FINAL_NPZ).exists()
        shutil.copytree(stopped, resumed)

        out = trainer.train_and_evaluate(config, str(resumed))
        assert out["step"] == 20 and out["steps_run"] == 20 - STOP_AT, out

    base = build_once("resume-every-random-source", build)
    return base / "straight", base / "stopped", base / "resumed"


def test_sigterm_then_resume_with_every_random_source_is_bit_exact(straight_and_stopped):
    straight, _, resumed = straight_and_stopped
    assert _flat(straight)[1]["step"] == _flat(resumed)[1]["step"] == 20
    rows = _rows(straight)
    assert [r["step"] for r in rows if "train_loss" in r] == [5, 10, 15, 20]
    assert [r["step"] for r in rows if "test_accuracy" in r] == [10, 20]
    # Every parameter, and every progress and eval row before and after the stop, identical.
    _assert_same_run(straight, resumed)


def test_max_to_keep_leaves_only_the_newest_checkpoints(straight_and_stopped):
    straight, _, resumed = straight_and_stopped
    assert _checkpoint_steps(straight) == [16, 20]  # 4, 8, 12 removed: max_to_keep=2
    assert _checkpoint_steps(resumed) == [16, 20]  # 12 and the stop's 15 removed


def _assert_same_run(straight, other):
    a, b = _flat(straight)[0], _flat(other)[0]
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert _rows(straight) == _rows(other)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_then_resume_is_bit_exact(straight_and_stopped, tmp_path, presses):
    """Ctrl-C once: the step finishes and is saved, as for SIGTERM. Twice before then: the run
    stops at once (`Interrupted`), the step in flight unsaved, the lock and the signal handlers
    released; the restart resumes from the newest complete checkpoint. Both end bit-exact."""
    from vit_jax import train

    straight = straight_and_stopped[0]
    config, wd = tiny.tiny_config(**RANDOM), tmp_path / "w"
    before = signal.getsignal(signal.SIGINT)
    with pytest.MonkeyPatch.context() as mp:
        _signal_at(mp, 10, signal.SIGINT, times=presses)  # checkpoints at 4 and 8
        if presses == 1:
            assert trainer.train_and_evaluate(config, str(wd))["step"] == 10
        else:
            with pytest.raises(trainer.Interrupted) as stopped:
                trainer.train_and_evaluate(config, str(wd))
            assert train.exit_for(stopped.value, wd) == (
                130,
                "interrupted by a second Ctrl-C before the step in flight was saved; "
                "a restart resumes from checkpoint 8",
            )
    assert signal.getsignal(signal.SIGINT) is before
    assert _checkpoint_steps(wd) == ([8, 10] if presses == 1 else [4, 8])
    assert not (wd / workdir_lib.FINAL_NPZ).exists()
    out = trainer.train_and_evaluate(config, str(wd))  # the lock was released
    assert out["step"] == 20 and out["steps_run"] == (10 if presses == 1 else 12), out
    _assert_same_run(straight, wd)


def test_exit_codes_of_the_train_cli(tmp_path):
    from vit_jax import data, run_lock, train

    assert train.exit_for(KeyboardInterrupt(), tmp_path) == (
        130,
        "interrupted by Ctrl-C; a restart resumes from the start (no checkpoint)",
    )
    for error, code in [
        (trainer.NonFiniteLossError("nan"), 1),
        (workdir_lib.CheckpointSaveError("disk"), 1),
        (data.BadImageError("x.png: not an image", "x.png"), 1),
        (OSError("mount"), 1),
        (run_lock.WorkdirLockedError("held"), 2),
        (trainer.ConfigError("total_steps"), 2),
        (FileNotFoundError("dataset"), 2),
    ]:
        assert train.exit_for(error, tmp_path) == (code, str(error)), error
    assert train.exit_for(RuntimeError("a bug"), tmp_path) is None  # a traceback


@pytest.mark.slow
def test_resume_on_another_mesh_agrees(straight_and_stopped, tmp_path):
    """Stopped on 1 device, resumed on 2 (data=2): same batches and random numbers, to 1e-5."""
    straight, stopped, _ = straight_and_stopped
    shutil.copytree(stopped, tmp_path / "w")
    flags = tiny.flags(**RANDOM)
    cmd = [
        sys.executable,
        "-m",
        "vit_jax.train",
        "--config=configs/default.py",
        f"--workdir={tmp_path / 'w'}",
        *flags,
        "--config.mesh.data=2",
    ]
    out = tiny.run(cmd, devices=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr and "over 2 devices" in out.stderr
    a = np.load(straight / workdir_lib.FINAL_NPZ)
    b = np.load(tmp_path / "w" / workdir_lib.FINAL_NPZ)
    # The 2-device checkpoint reads in this process (readers: predict, evaluate, convert, ...).
    read, _ = workdir_lib.load_trained(tmp_path / "w")
    np.testing.assert_array_equal(read["head"]["kernel"], b["head/kernel"])
    assert set(a.files) == set(b.files)
    for name in a.files:
        if name.endswith("key/bias"):
            # Its gradient is exactly 0 (softmax ignores a shift of every logit), so its value
            # is rounding noise (~1e-5) that follows the reduction order, not the computation.
            assert np.abs(a[name]).max() < 1e-3 and np.abs(b[name]).max() < 1e-3, name
            continue
        np.testing.assert_allclose(a[name], b[name], atol=1e-6, err_msg=name)
    rows_a, rows_b = _rows(straight), _rows(tmp_path / "w")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for x, y in zip(rows_a, rows_b, strict=True):
        assert x.keys() == y.keys()
        np.testing.assert_allclose([x[k] for k in x], [y[k] for k in x], rtol=1e-4, atol=1e-5)


def test_step_randomness_depends_on_the_step_only():
    """Same params and batch: the same step gives the same loss, another step another loss
    (dropout, stochastic depth): one RNG reused across steps would resume exactly but is wrong."""
    from vit_jax import models, optim, sharding

    config = tiny.tiny_config(**RANDOM, **{"model.transformer.num_layers": 1})
    model = models.get_model(config.model, num_classes=10)
    size = (8, 8)
    tx = optim.make_optimizer(config, trainer.abstract_params(model, size))
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    state, _ = trainer.create_state(model, tx, mesh, size, seed=0)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + rng.normal(0, 0.1, x.shape).astype(x.dtype), state.params)
    step_fn = trainer.make_train_step(model, tx, config)  # classification by default
    # Only the loss: XLA drops the backward pass and the update (a quicker compile).
    step = jax.jit(lambda *args: step_fn(*args)[1]["train_loss"])
    batch = {
        "image": rng.uniform(-1, 1, (16, 8, 8, 3)).astype(np.float32),
        "label": np.eye(10, dtype=np.float32)[rng.integers(0, 10, 16)],
    }
    at = lambda i: trainer.TrainState(params=params, opt_state=state.opt_state, step=np.int32(i))
    loss = lambda i: float(step(at(i), batch, {}))
    first = loss(7)
    assert loss(7) == first
    assert loss(8) != first


# A distillation run: the same random sources, a teacher read from a file at every start.
DISTILL = {
    **RANDOM,
    "total_steps": 12,
    "eval_every": 12,
    "checkpoint_every": 4,
    "objective": "distillation",
    "alpha": 0.5,
    "temperature": 2.0,
    "distill_type": "soft",
}
DISTILL_STOP_AT = 10


@pytest.mark.slow
def test_distillation_run_resumed_after_sigterm_is_bit_exact(tmp_path):
    import ml_collections
    from sharded_steps import write_teacher

    from vit_jax import distill, models, objectives, sharding

    teacher = write_teacher(tmp_path)
    config = tiny.tiny_config(**DISTILL)
    config.teacher = ml_collections.ConfigDict(dict(checkpoint=teacher, model="", dtype=""))
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    trainer.train_and_evaluate(config, str(straight))
    with pytest.MonkeyPatch.context() as mp:
        _signal_at(mp, DISTILL_STOP_AT)
        out = trainer.train_and_evaluate(config, str(stopped))
    assert out["step"] == DISTILL_STOP_AT, out
    assert _checkpoint_steps(stopped) == [8, DISTILL_STOP_AT]
    out = trainer.train_and_evaluate(config, str(stopped))
    assert out["step"] == 12 and out["steps_run"] == 12 - DISTILL_STOP_AT, out

    a, meta_a = _flat(straight)
    b, meta_b = _flat(stopped)
    assert meta_a["step"] == meta_b["step"] == 12 and a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    rows_a, rows_b = _rows(straight), _rows(stopped)
    assert [r["step"] for r in rows_a if "train_loss" in r] == [5, 10, 12]
    assert rows_a == rows_b
    # Really a distillation run: the config the workdir records builds a teacher objective.
    recorded = ml_collections.ConfigDict(json.loads((stopped / "config.json").read_text()))
    model = models.get_model(recorded.model, num_classes=10)
    objective = objectives.build(recorded, model, sharding.make_mesh(devices=jax.devices()[:1]))
    assert isinstance(objective, distill.DistillationObjective) and objective.frozen, objective
