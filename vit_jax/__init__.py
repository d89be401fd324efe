"""Vision Transformer, hybrids and MLP-Mixer in JAX/Flax (the CLIs are `python -m vit_jax.X`)."""

import os as _os

# The user's own TF_CPP_MIN_LOG_LEVEL, read before `import jax` sets a default of its own ('1'):
# the CLIs never override a value the user set (vit_jax.cli.quiet_libraries).
_USER_TF_CPP_MIN_LOG_LEVEL = _os.environ.get("TF_CPP_MIN_LOG_LEVEL")
