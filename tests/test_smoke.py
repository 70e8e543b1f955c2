import torch

import ckptio


def test_round_trip_through_plain_torch_load(tmp_path):
    state = {"w": torch.randn(64, 64), "step": 3}
    ckptio.save(state, tmp_path / "c.pt")
    out = torch.load(tmp_path / "c.pt", weights_only=True)
    assert torch.equal(out["w"], state["w"]) and out["step"] == 3
