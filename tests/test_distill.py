"""Knowledge distillation: the loss by hand, its limits, the frozen teacher, the DeiT token model,
and a tiny end-to-end run whose teacher is the session's trained digits workdir."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import (
    checkpoint,
    configs,
    data,
    distill,
    inference,
    losses,
    models,
    objectives,
    optim,
    sharding,
    trainer,
)
from vit_jax import workdir as workdir_lib
from vit_jax.configs import distill as distill_configs

# Fixed logits: 3 examples, 4 classes; the last label row is a mixup-style mixture.
STUDENT = np.array([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4], [-2.0, 1.5, 1.0, -0.5]])
TEACHER = np.array([[3.0, 0.0, -1.0, 0.5], [-0.5, 2.0, 0.0, 1.0], [0.0, 0.5, 2.5, -1.0]])
DIST = np.array([[0.0, 1.0, -1.0, 2.0], [1.0, -1.0, 0.0, 0.5], [0.3, 0.3, -0.3, 1.2]])
LABELS = np.array([[1.0, 0, 0, 0], [0, 0, 0, 1.0], [0, 0.7, 0.3, 0]])


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _hand_soft(student, teacher, t):
    log_p, log_q = _log_softmax(teacher / t), _log_softmax(student / t)
    return t * t * np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1))


def _hand_ce(logits, labels):
    return np.mean(-np.sum(labels * _log_softmax(logits), axis=-1))


def _loss(**kwargs):
    args = {k: jnp.asarray(v, jnp.float32) for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    rest = {k: v for k, v in kwargs.items() if not isinstance(v, np.ndarray)}
    return float(distill.distillation_loss(**args, **rest))


def test_loss_equals_hand_computation():
    alpha, t = 0.3, 2.0
    ce = _hand_ce(STUDENT, LABELS)
    # Soft: alpha * CE + (1 - alpha) * T^2 * KL(teacher || student) at temperature T.
    expected = alpha * ce + (1 - alpha) * _hand_soft(STUDENT, TEACHER, t)
    got = _loss(logits=STUDENT, labels=LABELS, teacher_logits=TEACHER, alpha=alpha, temperature=t)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Hard: the teacher's argmax (classes 0, 1, 2) as a one-hot target.
    hard = np.eye(4)[[0, 1, 2]]
    expected = alpha * ce + (1 - alpha) * _hand_ce(STUDENT, hard)
    got = _loss(
        logits=STUDENT, labels=LABELS, teacher_logits=TEACHER, alpha=alpha, distill_type="hard"
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Distillation token: the class head learns the labels, the distillation head the teacher.
    expected = alpha * ce + (1 - alpha) * _hand_soft(DIST, TEACHER, t)
    got = _loss(
        logits=STUDENT,
        labels=LABELS,
        teacher_logits=TEACHER,
        dist_logits=DIST,
        alpha=alpha,
        temperature=t,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # A student that already agrees with the teacher pays nothing for distillation.
    same = _loss(logits=TEACHER, labels=LABELS, teacher_logits=TEACHER, alpha=0.0, temperature=t)
    assert abs(same) < 1e-6
    with pytest.raises(ValueError, match="distill_type"):
        _loss(logits=STUDENT, labels=LABELS, teacher_logits=TEACHER, alpha=0.5, distill_type="x")


def test_alpha_one_is_plain_cross_entropy_and_large_temperature_matches_logits():
    for smoothing in (0.0, 0.1):
        plain = losses.classification_loss(
            jnp.asarray(STUDENT), jnp.asarray(LABELS), label_smoothing=smoothing
        )
        got = _loss(
            logits=STUDENT,
            labels=LABELS,
            teacher_logits=TEACHER,
            alpha=1.0,
            temperature=3.0,
            label_smoothing=smoothing,
        )
        assert got == pytest.approx(float(plain), rel=1e-6)
    # T -> infinity: T^2 KL -> (1/2C) ||centred student - centred teacher||^2 (logit matching),
    # and its gradient -> (1/C) (centred student - centred teacher).
    c = STUDENT.shape[-1]
    diff = (STUDENT - STUDENT.mean(-1, keepdims=True)) - (TEACHER - TEACHER.mean(-1, keepdims=True))
    matching = np.mean(np.sum(diff**2, axis=-1)) / (2 * c)
    s, t = jnp.asarray(STUDENT, jnp.float32), jnp.asarray(TEACHER, jnp.float32)
    value = float(distill.soft_distillation(s, t, 100.0))
    np.testing.assert_allclose(value, matching, rtol=5e-3)
    limit = diff / c / len(STUDENT)  # the batch mean divides by B
    errors = [
        np.abs(jax.grad(lambda z, temp=temp: distill.soft_distillation(z, t, temp))(s) - limit)
        for temp in (100.0, 1000.0)
    ]
    assert errors[1].max() < 3e-4 and errors[1].max() < errors[0].max() / 5  # O(1/T)
    # At T = 1 it is the plain KL divergence.
    np.testing.assert_allclose(
        float(distill.soft_distillation(s, t, 1.0)), _hand_soft(STUDENT, TEACHER, 1.0), rtol=1e-5
    )


TINY_VIT = dict(
    patches=dict(size=(4, 4)),
    hidden_size=16,
    transformer=dict(mlp_dim=32, num_heads=2, num_layers=1),
)


def _random_params(shapes, seed=1):
    """Non-trivial values everywhere (heads start at zero), drawn on the host: no compiles."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: 0.3 * rng.standard_normal(x.shape, np.float32), shapes)


