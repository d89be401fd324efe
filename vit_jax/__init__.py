"""Vision Transformer, hybrids and MLP-Mixer in JAX/Flax (the CLIs are `python -m vit_jax.X`).

Importing vit_jax (or any of its modules) changes nothing in the process; `vit_jax.cli.start()`
gives a program or notebook the CLIs' console and TensorFlow's device policy.
"""
