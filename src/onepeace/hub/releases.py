"""The checkpoints the ONE-PEACE authors released, by name, with their paths relative to the download host.

``ONE-PEACE``, ``ONE-PEACE_Grounding`` and ``ONE-PEACE_VGGSound`` are the names of the official inference API; the
other fine-tuned files are named after their task in the same style. Every entry here is a fairseq ``.pt`` that
onepeace reads: ``onepeace.load`` for the embedding models (``embed``), a fine-tuning recipe's ``model.init_from`` for
the task models (classification, question answering, grounding). :data:`NOT_LOADABLE` lists the released files of
the separate vision-branch code, whose layout onepeace does not read.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

#: Where the official files are served from; ``ONEPEACE_WEIGHTS_URL`` replaces it with a mirror of the same layout.
OFFICIAL_BASE_URL = "https://one-peace-shanghai.oss-accelerate.aliyuncs.com"


@dataclass(frozen=True)
class Release:
    """One released checkpoint.

    Attributes:
        name: the name ``onepeace.load`` and ``onepeace download`` take.
        path: the file's path relative to the base URL, and to the cache folder.
        description: what the file holds.
        tasks: the fine-tuning tasks (``onepeace.finetune.tasks.TASKS``) the file was trained for.
        embed: True when the file has the projections and logit scale of an embedding (retrieval) model, so
            ``onepeace.load(name)`` gives a model that embeds; False for a classification or grounding model.
    """

    name: str
    path: str
    description: str
    tasks: tuple[str, ...]
    embed: bool


def _ft(name: str, file: str, description: str, task: str, *more: str, embed: bool = False) -> Release:
    return Release(name, f"one_peace_checkpoints/{file}", description, (task, *more), embed)


RELEASES: dict[str, Release] = {
    r.name: r
    for r in (
        Release("ONE-PEACE", "one-peace.pt", "the pretrained 4B model (vision, audio, language)", ("esc50",), True),
        _ft("ONE-PEACE_COCO", "finetune_coco.pt", "image-text retrieval, COCO", "coco_retrieval", embed=True),
        _ft(
            "ONE-PEACE_Flickr30K",
            "finetune_flickr.pt",
            "image-text retrieval, Flickr30K",
            "flickr30k_retrieval",
            embed=True,
        ),
        _ft(
            "ONE-PEACE_AL_Retrieval",
            "finetune_al_retrieval.pt",
            "audio-text retrieval, AudioCaps and Clotho",
            "audiocaps_retrieval",
            "clotho_retrieval",
            embed=True,
        ),
        _ft("ONE-PEACE_VGGSound", "finetune_vggsound.pt", "audio classification, VGGSound (309 classes)", "vggsound"),
        _ft("ONE-PEACE_FSD50K", "finetune_fsd50k.pt", "multi-label audio tagging, FSD50K (200 classes)", "fsd50k"),
        _ft("ONE-PEACE_AQA", "finetune_aqa.pt", "audio question answering", "aqa"),
        _ft("ONE-PEACE_VQA", "finetune_vqa.pt", "visual question answering, VQAv2 (3129 answers)", "vqa"),
        _ft("ONE-PEACE_NLVR2", "finetune_nlvr2.pt", "visual reasoning, NLVR2", "nlvr2"),
        _ft("ONE-PEACE_RefCOCO", "finetune_refcoco.pt", "visual grounding, RefCOCO", "refcoco"),
        _ft("ONE-PEACE_RefCOCO+", "finetune_refcoco+.pt", "visual grounding, RefCOCO+", "refcoco_plus"),
        _ft("ONE-PEACE_Grounding", "finetune_refcocog.pt", "visual grounding, RefCOCOg", "refcocog"),
    )
}
"""Every released checkpoint onepeace can read, by name."""

#: Released files onepeace cannot read yet (path -> what it is): the vision branch converted for the separate
#: detection, segmentation and classification code, in that code's own key layout.
NOT_LOADABLE: dict[str, str] = {
    "one_peace_checkpoints/one-peace-vision.pkl": "the vision branch alone, renamed for the vision-task code",
    "one_peace_checkpoints/onepeace_ft_21kto1k_384.pth": "ImageNet-1k classification at 384 px (vision-branch layout)",
    "one_peace_checkpoints/onepeace_ft_21kto1k_512.pth": "ImageNet-1k classification at 512 px (vision-branch layout)",
    "one_peace_checkpoints/onepeace_det_coco.pth": "COCO detection and instance segmentation (ViTDet layout)",
    "one_peace_checkpoints/onepeace_seg_cocostuff2ade20k.pth": "ADE20K semantic segmentation (ViT-Adapter layout)",
    "one_peace_checkpoints/onepeace_video_k400.pth": "Kinetics-400 action recognition (video layout)",
}


def is_release(name: object) -> bool:
    """True when ``name`` is the name of a released checkpoint onepeace reads."""
    return isinstance(name, str) and name in RELEASES


def get_release(name: str) -> Release:
    """The release called ``name``; a ``ValueError`` names the close matches and ``onepeace download --list``."""
    try:
        return RELEASES[name]
    except KeyError:
        pass
    unreadable = [path for path in NOT_LOADABLE if name in (path, path.rsplit("/", 1)[-1])]
    if unreadable:
        raise ValueError(f"{name} is {NOT_LOADABLE[unreadable[0]]}; onepeace cannot load it yet")
    close = difflib.get_close_matches(name, list(RELEASES), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ValueError(f"unknown checkpoint name {name!r}; {hint}see onepeace download --list")
