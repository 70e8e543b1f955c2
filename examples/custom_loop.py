"""A plain training loop with ckptio.CheckpointManager: async saves every few
steps, the last three kept, and resume from the newest after a restart."""

import os
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


if __name__ == "__main__":
    directory = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="ckptio-loop-")
    train(directory, 45)
    train(directory, 70)  # as if the job restarted
