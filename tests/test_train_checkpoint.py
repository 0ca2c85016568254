"""Training checkpoints (atomic save, exact resume, pruning) and the run's metrics outputs."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import onepeace.train.checkpoint as ckpt
from onepeace.config import TextAdapterConfig
from onepeace.modality import Modality
from onepeace.model.onepeace import OnePeaceModel
from onepeace.train.config import OptimConfig
from onepeace.train.optim import build_optimizer
from onepeace.train.schedule import LRSchedule
from onepeace.train.tracking import MetricsLogger, progress_bar, read_metrics
from onepeace.variants import get_variant

OPTIM = OptimConfig(lr=1e-3, warmup_updates=2, total_updates=20)


class _Trainee(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        text = TextAdapterConfig(vocab_size=64, max_positions=16, bucket_size=8, max_rel_positions=16)
        cfg = get_variant("onepeace-tiny").replace(modalities=(Modality.TEXT,), text=text)
        self.model = OnePeaceModel(cfg)
        self.decoder = nn.ModuleDict({"heads": nn.ModuleDict({"text": nn.Linear(64, 8)})})


def _setup(seed: int) -> tuple[_Trainee, torch.optim.Optimizer, LRSchedule]:
    module = _Trainee(seed)
    optimizer = build_optimizer(module, OPTIM)
    return module, optimizer, LRSchedule(optimizer, OPTIM)


def _train_step(module: nn.Module, optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> None:
    tokens = torch.randint(4, 64, (2, 5))
    hidden = module.model.forward_features(text=tokens).text.hidden
    loss = module.decoder["heads"]["text"](hidden).pow(2).mean() + module.model.encode_text(tokens).sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    schedule.step()


def _draws() -> tuple:
    return torch.rand(4), np.random.rand(4), random.random(), random.gauss(0, 1), np.random.randn(2)


def _save(run: Path, step: int, parts: tuple, **kwargs) -> Path:
    module, optimizer, schedule = parts
    position = {"epoch": 0, "batch": step}
    return ckpt.save_training_state(
        run, step, module, optimizer, schedule, None, position, "stage: 1\n", {"note": "x"}, **kwargs
    )


def test_save_load_restores_weights_optimizer_schedule_and_rng(tmp_path: Path) -> None:
    parts = _setup(0)
    _train_step(*parts)
    _train_step(*parts)
    random.gauss(0, 1)
    np.random.randn()  # leave cached Gaussians in both generators
    step_dir = _save(tmp_path, 2, parts)
    expected = _draws()
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    fresh = _setup(1)
    info = ckpt.load_training_state(tmp_path, *fresh)
    assert info["step"] == 2 and info["path"] == step_dir and info["data_position"] == {"epoch": 0, "batch": 2}
    assert info["extra"] == {"note": "x"} and info["config_yaml"] == "stage: 1\n"
    for a, b in zip(_draws(), expected):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    src, dst = parts[0].state_dict(), fresh[0].state_dict()
    assert all(torch.equal(src[k], dst[k]) for k in src)
    assert fresh[2].step_count == 2 and fresh[1].param_groups[0]["lr"] == parts[1].param_groups[0]["lr"]
    pairs = [
        (a, b)
        for ga, gb in zip(parts[1].param_groups, fresh[1].param_groups)
        for a, b in zip(ga["params"], gb["params"])
    ]
    assert sum(a in parts[1].state for a, _ in pairs) > 10
    for a, b in pairs:
        assert set(parts[1].state.get(a, {})) == set(fresh[1].state.get(b, {}))
        for key, value in parts[1].state.get(a, {}).items():
            assert torch.equal(value, fresh[1].state[b][key])
    # Continuing both runs gives identical weights.
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    state = ckpt.capture_rng_state()
    _train_step(*parts)
    ckpt.restore_rng_state(state)
    _train_step(*fresh)
    assert all(torch.equal(a, b) for a, b in zip(parts[0].parameters(), fresh[0].parameters()))


def test_trainer_file_loads_weights_only(tmp_path: Path) -> None:
    parts = _setup(0)
    _train_step(*parts)
    step_dir = _save(tmp_path, 1, parts)
    trainer = torch.load(step_dir / ckpt.TRAINER, weights_only=True)
    assert set(trainer) == {"step", "optimizer", "schedule", "rng", "data_position", "extra"}
    assert trainer["optimizer"]["param_groups"][0]["param_names"][0].startswith(("model.", "decoder."))
    with pytest.raises(TypeError, match="data_position"):
        ckpt.save_training_state(tmp_path, 2, *parts, data_position={"rng": np.random.default_rng()})


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = _setup(0)
    first = _save(tmp_path, 1, parts)
    before = {k: v.clone() for k, v in parts[0].state_dict().items()}
    _train_step(*parts)

    def crash(tmp: Path, final: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_publish", crash)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2, parts)
    monkeypatch.undo()
    assert not (tmp_path / "step_00000002").exists()
    assert ckpt.latest_checkpoint(tmp_path) == first
    (tmp_path / ".tmp-stale").mkdir()  # what a killed process leaves behind
    (tmp_path / ".tmp-stale" / ckpt.WEIGHTS).write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path) == first
    fresh = _setup(1)
    assert ckpt.load_training_state(tmp_path, *fresh)["step"] == 1
    assert all(torch.equal(before[k], v) for k, v in fresh[0].state_dict().items())
    _save(tmp_path, 3, parts)
    assert not (tmp_path / ".tmp-stale").exists()


def test_keep_last_pruning_and_pointer_fallback(tmp_path: Path) -> None:
    parts = _setup(0)
    for step in range(1, 6):
        _save(tmp_path, step, parts, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000004", "step_00000005"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000005"
    _save(tmp_path, 5, parts, keep_last=2)  # saving the same step again replaces it
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_00000005"
    (tmp_path / "latest").write_text("step_00000009\n")
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_00000005"
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None
    with pytest.raises(ValueError, match="no complete training checkpoint"):
        ckpt.load_training_state(tmp_path / "missing", parts[0])


def test_single_file_directory_of_the_earlier_layout_still_counts(tmp_path: Path) -> None:
    """Step directories written before the COMPLETE marker existed (renamed into place whole) stay resumable and
    usable as a starting point; a directory holding only part of the single-file layout does not count."""
    parts = _setup(0)
    _train_step(*parts)
    first = _save(tmp_path, 1, parts)
    _train_step(*parts)
    second = _save(tmp_path, 2, parts)
    for step_dir in (first, second):
        (step_dir / ckpt.MARKER).unlink()  # as the earlier release wrote them
    assert ckpt.latest_checkpoint(tmp_path) == second
    fresh = _setup(1)
    state = ckpt.load_training_state(tmp_path, fresh[0], fresh[1], fresh[2])
    assert state["step"] == 2 and state["data_position"] == {"epoch": 0, "batch": 2}
    for key, value in parts[0].state_dict().items():
        assert torch.equal(fresh[0].state_dict()[key], value), key
    (second / ckpt.WEIGHTS).unlink()  # not the whole layout: skipped, the pointer falls back
    assert ckpt.latest_checkpoint(tmp_path) == first


def test_export_inference_weights(tmp_path: Path) -> None:
    import onepeace

    module = _Trainee(0)
    out = ckpt.export_inference_weights(module.model, module.model.cfg, tmp_path / "export")
    loaded = onepeace.load(out)
    assert torch.equal(loaded.model.projections.text.weight, module.model.projections.text.weight)


def test_metrics_jsonl_and_rank_behaviour(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were missing
    with pytest.warns(UserWarning, match="tensorboard"):
        logger = MetricsLogger(tmp_path, rank=0, tensorboard=True)
    with logger:
        logger.log(10, {"loss": torch.tensor(1.5), "itc_loss": 0.25}, lr=1e-4, samples=64, tokens=640, seconds=2.0)
        logger.log(20, {"loss": 1.0}, lr=2e-4, samples=64, tokens=640, seconds=4.0, skipped=3, extra={"epoch": 1})
    first, second = read_metrics(tmp_path / "metrics.jsonl")
    assert first["step"] == 10 and first["loss"] == 1.5 and first["itc_loss"] == 0.25 and first["lr"] == 1e-4
    assert first["samples_per_s"] == 32.0 and first["tokens_per_s"] == 320.0 and first["max_memory_mb"] > 0
    assert second["skipped"] == 3 and second["epoch"] == 1 and second["samples_per_s"] == 16.0
    assert 0.0 <= first["elapsed_s"] <= second["elapsed_s"] < 60.0
    other = MetricsLogger(tmp_path / "rank1", rank=1)
    assert other.log(1, {"loss": 1.0}, 1.0, 1, 1, 1.0) is None and not (tmp_path / "rank1").exists()
    with progress_bar(10, rank=1) as bar:
        bar.update(1)