def test_distillation_token_model_shapes_and_eval_averaging():
    d, classes, tokens = 16, 5, (16 // 4) ** 2
    base = models.get_model(TINY_VIT, num_classes=classes)
    model = models.get_model(TINY_VIT, num_classes=classes, distillation_token=True)
    assert models.get_config(TINY_VIT).distillation_token is False
    shapes = models.init_shapes(model, 16)
    base_shapes = models.init_shapes(base, 16)
    assert "dist" not in base_shapes and "head_dist" not in base_shapes
    assert shapes["dist"].shape == (1, 1, d)
    assert shapes["head_dist"]["kernel"].shape == (d, classes)
    assert shapes["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 2 + tokens, d)
    extra = d + d + (d * classes + classes)  # token, its position slot, its head
    assert models.count_params(model, num_classes=classes, image_size=16) == (
        models.count_params(base, num_classes=classes, image_size=16) + extra
    )

    images = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3), minval=-1, maxval=1)
    params = _random_params(shapes)
    logits, out = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(params, images)
    cls_logits, dist_logits = out["logits_cls"], out["logits_dist"]
    assert logits.shape == cls_logits.shape == dist_logits.shape == (3, classes)
    assert not np.allclose(cls_logits, dist_logits)  # two different heads
    np.testing.assert_allclose(logits, (cls_logits + dist_logits) / 2, rtol=1e-6, atol=1e-6)
    # The class head reads token 0, the distillation head token 1 of the encoded sequence.
    encoded = out["encoded"]
    head = params["head"]
    np.testing.assert_allclose(
        cls_logits, encoded[:, 0] @ head["kernel"] + head["bias"], rtol=1e-4, atol=1e-5
    )
    head = params["head_dist"]
    np.testing.assert_allclose(
        dist_logits, encoded[:, 1] @ head["kernel"] + head["bias"], rtol=1e-4, atol=1e-5
    )
    train_logits, train_out = jax.eval_shape(
        lambda p, x: model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)}),
        params,
        images,
    )
    assert train_logits.shape == train_out["logits_dist"].shape == (3, classes)

    with pytest.raises(ValueError, match="distillation_token needs classifier='token'"):
        models.init_shapes(
            models.get_model(TINY_VIT, num_classes=2, distillation_token=True, classifier="gap"), 16
        )
    _, base_out = jax.eval_shape(
        lambda p, x: base.apply({"params": p}, x, train=False), base_shapes, images
    )
    assert "logits_dist" not in base_out and "logits_cls" not in base_out


def test_config_variants():
    student = distill_configs.get_config()
    assert student.teacher.checkpoint == distill_configs.TEACHER_WORKDIR
    assert 0 < student.alpha < 1 and student.distill_type == "soft"
    scratch = distill_configs.get_config("scratch")
    assert scratch.alpha == 1.0 and scratch.model.to_dict() == student.model.to_dict()
    assert distill_configs.get_config("token").model.distillation_token is True
    teacher_size = models.count_params(
        models.get_model(distill_configs.get_config("teacher").model, num_classes=10),
        image_size=16,
    )
    student_size = models.count_params(
        models.get_model(student.model, num_classes=10), image_size=16
    )
    assert teacher_size > 20 * student_size
    with pytest.raises(ValueError, match="teacher, student, scratch or token"):
        distill_configs.get_config("bogus")


