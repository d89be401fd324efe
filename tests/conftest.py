"""Shared fixtures: one small digits model trained once per test session."""

import pytest
import tiny


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
    """A workdir of a short digits run that classifies most test digits correctly."""
    from vit_jax import trainer

    workdir = tmp_path_factory.mktemp("trained")
    config = tiny.tiny_config(**tiny.GOOD)
    results = trainer.train_and_evaluate(config, str(workdir))
    assert results["test_accuracy"] > 0.8, results
    return workdir
