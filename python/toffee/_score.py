"""``toffee.score``: DINO, CLIP-I and CLIP-T as ``toffee score`` computes them."""

from __future__ import annotations

import os
from typing import Dict, Tuple, Union

from . import _toffee
from ._images import _encoder_image, _score_mask
from ._toffee import ToffeeError

_Path = Union[str, "os.PathLike[str]"]


class Scorer:
    """DINO and CLIP loaded once, as ``toffee score --dino DINO --clip CLIP`` loads them."""

    def __init__(self, dino: _Path, clip: _Path, device: str = "cpu") -> None:
        self._scorer = _toffee.Scorer(os.fspath(dino), os.fspath(clip), device)

    def score(self, subject, target, prompt, subject_mask=None, target_mask=None, batch: int = 16):
        """See :func:`toffee.score`."""
        single = not isinstance(subject, (list, tuple))
        subjects = [subject] if single else list(subject)
        targets = [target] if single else list(target)
        prompts = [prompt] * len(subjects) if isinstance(prompt, str) else list(prompt)

        def per_record(v, what):
            if v is None:
                return [None] * len(subjects)
            return [v] if single else list(v)

        subject_masks = per_record(subject_mask, "subject_mask")
        target_masks = per_record(target_mask, "target_mask")
        lengths = {len(targets), len(prompts), len(subject_masks), len(target_masks)}
        if lengths != {len(subjects)}:
            raise ToffeeError(
                f"{len(subjects)} subjects, {len(targets)} targets, {len(prompts)} prompts, "
                f"{len(subject_masks)} subject masks and {len(target_masks)} target masks: "
                "give one of each per record"
            )
        records = [
            (
                _encoder_image(s, f"subject[{i}]"),
                _encoder_image(t, f"target[{i}]"),
                p,
                _score_mask(sm, f"subject_mask[{i}]"),
                _score_mask(tm, f"target_mask[{i}]"),
            )
            for i, (s, t, p, sm, tm) in enumerate(
                zip(subjects, targets, prompts, subject_masks, target_masks)
            )
        ]
        scores = [
            {"dino": d, "clip_i": ci, "clip_t": ct}
            for d, ci, ct in self._scorer.score(records, batch)
        ]
        return scores[0] if single else scores


_scorers: Dict[Tuple[str, str, str], Scorer] = {}


def score(
    subject,
    target,
    prompt,
    *,
    dino: _Path,
    clip: _Path,
    subject_mask=None,
    target_mask=None,
    device: str = "cpu",
    batch: int = 16,
):
    """DINO, CLIP-I and CLIP-T as ``toffee score`` computes them.

    ``subject`` and ``target`` are each a path, a uint8 array (H, W, 3|4) or a PIL image, or lists
    of them (one record each, with one prompt for all or a list of prompts). Returns a dict
    ``{"dino", "clip_i", "clip_t"}``, or a list of them for lists. The models are loaded once per
    (dino, clip, device) and kept.
    """
    key = (os.fspath(dino), os.fspath(clip), device)
    if key not in _scorers:
        _scorers[key] = Scorer(*key)
    return _scorers[key].score(subject, target, prompt, subject_mask, target_mask, batch)
