import json
import statistics

import pytest
import torch

from qdlm_bench import methods
from qdlm_bench import outliers
from qdlm_bench.models import DLLMConfig, DiffusionLM
from qdlm_bench.quant import QuantSpec

MASK, CHANNEL, L = 63, 5, 24
RATIOS = [0.0, 0.5, 1.0]


def tiny_model() -> DiffusionLM:
    torch.manual_seed(0)
    cfg = DLLMConfig(family="llada", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64,
                     mask_token_id=MASK, eos_token_id=62, pad_token_id=62)
    return DiffusionLM(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 62, (6, L), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def injected(ids):
    """Block 0's attention norm scales CHANNEL by 50: an outlier channel at the q/k/v input."""
    model = tiny_model()
    with torch.no_grad():
        model.blocks[0].attn_norm.weight[CHANNEL] = 50.0
    return outliers.collect(model, ids, RATIOS, batch_size=4)


def test_input_stats_match_direct_computation():
    x = torch.randn(50, 8, dtype=torch.float64) * torch.arange(1, 9)
    stats = outliers.InputStats(8, outlier_factor=4.0)
    stats.add(x[:20])
    stats.add(x[20:])
    flat = x.flatten()
    centered = flat - flat.mean()
    assert stats.kurtosis == pytest.approx(float(centered.pow(4).mean() / centered.pow(2).mean() ** 2), rel=1e-6)
    assert stats.max_abs == pytest.approx(float(x.abs().max()))
    assert stats.top_channels(3) == x.abs().amax(0).topk(3).indices.tolist()
    share = float((x.abs().amax(-1) > 4.0 * x.abs().median(-1).values).double().mean())
    assert 0 < stats.outlier_share == pytest.approx(share)
    part = outliers.InputStats(8, 4.0)
    part.add(x[:20])
    assert part.merge(outliers.InputStats(8, 4.0)).tokens == 20


def test_injected_outlier_channel_is_found(injected):
    per_layer = outliers.pooled(injected)
    for kind in ("q_proj", "k_proj", "v_proj"):
        stats = per_layer[f"blocks.0.{kind}"]
        assert stats.top_channels(1) == [CHANNEL]
        assert stats.outlier_share > 0.5
    assert per_layer["blocks.1.q_proj"].outlier_share < 0.1  # a plain RMS-normed input
    fed = {f"blocks.0.{kind}" for kind in ("q_proj", "k_proj", "v_proj")}
    others = [s.kurtosis for name, s in per_layer.items() if name not in fed]
    assert per_layer["blocks.0.q_proj"].kurtosis > 10 * statistics.median(others)
    assert per_layer["blocks.0.q_proj"].kurtosis > 30  # a Gaussian has 3


def test_masked_and_unmasked_tokens_add_up(injected, ids):
    n, length = ids.shape
    for ratio in RATIOS:
        for name, groups in injected[ratio].items():
            assert groups["masked"].tokens == n * round(ratio * length), (ratio, name)
            assert groups["masked"].tokens + groups["unmasked"].tokens == n * length
    assert outliers.pooled(injected)["blocks.1.down_proj"].tokens == n * length * len(RATIOS)
    half = outliers.pooled(injected, ratios=[0.5], groups=["masked"])["blocks.0.q_proj"]
    assert half.tokens == n * length // 2


def test_masked_tokens_are_the_model_mask_token(ids):
    masked_ids, masked = outliers.masked_windows(ids, 0.5, MASK)
    assert (masked_ids[masked] == MASK).all() and (masked_ids[~masked] == ids[~masked]).all()
    assert masked.sum(1).tolist() == [L // 2] * len(ids)


class Scale(torch.nn.Module):
    def forward(self, x):
        return 10 * x


def test_hooks_read_the_input_after_an_online_transform_and_are_removed(ids):
    model = tiny_model()
    methods.get("rtn")(model, QuantSpec.parse("w4a8"), None, {})
    before = outliers.pooled(outliers.collect(model, ids, [0.5]))["blocks.1.o_proj"].max_abs
    model.blocks[1].o_proj.input_transform = Scale()  # what a rotation method installs
    after = outliers.pooled(outliers.collect(model, ids, [0.5]))
    assert len(after) == 14 and after["blocks.1.o_proj"].max_abs == pytest.approx(10 * before, rel=1e-5)
    assert all(not m._forward_pre_hooks for m in model.modules())
    magnitude = outliers.capture(model, ids[0], ["blocks.1.o_proj"])["blocks.1.o_proj"]
    assert magnitude.shape == (L, 32) and (magnitude >= 0).all()
    with pytest.raises(ValueError, match="mask ratios"):
        outliers.collect(model, ids, [0.5, 2])


def test_cli_before_after_writes_stats_and_plots(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the calibration cache goes here
    out = tmp_path / "out"
    assert outliers.main(["model=tiny_random_llada", "calib.n_samples=2", "calib.seqlen=32", "method=rtn",
                          "bits=w4a4", "ratios=[0,0.5,1]", "layers=[blocks.0.q_proj]", f"out={out}"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["models"]) == {"fp", "rtn w4a4"}
    layer = stats["models"]["fp"]["blocks.0.q_proj"]
    assert len(stats["models"]["rtn w4a4"]) == 14 and layer["all"]["tokens"] == 2 * 32 * 3
    assert layer["by_ratio"]["0.5"]["masked"]["tokens"] == 32 and layer["by_ratio"]["0.0"]["masked"]["max_abs"] is None
    assert "| blocks.1.down_proj" in (out / "summary.md").read_text()
    names = ["layer_max", "mask_ratio-fp", "mask_ratio-rtn_w4a4", "surface-fp-blocks.0.q_proj",
             "surface-rtn_w4a4-blocks.0.q_proj"]
    for name in names:
        for ext in ("png", "pdf"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000, name
    with pytest.raises(SystemExit, match="unknown linear"):
        outliers.main(["model=tiny_random_llada", "layers=[blocks.9.q_proj]", f"out={out}"])
