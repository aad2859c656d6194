"""The ``dreambench`` suite: the DreamBooth evaluation protocol on the DreamBench layout.

Protocol (Ruiz et al., DreamBooth, CVPR 2023; docs/reference/methods.md#evaluation-protocols): 30 subjects x
25 prompts, **4 images per prompt** (4 noise seeds), and

* DINO  = mean pairwise cosine of DINO ViT-S/16 CLS embeddings between each generated
  image and every real image of its subject;
* CLIP-I = the same with CLIP image embeddings;
* CLIP-T = cosine between the prompt's and the generated image's CLIP embeddings.

The zoo's ``dino`` / ``clip_i`` rewards score an image against the mean over the
sample's subject references, so each image is scored against a sample holding
*all* real images of its subject, whatever number of them the policy is
conditioned on (``condition_refs``). Averaging those per-image scores over the
suite is the protocol's mean pairwise cosine.

Data: ``--data`` is the google/dreambooth folder (``dataset/<subject>/*.jpg`` and
``dataset/prompts_and_classes.txt``), read with `refrl.data.importers.import_dreambench`.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.eval.suite import EvalItem, Suite

IMAGES_PER_PROMPT = 4  # DreamBooth's protocol
DREAMBENCH_METRICS: dict[str, str] = {"dino": "dino", "clip_i": "clip_i", "clip_t": "clip_t"}


def dreambench_suite(
    root: str | os.PathLike,
    limit: int | None = None,
    size: int = 32,
    images_per_prompt: int = IMAGES_PER_PROMPT,
    condition_refs: int | None = None,
    unique_token: str = "",
) -> Suite:
    """``images_per_prompt`` images for each of the first ``limit`` (subject, prompt) samples.

    Image ``r`` of sample ``i`` uses noise index ``i * images_per_prompt + r`` and is named
    ``<subject>-<prompt index>-<r>``. The policy sees the first ``condition_refs`` real
    images (default all); the rewards compare with all of them.
    """
    from refrl.data.importers import import_dreambench
    from refrl.data.manifest import load_sample

    if images_per_prompt < 1:
        raise RefrlError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    if condition_refs is not None and condition_refs < 1:
        raise RefrlError(f"condition_refs must be >= 1, got {condition_refs}")
    root = Path(root)
    refs = import_dreambench(root, unique_token=unique_token)
    if limit is not None:
        refs = refs[:limit]
    if not refs:
        raise RefrlError(f"{root}: no DreamBench samples")
    items: list[EvalItem] = []
    loaded_refs: dict[str, list] = {}  # subject -> its real images, loaded once for its 25 prompts
    for i, ref_sample in enumerate(refs):
        subject = str(ref_sample.extra["subject"])
        if subject not in loaded_refs:
            loaded_refs[subject] = load_sample(replace(ref_sample, prompt=""), root, size).ref_images
        images = loaded_refs[subject]
        scored = LoadedSample(id=ref_sample.id, prompt=ref_sample.prompt, ref_images=list(images),
                              ref_types=["subject"] * len(images), category=ref_sample.category,
                              extra=dict(ref_sample.extra))
        shown = images[:condition_refs] if condition_refs else images
        conditioned = replace(scored, ref_images=list(shown), ref_types=["subject"] * len(shown))
        for r in range(images_per_prompt):
            items.append(EvalItem(
                image_id=f"{ref_sample.id}-{r}",
                sample=conditioned,
                noise_index=i * images_per_prompt + r,
                score_sample=scored,
                record={"subject": subject, "class": ref_sample.extra.get("class"), "image_index": r},
            ))
    return Suite(
        name="dreambench",
        items=items,
        metrics=dict(DREAMBENCH_METRICS),
        size=(size, size),
        params={"root": str(root.resolve()), "images_per_prompt": images_per_prompt,
                "condition_refs": condition_refs, "unique_token": unique_token},
        n_samples=len(refs),
        group_keys=("subject",),
        protocol=f"DreamBooth protocol: {images_per_prompt} images per prompt; DINO / CLIP-I = mean cosine "
                 "to every real subject image, CLIP-T = prompt-image cosine",
    )
