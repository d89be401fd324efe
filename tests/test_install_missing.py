"""`python -m vit_jax.install_missing`: what it keeps and what it asks pip for (the notebook's
install cell on a runtime with its own jax and TensorFlow; tests/test_notebook.py runs it for
real in a fresh environment)."""

import importlib.metadata

import pytest

from vit_jax import install_missing

REQUIREMENTS = [
    "jax>=0.10",
    "flax>=0.12",
    "tensorflow-cpu>=2.21",
    "etils[epath]>=1.7",
    "numpy>=1.26",
    'torch>=2.13; extra == "torch"',
    'pytest>=8; extra == "test"',
    'tomli>=2; python_version < "3.0"',
]


ETILS = ['fsspec; extra == "epath"', 'zipp; extra == "epath"', 'numpy; extra == "enp"']


def test_keeps_what_is_installed_and_asks_only_for_what_is_missing():
    have = {"jax": "0.9.0", "tensorflow": "2.20.0", "etils": "1.15.0", "numpy": "2.5.5"}
    requires = {"etils": ETILS}.get
    install, kept, warnings = install_missing.plan(REQUIREMENTS, have, requires)
    # flax is missing; etils is kept in its version but named again for its extra's packages;
    # extras of ours (torch, test) and requirements whose marker fails are not ours to install.
    assert install == ["flax>=0.12", "etils[epath]>=1.7"]
    have |= {"fsspec": "2026.1", "zipp": "3.0"}  # epath's own: etils is complete, nothing to add
    assert install_missing.plan(REQUIREMENTS, have, requires)[0] == ["flax>=0.12"]
    assert kept == [
        "jax 0.9.0",
        "tensorflow 2.20.0 (for tensorflow-cpu>=2.21)",
        "etils 1.15.0",
        "numpy 2.5.5",
    ]
    assert warnings == [
        "jax 0.9.0 is older than vit_jax asks for (jax>=0.10); keeping the runtime's",
        "tensorflow 2.20.0 is older than vit_jax asks for (tensorflow-cpu>=2.21); keeping the "
        "runtime's",
    ]


def test_a_bare_environment_gets_every_requirement_and_tensorflow_cpu():
    install, kept, warnings = install_missing.plan(REQUIREMENTS, {})
    assert install == [
        "jax>=0.10",
        "flax>=0.12",
        "tensorflow-cpu>=2.21",
        "etils[epath]>=1.7",
        "numpy>=1.26",
    ]
    assert kept == warnings == []


@pytest.mark.parametrize("name", ["tensorflow", "tensorflow-cpu", "tf-nightly", "tensorflow_cpu"])
def test_any_tensorflow_build_stands_for_tensorflow_cpu(name):
    have = {install_missing.canonical(name): "2.21.0"}
    install, kept, warnings = install_missing.plan(["tensorflow-cpu>=2.21"], have)
    assert install == [] and warnings == [] and len(kept) == 1


def test_constraints_pin_every_installed_distribution():
    text = install_missing.constraints({"jax": "0.10.1", "odd": "not a version", "numpy": "2.5.5"})
    assert text == "jax==0.10.1\nnumpy==2.5.5\n"  # sorted; a legacy version cannot be pinned
    have = install_missing.installed()
    assert have["jax"] == importlib.metadata.version("jax")
    assert install_missing.canonical("Orbax_Checkpoint.X") == "orbax-checkpoint-x"


def test_dry_run_in_this_environment_has_nothing_to_install(capsys):
    """The test environment has every requirement: the plan keeps them all and installs none."""
    assert install_missing.main(["--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    required = [
        r for r in importlib.metadata.requires("vit_jax") if "extra ==" not in r.replace("'", '"')
    ]
    assert out[0].startswith(f"kept ({len(required)}): ")
    assert out[1] == "to install (0): none"
