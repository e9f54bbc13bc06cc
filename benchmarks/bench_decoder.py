"""Official SAM mask decoder vs GridDecoder on grid point prompts, side by side.

Builds SAM vit_b's prompt encoder and mask decoder (the decoder is the same for every SAM size)
with random weights and a fake (1, 256, 64, 64) image embedding; no image encoder. Repetitions of
the two decoders are interleaved and the median is reported, so that machine noise hits both.

    python benchmarks/bench_decoder.py [--prompts 64 256] [--repeats 5] [--device cuda --dtype bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch.utils.flop_counter import FlopCounterMode

from pro2sam.grid_decoder import GridDecoder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _PromptAndMaskDecoder(torch.nn.Module):
    """The two parts of ``Sam`` that GridDecoder uses."""

    def __init__(self):
        super().__init__()
        self.prompt_encoder = PromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
        )
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        )


def grid_prompts(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    side = int(round(n**0.5))
    xs = (torch.arange(side, device=device) + 0.5) * 1024 / side
    coords = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), dim=-1).reshape(-1, 1, 2)
    coords = torch.cat([coords, coords[: n - len(coords)]])[:n]  # n need not be a square
    return coords, torch.ones(n, 1, dtype=torch.int, device=device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="GridDecoder's prompts per chunk")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--no-flops", action="store_true")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    torch.manual_seed(0)
    model = _PromptAndMaskDecoder().eval().requires_grad_(False).to(device)
    model.mask_decoder.to(dtype)  # the prompt encoder's positional encoding stays float32, as in SAM
    embedding = torch.randn(1, 256, 64, 64, device=device, dtype=dtype)
    decoders = {
        "official": GridDecoder(model, fast=False, batch_size=10**9),
        "fast": GridDecoder(model, fast=True, batch_size=args.batch_size),
    }
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} batch_size={args.batch_size}")

    for n in args.prompts:
        coords, labels = grid_prompts(n, device)
        times = {name: [] for name in decoders}
        outs = {}
        for rep in range(args.repeats + 1):  # the first round warms up
            for name, dec in decoders.items():
                sync(device)
                t0 = time.perf_counter()
                dec.set_image_embedding(embedding)
                outs[name] = dec.decode(coords, labels, multimask_output=True)
                sync(device)
                if rep:
                    times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) for name, t in times.items()}
        err = (outs["fast"][0].float() - outs["official"][0].float()).abs().max().item()
        scale = outs["official"][0].float().abs().max().item()
        iou_err = (outs["fast"][1].float() - outs["official"][1].float()).abs().max().item()
        print(
            f"{n:5d} prompts: official {1e3 * med['official'] / n:8.2f} ms/prompt, "
            f"fast {1e3 * med['fast'] / n:8.2f} ms/prompt (incl. set_image_embedding), "
            f"speedup x{med['official'] / med['fast']:.2f}; "
            f"max |dlogit| {err:.2e} (max |logit| {scale:.2e}), max |dIoU| {iou_err:.2e}"
        )

    if not args.no_flops:
        n = args.prompts[-1]
        coords, labels = grid_prompts(n, device)
        for name, dec in decoders.items():
            with FlopCounterMode(display=False) as fc:
                dec.set_image_embedding(embedding)
                shared = fc.get_total_flops()
                dec.decode(coords, labels, multimask_output=True)
            total = fc.get_total_flops()
            print(
                f"FLOPs {name:8s}: {total / n / 1e9:.3f} GFLOP/prompt at {n} prompts "
                f"(set_image_embedding {shared / 1e9:.3f} GFLOP once, "
                f"per prompt {(total - shared) / n / 1e9:.3f} GFLOP)"
            )


if __name__ == "__main__":
    main()
