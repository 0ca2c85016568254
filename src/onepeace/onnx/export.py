"""Export each modality encoder of a model to one ONNX graph, plus the manifest the runtime reads.

Graphs (B batch, n tokens, S image side, N samples, T frames, D width; every graph ends in the L2 norm):

- ``text.onnx``: ``tokens`` int64 ``[B, n]`` (right-padded with 1) -> ``normalized_embedding`` float32 ``[B, D]``
- ``image.onnx``: ``pixels`` float32 ``[B, 3, S, S]`` -> ``[B, D]``
- ``audio.onnx``: ``waveform`` float32 ``[B, N]``, ``padding_mask`` bool ``[B, T + 1]`` -> ``[B, D]``

B, n, N and T are dynamic. The graphs come from ``torch.export`` (the dynamo exporter): its symbolic shapes carry
the batch, token and sample counts through the relative-position gathers, the -inf padding bias and the strided
audio convolutions, where a traced (TorchScript) export bakes the example's sizes into the bias assembly. The
exported program is decomposed to core ATen ops before translation: the exporter's own SDPA handling fails on
this attention's reshape. Needs torch, onnx and onnxscript (``pip install 'onepeace[onnx]'``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from onepeace.modality import Modality
from onepeace.onnx.manifest import FILES, INPUTS, MANIFEST, OUTPUT, Manifest

OPSET = 18
CHECK_TOLERANCE = 1e-4


class ModalityEncoder(nn.Module):
    """One modality's unimodal path (adapter -> fusion encoder -> projection -> L2 norm) with tensor inputs only."""

    def __init__(self, model: nn.Module, modality: Modality) -> None:
        super().__init__()
        self.model = model
        self.modality = modality

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: tokens ``[B, n]``, pixels ``[B, 3, S, S]`` or waveform ``[B, N]`` (+ ``padding_mask [B, T + 1]``).

        Returns the normalised embedding ``[B, D]``, as ``OnePeaceModel.encode_<modality>`` gives it.
        """
        inputs = (x,) if padding_mask is None else (x, padding_mask)
        adapted = self.model.adapter(self.modality)(*inputs)
        hidden = self.model.encode_inputs({self.modality: adapted}).segments[self.modality].hidden
        return self.model.project(self.modality, hidden)


def max_audio_samples(cfg: Any) -> int:
    """The most samples an exported audio graph takes: their frames plus cls stay below the relative-position index
    size (the full index size itself would need its own graph branch, so that one length is left out)."""
    low, high = 1, 1 << 26
    while low < high:  # largest N with num_frames(N) + 1 < max_rel_positions
        mid = (low + high + 1) // 2
        low, high = (mid, high) if cfg.num_frames(mid) + 1 < cfg.max_rel_positions else (low, mid - 1)
    return low


def example_inputs(model: nn.Module, modality: Modality, lengths: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Random model-ready inputs of ``len(lengths)`` items: token counts (text) or sample counts (audio)."""
    from onepeace.data.audio import collate_audio

    cfg = model.cfg
    gen = torch.Generator().manual_seed(sum(lengths))
    batch = len(lengths)
    if modality is Modality.TEXT:
        tokens = torch.randint(4, cfg.text.vocab_size, (batch, max(lengths)), generator=gen)
        for row, n in enumerate(lengths):
            tokens[row, n - 1] = 2  # eos, then padding
            tokens[row, n:] = cfg.text.pad_id
        return (tokens,)
    if modality is Modality.IMAGE:
        return (torch.randn(batch, 3, cfg.image.image_size, cfg.image.image_size, generator=gen),)
    waves = [torch.randn(n, generator=gen).numpy() for n in lengths]
    return collate_audio(waves, cfg.audio)


