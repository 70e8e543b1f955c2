"""Seed corpus for the libFuzzer target: small real checkpoints (ckptio's and
torch.save's, ZIP64-free and with many records), one file each."""

import os
import sys

import torch

import ckptio


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    states = {
        "tiny": {"w": torch.arange(4)},
        "mixed": {"a": torch.randn(3, 4), "b": torch.ones(5, dtype=torch.bfloat16), "n": [1, "x", None]},
        "many": {f"t{i}": torch.full((i + 1,), i) for i in range(40)},
        "empty": {"e": torch.empty(0), "s": 3},
    }
    for name, state in states.items():
        ckptio.save(state, os.path.join(out, f"{name}.ckptio"))
        torch.save(state, os.path.join(out, f"{name}.torch"))


if __name__ == "__main__":
    main(sys.argv[1])
