"""Evaluators chosen by `config.evals`: k-NN during training, the default unchanged, restarts
that add an evaluator, and evaluate.py free of the trainer."""

import json
import sys

import ml_collections
import numpy as np
import pytest
import tiny

from vit_jax import evaluators, run_config

KNN = {"total_steps": 10, "eval_every": 5, "checkpoint_every": 5, "max_to_keep": 2}


def _knn_config(**changes):
    config = tiny.tiny_config(**{**KNN, **changes})
    config.evals.knn = ml_collections.ConfigDict(dict(type="knn", k=7, temperature=0.1))
    return config


@pytest.fixture(scope="module")
def knn_run(tmp_path_factory):
    from vit_jax import trainer

    wd = tmp_path_factory.mktemp("knn") / "run"
    results = trainer.train_and_evaluate(_knn_config(), str(wd))
    return wd, results


def _independent_knn_accuracy(checkpoint, config) -> float:
    """k-NN accuracy of `checkpoint`'s features as the probe computes it (its own extraction)."""
    from vit_jax import inference, probe

    trained = inference.load_model(str(checkpoint))
    train = probe.extract(trained, config, config.pp.train)
    test = probe.extract(trained, config, config.pp.test)
    pred = probe.knn_predict(train.features, train.labels, test.features, k=7, temperature=0.1)
    return float(np.mean(pred == test.labels))


def test_knn_evaluator_logs_knn_accuracy_at_eval_steps_equal_to_the_probe(knn_run):
    wd, results = knn_run
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "knn_accuracy" in r]
    assert [r["step"] for r in evals] == [5, 10]
    # One row per eval step, classification's metrics unchanged beside k-NN's (counts not logged).
    for row in evals:
        assert set(row) == {
            "step",
            "test_accuracy",
            "test_top5_accuracy",
            "test_loss",
            "knn_accuracy",
        }
    assert results["knn_accuracy"] == evals[-1]["knn_accuracy"]
    assert results["test_examples"] == 355 and results["knn_test_examples"] == 355
    config = _knn_config()
    for row in evals:
        expected = _independent_knn_accuracy(wd / "checkpoints" / str(row["step"]), config)
        assert row["knn_accuracy"] == expected, row


def test_evaluate_does_not_import_the_trainer(knn_run):
    wd, results = knn_run
    flags = json.dumps(tiny.flags())
    code = (
        "import json, sys\n"
        "from vit_jax import evaluate\n"
        f"argv = ['--checkpoint', {str(wd)!r}, '--config=configs/default.py', '--json']\n"
        f"rc = evaluate.main(argv + json.loads({flags!r}))\n"
        "print(json.dumps({'rc': rc, 'trainer': 'vit_jax.trainer' in sys.modules}))\n"
    )
    out = tiny.run([sys.executable, "-c", code])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    status = json.loads(lines[-1])
    assert status == {"rc": 0, "trainer": False}, out.stderr
    assert json.loads(lines[-2])["test_accuracy"] == pytest.approx(results["test_accuracy"])


def test_evaluate_module_imports_no_trainer_statically():
    import ast
    import pathlib

    source = pathlib.Path(tiny.ROOT / "vit_jax" / "evaluate.py").read_text()
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    assert "vit_jax.trainer" not in names


def test_evals_default_and_errors():
    config = tiny.tiny_config()
    assert evaluators.evals_of(config) == [("classification", {"type": "classification"})]
    del config["evals"]
    assert evaluators.evals_of(config) == [("classification", {"type": "classification"})]
    config = _knn_config()
    config.evals.a_first = dict(type="knn")
    names = [name for name, _ in evaluators.evals_of(config)]
    assert names == ["classification", "a_first", "knn"]  # classification first, then by name
    config.evals.bad = dict(type="zero_shot")
    with pytest.raises(ValueError, match=r"config.evals.bad.type must be one of .*'knn'"):
        evaluators.evals_of(config)
    del config.evals["bad"]
    config.evals.knn.neighbours = 5  # a misspelt option is refused by name, not ignored
    with pytest.raises(
        ValueError,
        match=r"config.evals.knn.neighbours: not an option of the "
        r"'knn' evaluator \(it takes type, prefix, k, temperature, train_split",
    ):
        evaluators.evals_of(config)


def test_restart_may_add_or_drop_evaluators(tmp_path):
    """A run whose config.json predates `evals` (or lists others) restarts with new ones."""
    stored = run_config.as_dict(tiny.tiny_config())
    del stored["evals"]
    new = run_config.as_dict(_knn_config(**tiny.OVERRIDES))
    changed = run_config.check_restart(tmp_path, stored, new)
    assert set(changed) == {"evals.knn.k", "evals.knn.temperature", "evals.knn.type"}
    assert run_config.check_restart(tmp_path, stored, run_config.as_dict(tiny.tiny_config())) == {}
    dropped = run_config.as_dict(tiny.tiny_config())
    dropped["evals"] = {"knn": {"type": "knn"}}
    assert "evals.classification.type" in run_config.check_restart(tmp_path, stored, dropped)
    # keys elsewhere still may not appear on restart
    with pytest.raises(run_config.ConfigChangeError, match="new_key"):
        run_config.check_restart(tmp_path, stored, {**new, "new_key": 1})