def _dynamic_shapes(model: nn.Module, modality: Modality) -> dict[str, Any]:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=4096)
    if modality is Modality.TEXT:
        length = model.adapter(modality).max_length
        return {"x": {0: batch, 1: Dim("tokens", min=1, max=length)}}
    if modality is Modality.IMAGE:
        return {"x": {0: batch}}
    acfg = model.cfg.audio
    samples = Dim("samples", min=int(acfg.sample_rate) // 2, max=max_audio_samples(acfg))
    return {"x": {0: batch, 1: samples}, "padding_mask": {0: batch, 1: Dim.AUTO}}


def _example_lengths(model: nn.Module, modality: Modality) -> tuple[int, ...]:
    if modality is Modality.AUDIO:
        rate = int(model.cfg.audio.sample_rate)
        return (rate, rate * 3 // 2, rate * 2)
    return (5, 9, 12)


def _check_lengths(model: nn.Module, modality: Modality) -> tuple[int, ...]:
    """Sizes unlike the example's, to check that nothing of the example was baked into the graph."""
    if modality is Modality.AUDIO:
        rate = int(model.cfg.audio.sample_rate)
        return (rate * 5 // 2, rate + 123)
    return (17, 3)


def _name_dims(proto: Any, names: dict[str, tuple[str | None, ...]]) -> None:
    """Give the inputs' and output's symbolic dims readable names (``batch``, ``tokens``, ``samples``, ``frames``)."""
    rename: dict[str, str] = {}
    for value in proto.graph.input:
        for dim, name in zip(value.type.tensor_type.shape.dim, names[value.name]):
            if name is not None and dim.dim_param:
                rename[dim.dim_param] = name
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


_DIM_NAMES = {
    "tokens": ("batch", "tokens"),
    "pixels": ("batch", None, None, None),
    "waveform": ("batch", "samples"),
    "padding_mask": ("batch", "frames"),
}


def export_encoder(model: nn.Module, modality: Modality, path: Path, opset: int = OPSET) -> Path:
    """Write the ONNX graph of one modality encoder of ``model`` (an ``OnePeaceModel`` in eval mode) to ``path``."""
    encoder = ModalityEncoder(model, modality).eval()
    args = example_inputs(model, modality, _example_lengths(model, modality))
    kwargs = dict(zip(("x", "padding_mask"), args))
    with torch.no_grad():
        program = torch.export.export(
            encoder, (), kwargs, dynamic_shapes=_dynamic_shapes(model, modality), strict=False
        ).run_decompositions()
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1_500_000_000
    onnx_program = torch.onnx.export(
        program,
        (),
        kwargs=kwargs,
        input_names=list(INPUTS[modality]),
        output_names=[OUTPUT],
        opset_version=opset,
        dynamo=True,
        external_data=big,
        verbose=False,
    )
    onnx_program.save(str(path), external_data=big)
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    _name_dims(proto, {**_DIM_NAMES, OUTPUT: ("batch", None)})
    onnx.save(proto, str(path))
    return path


def check_encoder(model: nn.Module, modality: Modality, path: Path, threads: int = 1) -> float:
    """Max abs difference of onnxruntime on ``path`` to eager, on a batch shaped unlike the export example."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    args = example_inputs(model, modality, _check_lengths(model, modality))
    with torch.no_grad():
        expected = ModalityEncoder(model, modality)(*args).numpy()
    got = session.run([OUTPUT], {name: a.numpy() for name, a in zip(INPUTS[modality], args)})[0]
    return float(np.abs(got - expected).max())


def export_onnx(
    source: Any, out_dir: str | Path, *, opset: int = OPSET, image_size: int | None = None, check: bool = True
) -> Manifest:
    """Export every modality encoder of ``source`` (whatever :func:`onepeace.load` accepts, or a loaded model).

    Writes ``text.onnx`` / ``image.onnx`` / ``audio.onnx`` (those the model has) and ``onepeace_onnx.json`` into
    ``out_dir``; with ``check`` each graph is run once with onnxruntime against eager on other batch and length
    sizes than the export example, and a difference above 1e-4 raises ``ValueError``. Returns the manifest.
    """
    import onepeace
    from onepeace.errors import require

    require("onnx", "onnx")
    require("onnxscript", "onnx")
    if check:
        require("onnxruntime", "onnx")
    if isinstance(source, nn.Module):
        model = getattr(source, "model", source).eval()
        if model.logit_scale.dtype != torch.float32:
            raise ValueError(f"export needs a float32 model, this one is {model.logit_scale.dtype}; load it in fp32")
    else:
        model = onepeace.load(source, image_size=image_size, dtype="float32").model
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    checks: dict[str, float] = {}
    for modality in model.modalities:
        path = export_encoder(model, modality, out / FILES[modality], opset)
        if check:
            checks[modality.value] = diff = check_encoder(model, modality, path)
            if not diff <= CHECK_TOLERANCE:
                raise ValueError(f"{path.name}: onnxruntime differs from eager by {diff:.3g} (> {CHECK_TOLERANCE})")
    manifest = Manifest.build(model.cfg, opset, str(source) if not isinstance(source, nn.Module) else None, checks)
    (out / MANIFEST).write_text(json.dumps(dataclasses.asdict(manifest), indent=2) + "\n")
    return manifest
