"""`python tests/multihost_sigterm.py PROCESS BATCHES TRAIN_FLAGS...`: `vit_jax.train`, except
that process PROCESS sends itself a real SIGTERM once the trainer has taken BATCHES batches (the
other processes get no signal: they must learn of it from the cross-host agreement).

Run by tests/test_multihost.py.
"""

import os
import runpy
import signal
import sys

process, batches = int(sys.argv[1]), int(sys.argv[2])
del sys.argv[1:3]

from vit_jax import data  # noqa: E402 - after the argument handling above

_original = data.train_iterator


def _train_iterator(*args, **kwargs):
    import jax

    taken = kwargs.get("start_step", 0)
    for batch in _original(*args, **kwargs):
        yield batch
        taken += 1
        if taken == batches and jax.process_index() == process:
            os.kill(os.getpid(), signal.SIGTERM)


data.train_iterator = _train_iterator
runpy.run_module("vit_jax.train", run_name="__main__", alter_sys=True)
