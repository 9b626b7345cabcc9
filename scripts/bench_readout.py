"""What cutting the last block to the rows a readout needs saves: the frozen encoder's
prompted pass (forward, and forward + backward to the prompt tokens) with readout
"tokens" (every row), "prompt" (the [CLS] and prompt rows, L2P's head input) and
"pooled" (the rows the pooled feature reads), on a ViT (random weights, 224 px) and on
MiniLM-L6 (FewRel-length sentences, entity pooling). Interleaved rounds, medians:

    python scripts/bench_readout.py                      # CPU, ViT-Ti/16 and MiniLM-L6
    python scripts/bench_readout.py --vit vit_base_patch16_224 --batch-size 8 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from clbench.encoders import Prompt, PromptableEncoder

READOUTS = ("tokens", "prompt", "pooled")


def vit_encoder(name: str) -> tuple[PromptableEncoder, torch.Tensor]:
    import timm

    from clbench.encoders.vit import ViTEncoder

    model = timm.create_model(name, pretrained=False, num_classes=0)
    return ViTEncoder(model), torch.randn(1, 3, 224, 224)


def text_encoder(length: int) -> tuple[PromptableEncoder, torch.Tensor]:
    from clbench.encoders.zoo import TextOptions, minilm_l6

    encoder = minilm_l6(TextOptions())
    words = length - 6
    ids = torch.randint(2000, 20000, (1, length))
    markers = [encoder.marker_ids[m] for m in ("[E11]", "[E12]", "[E21]", "[E22]")]
    ids[0, 0], ids[0, -1] = encoder.tokenizer.cls_token_id, encoder.tokenizer.sep_token_id
    for offset, marker in zip((3, 6, words // 2, words // 2 + 3), markers):
        ids[0, offset] = marker
    return encoder, ids


def timed(step: Callable[[], None], repeats: int) -> float:
    step()  # warm-up
    began = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - began) / repeats * 1000


def measure(name: str, encoder: PromptableEncoder, one: torch.Tensor, args: argparse.Namespace):
    x = one.expand(args.batch_size, *one.shape[1:]).contiguous()
    tokens = 0.02 * torch.randn(args.batch_size, args.prompt_tokens, encoder.embed_dim)
    tokens.requires_grad_(True)

    def forward(readout: str) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad():
                encoder(x, Prompt(tokens=tokens), readout=readout)  # type: ignore[arg-type]

        return step

    def backward(readout: str) -> Callable[[], None]:
        def step() -> None:
            out = encoder(x, Prompt(tokens=tokens), readout=readout)  # type: ignore[arg-type]
            features = out.pooled if readout == "pooled" else out.prompt_token_states().mean(1)
            features.square().sum().backward()

        return step

    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for kind, make in (("forward", forward), ("forward+backward", backward)):
            for readout in READOUTS:
                times.setdefault((kind, readout), []).append(timed(make(readout), args.repeats))
    print(
        f"\n{name}: batch {args.batch_size}, {tuple(x.shape[1:])}, {args.prompt_tokens} prompt tokens"
    )
    for kind in ("forward", "forward+backward"):
        full = statistics.median(times[(kind, "tokens")])
        cells = []
        for readout in READOUTS:
            ms = statistics.median(times[(kind, readout)])
            cells.append(f"{readout} {ms:7.1f} ms ({full / ms:.3f}x)")
        print(f"  {kind:17s} " + "   ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vit", default="vit_tiny_patch16_224")
    parser.add_argument("--text-length", type=int, default=64, help="tokens per sentence")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} thread(s); ratios: 'tokens' time over each readout's")
    measure(args.vit, *vit_encoder(args.vit), args)
    measure("minilm-l6", *text_encoder(args.text_length), args)


if __name__ == "__main__":
    main()
