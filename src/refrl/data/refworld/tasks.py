"""RefWorld task categories: what references a sample has, its target, prompt and ground truth.

Categories mirror OmniRef-Bench (subject + any of style, background, layout,
lighting; 1-3 subjects) plus ``refine`` (OmniRefiner: [draft, subject] ->
restored image) and ``edit`` (one ``source`` scene + an instruction). Composition
references are shuffled, so "image k" must be read from the prompt.

A task function draws everything from one ``numpy.random.Generator`` in a fixed
order, so a sample is a pure function of the generator's state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refrl.data.refworld import vocab
from refrl.data.refworld.backgrounds import (
    TEXTURE_NAMES,
    Background,
    photo_background,
    plain_background,
    texture_background,
)
from refrl.data.refworld.effects import (
    apply_lighting,
    apply_style,
    layout_reference,
    light_sphere,
    style_chart,
)
from refrl.data.refworld.identities import draw_identities
from refrl.data.refworld.placement import LEVEL_SIZE_WORDS, Placement, place_one, place_subjects
from refrl.data.refworld.render import Box, paint_subject

# Composition categories -> the non-subject reference types they add.
COMPOSITION_EXTRAS: dict[str, tuple[str, ...]] = {
    "subject": (),
    "subject_style": ("style",),
    "subject_bg": ("background",),
    "subject_layout": ("layout",),
    "subject_lighting": ("lighting",),
    "subject_style_bg": ("style", "background"),
    "subject_bg_lighting": ("background", "lighting"),
    "subject_layout_bg": ("layout", "background"),
    "subject_style_bg_lighting": ("style", "background", "lighting"),
    "subject_all": ("style", "background", "layout", "lighting"),
}
CATEGORIES: tuple[str, ...] = (*COMPOSITION_EXTRAS, "refine", "edit")
MAX_SUBJECTS = 3
# Subject references: the subject's box side as a fraction of the canvas.
SUBJECT_REF_SCALE = (0.45, 0.80)
# Background references by level: plain colours until level 2, then textures and photos.
LEVEL_BG_REF_KINDS: dict[int, tuple[str, ...]] = {0: ("plain",), 1: ("plain",), 2: ("texture", "photo")}
REFINE_BG_KINDS: dict[int, tuple[str, ...]] = {0: ("plain",), 1: ("plain",), 2: ("plain", "texture", "photo")}
# Refine drafts (OmniRefiner's "lost detail"): pattern flattened, box blur of this radius
# (per 32 px) around the subject, and a uniform colour shift of at most this much per channel.
DRAFT_BLUR_PER_32PX = 1
DRAFT_COLOUR_SHIFT = 0.08
EDIT_OPS: tuple[str, ...] = ("move", "resize", "background")


def min_references(category: str) -> int:
    """Fewest references a sample of ``category`` can have (one subject)."""
    if category == "refine":
        return 2
    if category == "edit":
        return 1
    return 1 + len(COMPOSITION_EXTRAS[category])


@dataclass
class WorldSpec:
    size: int
    split: str
    level: int
    max_refs: int


@dataclass
class Task:
    """A rendered sample before it becomes a LoadedSample (numpy images, HWC float32)."""

    prompt: str
    ref_images: list[np.ndarray]
    ref_types: list[str]
    target: np.ndarray
    mask: np.ndarray  # (H, W) bool
    subject_masks: np.ndarray  # (S, H, W) bool
    extra: dict[str, Any] = field(default_factory=dict)


def render_scene(background: np.ndarray, identities: list[int], boxes: list[Box], flatten: bool = False):
    """Background + subjects (later ones on top). Returns (image, masks (S, H, W) bool)."""
    image = background.copy()
    masks = np.zeros((len(identities), *background.shape[:2]), dtype=bool)
    for s, (identity, box) in enumerate(zip(identities, boxes, strict=True)):
        masks[s] = paint_subject(image, identity, box, flatten=flatten)
    return image, masks


def subject_reference(rng: np.random.Generator, identity: int, size: int) -> tuple[np.ndarray, Box]:
    """The subject alone on neutral grey at a random scale and offset. Returns (image, box)."""
    side = int(round(rng.uniform(*SUBJECT_REF_SCALE) * size))
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    box = (x0, y0, x0 + side, y0 + side)
    image = np.full((size, size, 3), vocab.NEUTRAL_GREY, dtype=np.float32)
    paint_subject(image, identity, box)
    return image, box


def _pick(rng: np.random.Generator, options) -> Any:
    options = tuple(options)
    return options[int(rng.integers(len(options)))]


def _background(rng: np.random.Generator, size: int, kinds: tuple[str, ...]) -> Background:
    kind = _pick(rng, kinds)
    if kind == "plain":
        return plain_background(size, _pick(rng, vocab.BACKGROUND_COLOURS))
    if kind == "texture":
        return texture_background(size, _pick(rng, TEXTURE_NAMES), rng)
    return photo_background(size, rng)


def _background_truth(bg: Background, ref: int | None) -> dict[str, Any]:
    return {"kind": bg.kind, "ref": ref, "color": list(bg.color) if bg.color else None, "name": bg.name}


def _subject_truth(p: Placement, identity: int, ref: int | None, ref_box: Box | None, box_color=None):
    return {
        "ref": ref, "box": list(p.box), "cell": list(p.cell), "size_word": p.size_word, "identity": identity,
        "ref_box": list(ref_box) if ref_box is not None else None, "box_color": box_color,
    }  # fmt: skip


def _empty_truth(spec: WorldSpec) -> dict[str, Any]:
    return {
        "size": spec.size, "level": spec.level, "subjects": [], "background": None, "style": None,
        "lighting": None, "layout_ref": None, "draft_ref": None, "source_ref": None,
    }  # fmt: skip


def composition_task(rng: np.random.Generator, spec: WorldSpec, category: str) -> Task:
    """1-3 subjects placed by cell + size words (or by layout boxes), plus the category's extra references."""
    extras = COMPOSITION_EXTRAS[category]
    n_subjects = int(rng.integers(1, min(MAX_SUBJECTS, spec.max_refs - len(extras)) + 1))
    identities = draw_identities(rng, spec.split, spec.level, n_subjects)
    placements = place_subjects(rng, n_subjects, spec.size, spec.level)
    has_bg_ref = "background" in extras
    bg = _background(rng, spec.size, LEVEL_BG_REF_KINDS[spec.level] if has_bg_ref else ("plain",))
    style = _pick(rng, vocab.STYLE_NAMES) if "style" in extras else None
    direction = _pick(rng, vocab.LIGHT_DIRECTIONS) if "lighting" in extras else None
    box_names = list(vocab.BOX_COLOURS)
    box_colours = [box_names[i] for i in rng.permutation(len(box_names))[:n_subjects]] if "layout" in extras else None

    target, masks = render_scene(bg.image, identities, [p.box for p in placements])
    if direction is not None:
        target = apply_lighting(target, direction)
    if style is not None:
        target = apply_style(target, style)

    refs: list[tuple[str, np.ndarray, Any]] = []
    ref_boxes = []
    for s, identity in enumerate(identities):
        image, ref_box = subject_reference(rng, identity, spec.size)
        refs.append(("subject", image, s))
        ref_boxes.append(ref_box)
    if has_bg_ref:
        refs.append(("background", bg.image, "background"))
    if style is not None:
        refs.append(("style", apply_style(style_chart(spec.size), style), "style"))
    if box_colours is not None:
        refs.append(("layout", layout_reference(spec.size, [p.box for p in placements], box_colours), "layout"))
    if direction is not None:
        refs.append(("lighting", light_sphere(spec.size, direction), "lighting"))
    refs = [refs[i] for i in rng.permutation(len(refs))]
    at = {key: i for i, (_, _, key) in enumerate(refs)}

    sentences = []
    for s, p in enumerate(placements):
        if box_colours is not None:
            sentences.append(vocab.T_SUBJECT_IN_BOX.format(k=at[s] + 1, box=box_colours[s], j=at["layout"] + 1))
        else:
            sentences.append(vocab.T_SUBJECT.format(k=at[s] + 1, cell=p.cell_words, size=p.size_word))
    if has_bg_ref:
        sentences.append(vocab.T_BACKGROUND_REF.format(k=at["background"] + 1))
    else:
        sentences.append(vocab.T_PLAIN_BACKGROUND.format(background=bg.name))
    if style is not None:
        sentences.append(vocab.T_STYLE.format(k=at["style"] + 1))
    if direction is not None:
        sentences.append(vocab.T_LIGHTING.format(k=at["lighting"] + 1))

    truth = _empty_truth(spec)
    truth["subjects"] = [
        _subject_truth(p, identities[s], at[s], ref_boxes[s], box_colours[s] if box_colours else None)
        for s, p in enumerate(placements)
    ]
    truth["background"] = _background_truth(bg, at.get("background"))
    truth["style"] = {"name": style, "ref": at["style"]} if style is not None else None
    truth["lighting"] = {"direction": direction, "ref": at["lighting"]} if direction is not None else None
    truth["layout_ref"] = at.get("layout")
    return Task(
        " ".join(sentences), [r[1] for r in refs], [r[0] for r in refs], target, masks.any(axis=0), masks, truth
    )


