"""timm's ViT timed like `python -m vit_jax.benchmark` (same model, batch, optimizer, dtype).

Runs in its own environment (timm needs torchvision; never import TensorFlow here):

    python3 -m venv /work/timm-venv
    /work/timm-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm
    /work/timm-venv/bin/python benchmarks/timm_bench.py --model vit_base_patch16_224 --batch 16

Train step = forward, cross-entropy, backward, clip grad norm 1.0, SGD momentum 0.9 (the
reference fine-tuning recipe). Prints one JSON object.
"""

import argparse
import json
import statistics
import time

import timm
import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--mode", choices=("train", "infer"), default="train")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    dev = torch.device(args.device)
    model = timm.create_model(
        args.model, pretrained=False, num_classes=1000, img_size=args.resolution
    ).to(dev)
    if args.compile:
        model = torch.compile(model)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=dev)
    y = torch.randint(0, 1000, (args.batch,), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step():
        if args.mode == "train":
            model.train()
            with amp:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        else:
            model.eval()
            with torch.inference_mode(), amp:
                model(x)

    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    st = statistics.median(times)
    print(
        json.dumps(
            {
                "impl": "timm",
                "timm_version": timm.__version__,
                "torch_version": torch.__version__,
                "model": args.model,
                "mode": args.mode,
                "batch": args.batch,
                "dtype": args.dtype,
                "compile": args.compile,
                "img_per_sec": args.batch / st,
                "step_time_s": st,
                "first_step_s": first,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
