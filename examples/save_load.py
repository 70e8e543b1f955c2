"""Save a model's state with ckptio, load it back with ckptio and with plain
torch.load, and show what each took.

    python examples/save_load.py

The file goes into a temporary directory under the current one, removed at
the end. Both loads read a file the save has just written, so it is likely
still in the page cache: for cold-cache numbers on your disk, see
`ckptio bench`.
"""

import os
import tempfile
import time

import torch

import ckptio


def main():
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 1024))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(8, 1024)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1}

    with tempfile.TemporaryDirectory(dir=os.getcwd()) as d:
        path = os.path.join(d, "step_1.pt")
        t = time.perf_counter()
        result = ckptio.save(state, path)
        print(f"ckptio.save: {result.bytes / 2**20:.1f} MiB durable in {(time.perf_counter() - t) * 1e3:.1f} ms, "
              f"of which the engine's write {result.write_seconds * 1e3:.1f} ms (O_DIRECT: {result.direct_io})")
        t = time.perf_counter()
        loaded = ckptio.load(path)
        print(f"ckptio.load (CRC-32 verified): {(time.perf_counter() - t) * 1e3:.1f} ms")
        t = time.perf_counter()
        plain = torch.load(path, weights_only=True)
        print(f"torch.load (nothing verified): {(time.perf_counter() - t) * 1e3:.1f} ms")
        same = all(torch.equal(loaded["model"][k], plain["model"][k]) and torch.equal(plain["model"][k], v)
                   for k, v in state["model"].items())
        print(f"plain torch.load reads the same tensors: {same}")
        verified = ckptio.verify(path)
        print(f"ckptio.verify: {verified.records} records, every CRC-32 intact")


if __name__ == "__main__":
    main()
