"""A plain training loop with ckptio.CheckpointManager: async saves every few
steps, the last three kept, and resume from the newest after a restart.

    python examples/custom_loop.py [DIRECTORY]

With DIRECTORY, the checkpoints are written there and kept; without it, into
a new temporary directory that is removed at the end. Either way the example
prints where it wrote.
"""

import os
import shutil
import sys
import tempfile

import torch

import ckptio


def train(directory, until_step):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with ckptio.CheckpointManager(directory, keep_last=3) as manager:
        start = 0
        if manager.latest() is not None:
            state = manager.load_latest(map_location="cpu")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start = state["step"] + 1
            print(f"resumed from {os.path.basename(manager.latest())}")
        for step in range(start, until_step):
            x, y = torch.randn(32, 256), torch.randint(0, 10, (32,))
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 10 == 0:
                handle = manager.save(step, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                             "step": step})
                print(f"step {step}: loss {loss.item():.3f}, checkpoint stalled {handle.stall_seconds * 1e3:.1f} ms")
    print("kept:", sorted(os.listdir(directory)))


def main():
    keep = len(sys.argv) > 1
    directory = sys.argv[1] if keep else tempfile.mkdtemp(prefix="ckptio-loop-")
    print(f"checkpoints in {directory}" + ("" if keep else " (removed at the end; pass a directory to keep them)"))
    try:
        train(directory, 45)
        train(directory, 70)  # as if the job restarted
    finally:
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
