"""FSDP2 mixed precision from a recipe, and process-group hygiene (timeout, device_id)."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torchrun import launch

from onepeace.train import distributed as D
from onepeace.train.config import TrainConfig, parse_recipe

HERE = Path(__file__).parent


@pytest.mark.dist
def test_fsdp_bf16_policy_runs_both_stages_with_bf16_gathered_parameters(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ONEPEACE_DIST_TIMEOUT", "123")
    launch([str(HERE / "dist_speed_worker.py"), str(tmp_path)], timeout=300, cwd=HERE)
    for rank in (0, 1):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert out["timeout"].item() == 123.0
        for stage, terms in ((1, 5), (2, 4)):
            losses = {k: v for k, v in out.items() if k.startswith(f"{stage}.term.")}
            assert len(losses) == terms
            for name, value in [(f"{stage}.total", out[f"{stage}.total"]), *losses.items()]:
                assert math.isfinite(value.item()) and value.item() > 0, name
            watched = [k for k in out if k.startswith(f"{stage}.seen.")]
            assert len(watched) == 3
            for name in watched:  # every forward of the module saw its weight all-gathered in bf16
                assert len(out[name]) >= 1 and out[name].tolist() == [16] * len(out[name]), name
            assert out[f"{stage}.grad_dtype"].tolist() == [32]  # sharded gradients stay fp32 (reduce_dtype)


def test_wrap_kwargs_map_precision_and_fsdp_dtypes() -> None:
    bf16, fp32 = torch.bfloat16, torch.float32
    assert D.wrap_kwargs(TrainConfig(precision="bf16")) == {
        "param_dtype": bf16,
        "reduce_dtype": fp32,
        "find_unused_parameters": False,
    }
    assert D.wrap_kwargs(TrainConfig(precision="fp32"))["param_dtype"] is None  # stored fp32 kept
    cfg = TrainConfig(precision="fp32", fsdp_param_dtype="bf16", fsdp_reduce_dtype="bf16", find_unused_parameters=True)
    assert D.wrap_kwargs(cfg) == {"param_dtype": bf16, "reduce_dtype": bf16, "find_unused_parameters": True}
    assert D.wrap_kwargs(TrainConfig(precision="bf16", fsdp_param_dtype="fp32"))["param_dtype"] is None
    with pytest.raises(ValueError, match="fsdp_param_dtype must be one of auto, fp32, bf16, got 'fp16'"):
        D.mixed_precision_kwargs("bf16", "fp16")


def test_recipe_fields_are_strict() -> None:
    base = "optim: {total_updates: 1}\n"
    cfg = parse_recipe(base + "fsdp_param_dtype: bf16\nfsdp_reduce_dtype: bf16\ncompile: true\n")
    assert (cfg.fsdp_param_dtype, cfg.fsdp_reduce_dtype, cfg.compile) == ("bf16", "bf16", True)
    with pytest.raises(ValueError, match="fsdp_param_dtype must be one of 'auto', 'fp32', 'bf16'; got 'float16'"):
        parse_recipe(base + "fsdp_param_dtype: float16\n")
    with pytest.raises(ValueError, match="fsdp_reduce_dtype must be 'fp32' or 'bf16', got 'fp16'"):
        TrainConfig(fsdp_reduce_dtype="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="compile must be a boolean"):
        parse_recipe(base + "compile: 1\n")


def test_finetune_recipe_fields_are_strict() -> None:
    from onepeace.finetune.config import FinetuneConfig, parse_finetune_recipe

    text = "task: vggsound\noptim: {total_updates: 1}\nfsdp_reduce_dtype: bf16\ncompile: true\n"
    cfg = parse_finetune_recipe(text)
    assert D.wrap_kwargs(cfg)["reduce_dtype"] is torch.bfloat16 and cfg.compile is True
    with pytest.raises(ValueError, match="fsdp_param_dtype must be 'auto', 'fp32' or 'bf16', got 'half'"):
        FinetuneConfig(fsdp_param_dtype="half")  # type: ignore[arg-type]


def test_init_process_group_gets_the_timeout(monkeypatch) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ONEPEACE_DIST_TIMEOUT", raising=False)
    D.init_distributed("gloo")
    D.init_distributed("gloo", timeout=90)
    monkeypatch.setenv("ONEPEACE_DIST_TIMEOUT", "45.5")
    D.init_distributed("gloo")
    assert [c["timeout"] for c in calls] == [timedelta(minutes=30), timedelta(seconds=90), timedelta(seconds=45.5)]
    assert all(c["device_id"] is None and c["backend"] == "gloo" for c in calls)  # device_id is for CUDA only
    monkeypatch.setenv("ONEPEACE_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="ONEPEACE_DIST_TIMEOUT must be a number of seconds, got 'soon'"):
        D.init_distributed("gloo")
    with pytest.raises(ValueError, match="timeout must be a positive, finite number of seconds, got -1"):
        D.dist_timeout(-1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_init_process_group_binds_the_cuda_device(monkeypatch) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    info = D.init_distributed()
    assert calls[0]["device_id"] == torch.device("cuda", 0) == info.device and calls[0]["backend"] == "nccl"
