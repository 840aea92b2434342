"""benchmarks/thor_official.py: meddiff UNet weights → the official (MONAI-derived) UNet's names.

The official attention block never applies its output projection; the mapping folds meddiff's
projection into ``to_v``. Checked here against that block's computation, written out (norm,
q/k/v, softmax(q kᵀ / √d) v, + residual), so the test needs neither the official code nor monai.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from meddiff.config.thor import UNetConfig  # noqa: E402
from meddiff.thor.unet import DiffusionUNet  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "thor_official.py"


def _bench():
    spec = importlib.util.spec_from_file_location("thor_official_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cfg(head_channels: int) -> UNetConfig:
    return UNetConfig(
        image_size=16, channels=(8, 16, 16), attention_levels=(False, False, True),
        num_head_channels=head_channels, norm_groups=4,
    )  # fmt: skip


def _official_attention(state, prefix: str, x: torch.Tensor) -> torch.Tensor:
    def lin(name, v):
        return v @ state[f"{prefix}.{name}.weight"].T + state[f"{prefix}.{name}.bias"]

    b, c, h, w = x.shape
    n = torch.nn.functional.group_norm(
        x, 4, state[f"{prefix}.norm.weight"], state[f"{prefix}.norm.bias"], eps=1e-6
    )
    tokens = n.view(b, c, h * w).transpose(1, 2)
    q, k, v = lin("to_q", tokens), lin("to_k", tokens), lin("to_v", tokens)
    attn = (q @ k.transpose(1, 2) / c**0.5).softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(b, c, h, w) + x


def test_mapping_covers_every_weight_and_folds_the_projection():
    bench = _bench()
    cfg = _cfg(head_channels=16)
    torch.manual_seed(0)
    unet = DiffusionUNet(cfg)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.2)  # the zero-initialised projections too
    state = bench.to_official_state(unet.state_dict(), cfg)
    attentions = 4  # down level 2, middle, two up stages of level 2
    assert len(state) == len(unet.state_dict()) + 4 * attentions
    assert not [k for k in state if ".res." in k or "qkv" in k or k.startswith(("down.", "up."))]
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        ours = unet.mid[0].attn(x)
    theirs = _official_attention(state, "middle_block.attention", x)
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())


def test_several_heads_are_refused():
    bench = _bench()
    cfg = _cfg(head_channels=8)
    with pytest.raises(ValueError, match="several heads"):
        bench.to_official_state(DiffusionUNet(cfg).state_dict(), cfg)
