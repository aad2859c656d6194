"""RefWorld: the embedded procedural world of multi-reference composition tasks.

See docs/research/refworld.md#refworld. In memory: ``RefWorld(...).sample(rng)``
or ``generate(n, seed)``; on disk: ``generate_refworld_to_disk``; ``vocab.WORDS`` is
the closed prompt vocabulary.
"""

from refrl.data.refworld import vocab
from refrl.data.refworld.generate import attach_masks, generate_refworld_to_disk, label_map
from refrl.data.refworld.identities import (
    SHAPES,
    SPLITS,
    decode_identity,
    encode_identity,
    identity_split,
)
from refrl.data.refworld.preview import write_preview_grid
from refrl.data.refworld.tasks import CATEGORIES, COMPOSITION_EXTRAS, min_references
from refrl.data.refworld.vocab import WORDS
from refrl.data.refworld.world import RefWorld, generate, sample_rng

__all__ = [
    "CATEGORIES",
    "COMPOSITION_EXTRAS",
    "SHAPES",
    "SPLITS",
    "WORDS",
    "RefWorld",
    "attach_masks",
    "decode_identity",
    "encode_identity",
    "generate",
    "generate_refworld_to_disk",
    "identity_split",
    "label_map",
    "min_references",
    "sample_rng",
    "vocab",
    "write_preview_grid",
]
