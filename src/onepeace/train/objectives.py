"""Pretraining objectives: the model, the decoder and the losses of one stage (spec §5.1-5.3).

Stage 1 (image-text): ``ITC + w_text DCL_L + w_image DCL_V + w_vl_text DCL_VL_text + w_vl_image DCL_VL_image``.
Stage 2 (audio-text): ``ATC + w_audio DCL_A + w_al_text DCL_AL_text + w_al_audio DCL_AL_audio``; the audio-only
denoising target is the audio segment of the unmasked joint audio-text pass, as in the official code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from onepeace.data.batch import MaskedView, PretrainBatch
from onepeace.losses.contrastive import contrastive_loss
from onepeace.losses.denoising import denoising_loss
from onepeace.losses.named import NamedLosses
from onepeace.modality import Modality
from onepeace.model import OnePeaceModel
from onepeace.model.decoder import DecoderInput, PretrainDecoder
from onepeace.model.outputs import Features
from onepeace.train.config import LossConfig

T, IMG, A = Modality.TEXT, Modality.IMAGE, Modality.AUDIO


class PretrainObjective(nn.Module):
    """Backbone + decoder + losses for one pretraining stage; ``forward(batch)`` returns the named losses."""

    def __init__(
        self,
        model: OnePeaceModel,
        decoder: PretrainDecoder,
        stage: int,
        weights: LossConfig | None = None,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
        rank: int = 0,
    ) -> None:
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 (image-text) or 2 (audio-text), got {stage!r}")
        self.model = model
        self.decoder = decoder
        self.stage = stage
        self.weights = weights or LossConfig()
        self.gather = gather
        self.rank = rank

    def forward(self, batch: PretrainBatch) -> NamedLosses:
        if self.stage == 1:
            return self._stage1(batch)
        with self.model.adapters[A].sharing_frame_features():  # four passes over one waveform batch
            return self._stage2(batch)

    # ------------------------------------------------------------------------------------------------ pieces
    def _student(
        self, inputs: dict[Modality, object], keep: dict[Modality, torch.Tensor], padding: dict[Modality, torch.Tensor]
    ) -> dict[Modality, torch.Tensor]:
        """Masked pass: encoder on kept units, decoder back to full length: ``{m: [B, S_m, D]}``."""
        feats = self.model.forward_features(**{m.value: x for m, x in inputs.items()}, keep=keep, check_values=False)
        return self.decoder({m: DecoderInput(feats[m].hidden, keep[m], padding[m]) for m in keep})

    def _dcl(self, student: torch.Tensor, teacher: torch.Tensor, view: MaskedView, padding, num_keys: int | None):
        """Denoising loss of one view; the host-side counts of the batch keep it free of host syncs."""
        w = self.weights
        return denoising_loss(
            student,
            teacher.detach(),
            view.mask,
            padding,
            w.dcl_logit_scale,
            w.label_smoothing,
            view.num_masked,
            num_keys,
        )

    def _features(self, **inputs) -> Features:
        """An unmasked pass over a batch the data layer built (no host-side value checks)."""
        return self.model.forward_features(**inputs, check_values=False)

    def _contrastive(self, other: torch.Tensor, text: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        scale = self.model.logit_scale_exp()
        out = contrastive_loss(other, text, scale, self.gather, self.rank)
        return {
            f"{prefix}_loss": out.loss,
            f"{prefix[0]}2t_ncorrect": out.a2b_correct,
            f"t2{prefix[0]}_ncorrect": out.b2a_correct,
            "logit_scale_exp": scale.detach(),
        }

    # ------------------------------------------------------------------------------------------------ stages
    def _stage1(self, batch: PretrainBatch) -> NamedLosses:
        if batch.image is None:
            raise ValueError("stage 1 needs images in the batch")
        v, w = batch.views, self.weights
        text = self._features(text=batch.text).text
        image = self._features(image=batch.image).image
        itc = self._contrastive(self.model.project(IMG, image.hidden), self.model.project(T, text.hidden), "itc")
        with torch.no_grad():
            joint = self._features(text=batch.text, image=batch.image)
        tpad, ipad = text.padding_mask, image.padding_mask
        s_text = self._student({T: batch.text}, {T: v["text"].keep}, {T: tpad})[T]
        s_image = self._student({IMG: batch.image}, {IMG: v["image"].keep}, {IMG: ipad})[IMG]
        s_vl = self._student(
            {T: batch.text, IMG: batch.image}, {T: v["vl_text"].keep, IMG: v["vl_image"].keep}, {T: tpad, IMG: ipad}
        )
        terms = {
            "itc_loss": itc.pop("itc_loss"),
            "dcl_text_loss": self._dcl(s_text, text.hidden, v["text"], tpad, batch.num_text_tokens),
            "dcl_image_loss": self._dcl(s_image, image.hidden, v["image"], None, None),
            "dcl_vl_text_loss": self._dcl(s_vl[T], joint.text.hidden, v["vl_text"], tpad, batch.num_text_tokens),
            "dcl_vl_image_loss": self._dcl(s_vl[IMG], joint.image.hidden, v["vl_image"], None, None),
        }
        weighted = {
            "dcl_text_loss": w.dcl_text,
            "dcl_image_loss": w.dcl_image,
            "dcl_vl_text_loss": w.dcl_vl_text,
            "dcl_vl_image_loss": w.dcl_vl_image,
        }
        return NamedLosses.weighted(terms, weighted, itc)

    def _stage2(self, batch: PretrainBatch) -> NamedLosses:
        if batch.audio is None:
            raise ValueError("stage 2 needs audio in the batch")
        v, w = batch.views, self.weights
        with torch.no_grad():  # the text branch is frozen in stage 2
            text = self._features(text=batch.text).text
            text_emb = self.model.project(T, text.hidden)
            joint = self._features(text=batch.text, audio=batch.audio)
        audio = self._features(audio=batch.audio).audio
        atc = self._contrastive(self.model.project(A, audio.hidden), text_emb, "atc")
        tpad, apad = text.padding_mask, audio.padding_mask
        s_audio = self._student({A: batch.audio}, {A: v["audio"].keep}, {A: apad})[A]
        s_al = self._student(
            {T: batch.text, A: batch.audio}, {T: v["al_text"].keep, A: v["al_audio"].keep}, {T: tpad, A: apad}
        )
        terms = {
            "atc_loss": atc.pop("atc_loss"),
            "dcl_audio_loss": self._dcl(s_audio, joint.audio.hidden, v["audio"], apad, batch.num_audio_frames),
            "dcl_al_text_loss": self._dcl(s_al[T], joint.text.hidden, v["al_text"], tpad, batch.num_text_tokens),
            "dcl_al_audio_loss": self._dcl(s_al[A], joint.audio.hidden, v["al_audio"], apad, batch.num_audio_frames),
        }
        weighted = {
            "dcl_audio_loss": w.dcl_audio,
            "dcl_al_text_loss": w.dcl_al_text,
            "dcl_al_audio_loss": w.dcl_al_audio,
        }
        return NamedLosses.weighted(terms, weighted, atc)