# ----------------------------------------------------------------------------- with a teacher

STUDENT_MODEL = {
    "model.hidden_size": 16,
    "model.transformer.mlp_dim": 32,
    "model.transformer.num_heads": 2,
    "model.transformer.num_layers": 1,
}


def _config(teacher_dir, **changes):
    """configs/distill.py's student, tiny, distilling from `teacher_dir` at 16x16."""
    config = distill_configs.get_config("student")
    settings = {
        **STUDENT_MODEL,
        "teacher.checkpoint": str(teacher_dir),
        "pp.resize": 16,
        "pp.crop": 16,
        "batch": 32,
        "batch_eval": 128,
        "total_steps": 60,
        "warmup_steps": 5,
        "eval_every": 60,
        "progress_every": 10,
        "checkpoint_every": 60,
        **changes,
    }
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _objective(config):
    """(mesh, student model, the objective the trainer builds for `config`)."""
    mesh = sharding.make_mesh()
    model = models.get_model(config.model, num_classes=data.get_info(config).num_classes)
    return mesh, model, objectives.build(config, model, mesh)


@pytest.mark.slow
def test_teacher_gets_no_gradient_and_is_unchanged_by_steps(trained_workdir):
    config = _config(trained_workdir)
    mesh, model, objective = _objective(config)
    assert isinstance(objective, distill.DistillationObjective)
    size = configs.image_size(config)
    tx = optim.make_optimizer(config, trainer.abstract_params(model, size))
    state, shardings = trainer.create_state(model, tx, mesh, size, 0)
    params = state.params
    before = sharding.to_host(objective.frozen)
    batches = data.train_iterator(config, sharding.batch_sharding(mesh))
    batch = next(batches)

    reference = inference.load_model(str(trained_workdir))

    @jax.jit
    def probe(params, images, labels, frozen, reference_params):
        grads = jax.grad(objective.loss, argnums=(0, 4))(
            params, images, labels, jax.random.key(0), frozen
        )
        expected = reference.model.apply({"params": reference_params}, images, train=False)[0]
        return objective.teacher_logits(images, frozen), expected, grads

    teacher_logits, expected, (grads, teacher_grads) = probe(
        params, batch["image"], batch["label"], objective.frozen, reference.params
    )
    # The teacher is the trained model in eval mode, and nothing flows back into it.
    np.testing.assert_allclose(teacher_logits, expected, rtol=1e-5, atol=1e-5)
    assert all(not np.any(g) for g in jax.tree.leaves(teacher_grads))
    assert any(np.any(g) for g in jax.tree.leaves(grads))

    step = trainer.TrainStep(model, tx, config, mesh, shardings, objective)
    losses_seen = []
    for _ in range(3):
        state, metrics = step(state, next(batches))
        losses_seen.append(float(metrics["train_loss"]))
    assert np.all(np.isfinite(losses_seen))
    after = sharding.to_host(objective.frozen)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_teacher_options_and_errors(trained_workdir, tmp_path):
    # A student at 8x8: the 16x16 teacher's position embeddings are resampled to its grid.
    config = _config(trained_workdir, **{"pp.resize": 8, "pp.crop": 8})
    *_, objective = _objective(config)
    posemb = objective.frozen["teacher"]["Transformer"]["posembed_input"]["pos_embedding"]
    assert posemb.shape == (1, 1 + 2 * 2, 32)

    # A bfloat16 teacher stores and computes in bfloat16 and gives nearly the same logits.
    _, _, f32 = _objective(_config(trained_workdir))
    _, _, bf16 = _objective(_config(trained_workdir, **{"teacher.dtype": "bfloat16"}))
    assert {x.dtype for x in jax.tree.leaves(bf16.frozen)} == {jnp.dtype(jnp.bfloat16)}
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3)), jnp.float32)
    logits = [jax.jit(o.teacher_logits)(images, o.frozen) for o in (f32, bf16)]
    assert logits[1].dtype == jnp.float32
    np.testing.assert_allclose(logits[1], logits[0], atol=0.05 * float(jnp.abs(logits[0]).max()))

    with pytest.raises(FileNotFoundError, match=r"config\.teacher\.checkpoint.*missing"):
        _objective(_config(tmp_path / "missing"))
    subset = _config(trained_workdir, class_subset=(0, 1, 2))
    with pytest.raises(ValueError, match="teacher predicts 10 classes, the student 3"):
        _objective(subset)
    with pytest.raises(ValueError, match=r"config\.alpha must be in \[0, 1\]"):
        _objective(_config(trained_workdir, alpha=1.5))
    with pytest.raises(ValueError, match=r"config\.teacher\.dtype must be"):
        _objective(_config(trained_workdir, **{"teacher.dtype": "bf16"}))
    # alpha = 1 is the baseline: no teacher is loaded, the loss is plain cross-entropy.
    *_, plain = _objective(_config(tmp_path / "missing", alpha=1.0))
    assert plain.frozen == {}