def _box_filter(image: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window with edge padding, for (H, W) or (H, W, C) arrays."""
    pad = [(radius, radius), (radius, radius)] + [(0, 0)] * (image.ndim - 2)
    padded = np.pad(image.astype(np.float32), pad, mode="edge")
    h, w = image.shape[:2]
    acc = np.zeros_like(image, dtype=np.float32)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            acc += padded[dy : dy + h, dx : dx + w]
    return acc / float((2 * radius + 1) ** 2)


def refine_task(rng: np.random.Generator, spec: WorldSpec) -> Task:
    """OmniRefiner: references [draft, subject]; the draft lost the subject's detail.

    Draft = target with the subject's pattern flattened to its mean colour, then
    box-blurred and colour-shifted inside the subject mask dilated by the blur
    radius; ``mask`` is that dilated region (every pixel where draft != target).
    """
    identity = draw_identities(rng, spec.split, spec.level, 1)[0]
    placement = place_subjects(rng, 1, spec.size, spec.level)[0]
    bg = _background(rng, spec.size, REFINE_BG_KINDS[spec.level])
    target, masks = render_scene(bg.image, [identity], [placement.box])
    flat, _ = render_scene(bg.image, [identity], [placement.box], flatten=True)
    radius = DRAFT_BLUR_PER_32PX * max(1, spec.size // 32)
    region = _box_filter(masks[0], radius) > 0
    shift = rng.uniform(-DRAFT_COLOUR_SHIFT, DRAFT_COLOUR_SHIFT, size=3).astype(np.float32)
    draft = flat.copy()
    draft[region] = np.clip(_box_filter(flat, radius)[region] + shift, 0.0, 1.0)
    subject_image, ref_box = subject_reference(rng, identity, spec.size)

    truth = _empty_truth(spec)
    truth["subjects"] = [_subject_truth(placement, identity, 1, ref_box)]
    truth["background"] = _background_truth(bg, None)
    truth["draft_ref"] = 0
    prompt = vocab.T_REFINE.format(k=1, j=2)
    return Task(prompt, [draft, subject_image], ["draft", "subject"], target, region, masks, truth)


def edit_task(rng: np.random.Generator, spec: WorldSpec) -> Task:
    """One ``source`` scene (one subject, plain background) + an instruction: move, resize or recolour."""
    identity = draw_identities(rng, spec.split, spec.level, 1)[0]
    before = place_subjects(rng, 1, spec.size, spec.level)[0]
    bg_name = _pick(rng, vocab.BACKGROUND_COLOURS)
    op = _pick(rng, EDIT_OPS)
    after, after_bg = before, bg_name
    if op == "move":
        cells = [(r, c) for r in range(3) for c in range(3) if (r, c) != before.cell]
        after = place_one(rng, _pick(rng, cells), before.size_word, spec.size, spec.level)
        sentence = vocab.T_EDIT_MOVE.format(k=1, cell=after.cell_words)
    elif op == "resize":
        words = [w for w in LEVEL_SIZE_WORDS[spec.level] if w != before.size_word]
        after = place_one(rng, before.cell, _pick(rng, words), spec.size, spec.level)
        sentence = vocab.T_EDIT_RESIZE.format(k=1, size=after.size_word)
    else:
        after_bg = _pick(rng, [n for n in vocab.BACKGROUND_COLOURS if n != bg_name])
        sentence = vocab.T_EDIT_BACKGROUND.format(k=1, background=after_bg)
    source, _ = render_scene(plain_background(spec.size, bg_name).image, [identity], [before.box])
    target_bg = plain_background(spec.size, after_bg)
    target, masks = render_scene(target_bg.image, [identity], [after.box])

    truth = _empty_truth(spec)
    truth["subjects"] = [_subject_truth(after, identity, None, None)]
    truth["background"] = _background_truth(target_bg, None)
    truth["source_ref"] = 0
    truth["edit"] = {
        "op": op, "source_box": list(before.box), "source_cell": list(before.cell),
        "source_size_word": before.size_word, "source_background": bg_name,
    }  # fmt: skip
    return Task(sentence, [source], ["source"], target, masks.any(axis=0), masks, truth)


def make_task(rng: np.random.Generator, spec: WorldSpec, category: str) -> Task:
    if category == "refine":
        return refine_task(rng, spec)
    if category == "edit":
        return edit_task(rng, spec)
    return composition_task(rng, spec, category)
