"""Forward parity with timm itself: timm builds each architecture (2 blocks, small input,
random weights), saves it as a hub checkpoint would look (`model.safetensors` + `config.json`)
and runs it; vit_jax reads the files with `python -m vit_jax.predict`'s loader and runs the same
inputs. Prints the largest differences of the logits and the pooled features, at the size the
weights were made for and at a second, non-square size (timm built with `dynamic_img_size=True`,
so it resamples its position table on the fly; ours resamples the recorded `posemb_grid` table
with the method the converter recorded, `bicubic_antialias`, without `resolution=`).

    python benchmarks/timm_parity.py --timm-python /work/timm-venv/bin/python [--archs a,b]

timm runs in its own interpreter (it needs torchvision, which does not install beside the CPU
torch of the test environment), so this is a script, not a test. Parameters are perturbed so
that LayerScale gammas (initialised to 1e-5 / 1e-6) and zero biases cannot hide a wrong row.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

# (timm architecture, input size[, create_model keyword arguments]): every layout our timm
# table reads.
ARCHS: tuple[tuple, ...] = (
    ("vit_small_patch16_224", 32),  # class token, exact GELU
    ("deit_small_distilled_patch16_224", 32),  # class + distillation token, two heads
    ("deit3_small_patch16_224", 32),  # LayerScale, position table without the class row
    ("vit_small_patch14_dinov2", 28),  # LayerScale, class row in the table
    ("vit_small_patch14_reg4_dinov2", 28),  # + 4 registers, no class row
    ("vit_giant_patch14_dinov2", 28),  # SwiGLU (packed), LayerScale
    ("vit_base_patch16_siglip_224", 32),  # MAP head, exact GELU
    ("vit_base_patch32_siglip_256", 64),  # MAP head, tanh GELU
    ("vit_base_patch16_siglip_gap_224", 32),  # average pooling, no class token
    ("vit_base_patch16_gap_224", 32),  # 16 heads of 48 (not the base size's 12 of 64)
    ("vit_so400m_patch14_siglip_224", 28),  # width 1152, MLP 4304
    # qk-norm (LayerNorm on q and k per head) with registers and no class row in the table
    ("vit_small_patch16_224", 32, {"qk_norm": True, "reg_tokens": 2, "no_embed_class": True}),
)

_TIMM_SIDE = r"""
import json, sys, pathlib
import numpy as np, torch, timm
from safetensors.torch import save_file

arch, size, out = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
kwargs = json.loads(sys.argv[4])
torch.manual_seed(0)
model = timm.create_model(
    arch, pretrained=False, depth=2, img_size=size, num_classes=5, dynamic_img_size=True, **kwargs
).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if p.ndim == 1 or name.endswith("gamma"):  # norms, biases, LayerScale
            p.add_(0.3 * torch.randn_like(p))
        else:
            p.add_(0.02 * torch.randn_like(p))
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
config = {
    "architecture": arch,
    "num_classes": 5,
    "num_features": model.num_features,
    "global_pool": getattr(model, "global_pool", None),
    "pretrained_cfg": {"input_size": [3, size, size]},
}
(out / "config.json").write_text(json.dumps(config))
ph, pw = model.patch_embed.patch_size
results = {}
for name, (h, w) in (("native", (size, size)), ("other", (size + ph, size + 2 * pw))):
    x = np.random.default_rng(0).uniform(-1, 1, (2, h, w, 3)).astype(np.float32)
    with torch.no_grad():
        t = torch.from_numpy(x).permute(0, 3, 1, 2)
        features = model.forward_features(t)
        pooled = model.forward_head(features, pre_logits=True)
        logits = model(t)
        if isinstance(logits, tuple):
            logits = logits[0]
    results[f"{name}_x"], results[f"{name}_pooled"] = x, pooled.numpy()
    results[f"{name}_logits"] = logits.numpy()
np.savez(out / "timm.npz", **results)
"""


def _compare(timm_python: str, arch: str, size: int, kwargs: dict) -> list[dict]:
    """One row per input size (native, then the non-square one)."""
    from vit_jax import inference

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = pathlib.Path(tmp)
        subprocess.run(
            [timm_python, "-c", _TIMM_SIDE, arch, str(size), tmp, json.dumps(kwargs)], check=True
        )
        ref = dict(np.load(d / "timm.npz"))
        trained = inference.load_model(str(d / "model.safetensors"))
        for name in ("native", "other"):
            x = ref[f"{name}_x"]
            logits = trained.logits(x)
            pooled = trained.intermediates(x)["pre_logits"]
            if pooled.ndim == 3:  # a distillation token: timm's pre-logits are the two's mean
                pooled = pooled.mean(axis=1)
            rows.append(
                {
                    "arch": arch + "".join(f" {k}={v}" for k, v in kwargs.items()),
                    "input": "x".join(map(str, x.shape[1:3])),
                    "gelu_approximate": bool(trained.model_config.gelu_approximate),
                    "classifier": trained.model_config.classifier,
                    "resample": trained.model_config.posemb_resample,
                    "max_abs_logits": float(np.abs(ref[f"{name}_logits"]).max()),
                    "logits_diff": float(np.abs(logits - ref[f"{name}_logits"]).max()),
                    "pooled_diff": float(np.abs(pooled - ref[f"{name}_pooled"]).max()),
                }
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timm-python", required=True, help="a Python with timm installed")
    names = ", ".join(sorted({a[0] for a in ARCHS}))
    p.add_argument("--archs", help="comma-separated subset of: " + names)
    args = p.parse_args()
    chosen = set(args.archs.split(",")) if args.archs else None
    rows = []
    for arch, size, *kwargs in ARCHS:
        if chosen and arch not in chosen:
            continue
        try:
            got = _compare(args.timm_python, arch, size, kwargs[0] if kwargs else {})
        except Exception as e:  # report and go on: one table of every architecture
            got = [{"arch": arch, "input": size, "error": f"{type(e).__name__}: {e}"}]
        for row in got:
            print(json.dumps(row), file=sys.stderr, flush=True)
        rows.extend(got)
    print(
        "| timm architecture (2 blocks) | input | GELU | pooling | max abs logit | logits diff "
        "| pooled diff |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| `{r['arch']}` | {r['input']} | | | | error: {r['error'][:80]} | |")
            continue
        gelu = "tanh" if r["gelu_approximate"] else "exact"
        print(
            f"| `{r['arch']}` | {r['input']} | {gelu} | {r['classifier']} | "
            f"{r['max_abs_logits']:.3g} | {r['logits_diff']:.2g} | {r['pooled_diff']:.2g} |"
        )


if __name__ == "__main__":
    main()