@pytest.mark.slow
def test_distill_run_improves_and_token_student_round_trips(trained_workdir, tmp_path):
    config = _config(
        trained_workdir,
        **{
            "model.distillation_token": True,
            "distill_type": "hard",
            "model.hidden_size": 32,  # half the teacher's depth
            "model.transformer.mlp_dim": 64,
            "base_lr": 5e-3,
            "eval_every": 30,
        },
    )
    results = trainer.train_and_evaluate(config, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r["train_loss"] for r in rows if "train_loss" in r]
    evals = [r["test_accuracy"] for r in rows if "test_accuracy" in r]
    # Each loss row averages 10 batches of 32 (noise ~0.03 on ~2); the first starts at ln 10 =
    # 2.3 (zero head). A teacher and student of another seed are a bigger change than another
    # CPU's rounding (XLA builds capped at AVX2, AVX and SSE4.2 give the same numbers here):
    # over seeds 0-9 the last row is 0.67-0.80 of the first, and the accuracy 0.44-0.58 (mean
    # 0.52, sd 0.04) from chance (a zero head predicts class 0: ~0.1, binomial sd 0.016 on 355
    # examples). 0.9 is > 5 noise sd beyond the seeds' worst; 0.3 is 12 binomial sd above
    # chance and 5 below the seeds' worst.
    assert train[-1] < 0.9 * train[0], train
    assert results["step"] == 60 and len(evals) == 2
    assert evals[-1] > 0.3, evals

    # The workdir and final.npz hold the token and its head, and reload to the same logits.
    params, meta = workdir_lib.load_trained(tmp_path)
    assert params["dist"].shape == (1, 1, 32) and params["head_dist"]["kernel"].shape == (32, 10)
    assert meta["model"]["distillation_token"] is True
    images = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
    from_workdir = inference.load_model(str(tmp_path))
    from_npz = inference.load_model(str(tmp_path / workdir_lib.FINAL_NPZ))
    assert from_npz.model.distillation_token and from_workdir.model.distillation_token
    assert "dist" in checkpoint.load(tmp_path / workdir_lib.FINAL_NPZ)
    model = models.get_model(meta["model"], num_classes=10)
    expected = model.apply({"params": params}, images, train=False)[0]
    np.testing.assert_allclose(from_workdir.logits(images), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(from_npz.logits(images), expected, rtol=1e-5, atol=1e-5)


def test_config_picks_the_objective_from_the_registry():
    """`config.objective` names it; a set teacher.checkpoint alone still means distillation."""
    assert objectives.objective_name(distill_configs.get_config("student")) == "distillation"
    assert objectives.objective_name(distill_configs.get_config("teacher")) == "classification"
    scratch = distill_configs.get_config("scratch")
    assert objectives.objective_name(scratch) == "classification"
    scratch.teacher.checkpoint = "runs/some-teacher"  # the older way of asking for a teacher
    assert objectives.objective_name(scratch) == "distillation"

    model = models.get_model(scratch.model, num_classes=10)
    plain = objectives.build(distill_configs.get_config("teacher"), model, None)
    assert isinstance(plain, objectives.Objective) and plain.frozen == {}
    no_teacher = distill_configs.get_config("student")
    no_teacher.teacher.checkpoint = ""
    with pytest.raises(ValueError, match=r"alpha=0\.5 needs config\.teacher\.checkpoint"):
        objectives.build(no_teacher, model, None)
    labels_only = objectives.build(distill_configs.get_config("scratch"), model, None)
    assert isinstance(labels_only, objectives.Objective) and labels_only.frozen == {}
    unknown = distill_configs.get_config("teacher")
    unknown.objective = "contrastive"
    with pytest.raises(ValueError) as e:
        objectives.build(unknown, model, None)
    assert str(e.value) == (
        "config.objective must be one of 'classification', 'distillation', got 'contrastive'"
    )
