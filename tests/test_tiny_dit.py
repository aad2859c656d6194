"""TinyDiT policy: reference KV cache, batch invariance, LoRA, persistence, tokenizer."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.models.policy import Policy
from refrl.models.tiny_dit import TinyDiTConfig, grid_positions, patchify, sincos_2d, unpatchify
from refrl.models.tiny_dit_policy import TinyDiTPolicy
from refrl.models.tokenizer import PAD_ID, UNK_ID, WordTokenizer, split_words

WORDS = ["put the subject of image at top left right large small", "in style background 1 2 3 4"]
TINY = dict(image_size=16, patch=4, ref_size=16, ref_patch=8, width=32, depth=2, heads=2, mlp_ratio=2, max_refs=4, max_text_len=12,
            prediction="v")
ATOL = 1e-5


def make_policy(seed: int = 0, **overrides) -> TinyDiTPolicy:
    """A tiny policy with every weight perturbed, so zero-initialised gates and head
    do not make all outputs 0 (which would pass any equality test)."""
    torch.manual_seed(seed)
    policy = TinyDiTPolicy(WordTokenizer.from_words(WORDS), TinyDiTConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for p in policy.net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return policy.eval()


def sample(sid: str, prompt: str, n_refs: int, seed: int, size: int = 16) -> LoadedSample:
    g = torch.Generator().manual_seed(seed)
    types = ["subject", "style", "background", "pose", "lighting"]
    return LoadedSample(sid, prompt, [torch.rand(3, size, size, generator=g) for _ in range(n_refs)], types[:n_refs])


def inputs(b: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 16, 16, generator=g), torch.rand(b, generator=g)


A = sample("a", "put the subject of image 1 at the top left", 1, seed=10)
B = sample("b", "image 1 in the style of image 2 on the background of image 3 large", 3, seed=11, size=24)
C = sample("c", "", 0, seed=12)


# -- tokenizer ----------------------------------------------------------------------


def test_split_words_lowercases_and_separates_digits():
    assert split_words("Put image2, at TOP-left!") == ["put", "image", "2", "at", "top", "left"]


def test_tokenizer_encode_pads_truncates_and_marks_unknown():
    tok = WordTokenizer.from_words(["a b", "B c"])
    assert tok.vocab == ["<pad>", "<unk>", "a", "b", "c"]
    ids, mask = tok.encode(["a c zebra", "b", ""], max_len=2)
    assert ids.tolist() == [[2, 4], [3, PAD_ID], [PAD_ID, PAD_ID]]
    assert mask.tolist() == [[True, True], [True, False], [False, False]]
    ids, _ = tok.encode(["zebra a"], max_len=8)
    assert ids.tolist() == [[UNK_ID, 2]]
    assert tok.decode(torch.tensor([2, 1, 0])) == "a <unk>"
    assert tok.encode(["", ""], max_len=5)[0].shape == (2, 0)


def test_tokenizer_save_load(tmp_path):
    tok = WordTokenizer.from_words(WORDS)
    tok.save(tmp_path / "tok.json")
    assert WordTokenizer.load(tmp_path / "tok.json").vocab == tok.vocab
    (tmp_path / "bad.json").write_text('{"vocab": ["x"]}')
    with pytest.raises(ValueError, match="not a refrl word tokenizer"):
        WordTokenizer.load(tmp_path / "bad.json")


# -- architecture -------------------------------------------------------------------


def test_patchify_roundtrip_and_aligned_positions():
    x = torch.randn(2, 3, 16, 16)
    assert patchify(x, 4).shape == (2, 16, 48)
    assert torch.equal(unpatchify(patchify(x, 4), 4, 16, 16), x)
    # Coordinates are patch centres in output-image patch units: on a 16px image with
    # patch 4, image token 0 is at (0.5, 0.5); a reference cut with patch 8 has its
    # token 0 at (1, 1) (the centre of the image's first 2x2 tokens) and token 3 at (3, 3).
    ref, img = grid_positions(16, 8, 16, 4, 32), grid_positions(16, 4, 16, 4, 32)
    assert ref.shape == (4, 32) and img.shape == (16, 32)
    at = lambda y, x: sincos_2d(torch.tensor([y]), torch.tensor([x]), 32)[0]  # noqa: E731
    assert torch.allclose(img[0], at(0.5, 0.5)) and torch.allclose(img[6], at(1.5, 2.5))
    assert torch.allclose(ref[0], at(1.0, 1.0)) and torch.allclose(ref[3], at(3.0, 3.0))
    # channel 0 is sin(y * 1), channel 8 is sin(x * 1) (first frequency of each half)
    assert torch.isclose(img[6, 0], torch.sin(torch.tensor(1.5))) and torch.isclose(img[6, 16], torch.sin(torch.tensor(2.5)))


def test_param_count_matches_module():
    policy = make_policy()
    assert policy.config.param_count() == sum(p.numel() for p in policy.net.parameters())
    assert isinstance(policy, Policy)


@pytest.mark.parametrize("cached", [True, False])
def test_flops_per_sample_matches_flop_counter(cached):
    policy = make_policy(use_ref_cache=cached)
    samples = [sample(str(i), "put image 1 at the top left", 2, seed=i) for i in range(3)]
    x, sigma = inputs(3)
    with torch.no_grad():
        cond = policy.encode_condition(samples)
        # the CPU flash-attention kernel is not counted by FlopCounterMode; the math one is
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            policy.velocity(x, sigma, cond)
    n_text = cond.inputs.text_ids.shape[1]
    assert counter.get_total_flops() == 3 * policy.config.flops_per_sample(2, n_text, include_condition=not cached)


def test_velocity_shape_and_latents():
    policy = make_policy()
    x, sigma = inputs(3)
    v = policy.velocity(x, sigma, policy.encode_condition([A, B, C]))
    assert v.shape == (3, *policy.latent_shape(16, 16)) == (3, 3, 16, 16)
    assert v.abs().max() > 0
    img = torch.rand(2, 3, 16, 16)
    assert torch.allclose(policy.decode(policy.encode_images(img)), img)
    assert policy.decode(torch.full((1, 3, 2, 2), 5.0)).max() == 1


def test_zero_init_outputs_zero_velocity():
    policy = TinyDiTPolicy(WordTokenizer.from_words(WORDS), TinyDiTConfig(**TINY))
    x, sigma = inputs(1)
    assert torch.count_nonzero(policy.velocity(x, sigma, policy.encode_condition([A]))) == 0


# -- reference cache and batching -----------------------------------------------------


def test_cached_equals_uncached():
    policy = make_policy()
    x, sigma = inputs(3)
    with torch.no_grad():
        cond = policy.encode_condition([A, B, C])
        assert cond.kv is not None and len(cond.kv) == policy.config.depth
        cached = policy.velocity(x, sigma, cond)
        policy.use_ref_cache = False
        cond_raw = policy.encode_condition([A, B, C])
        assert cond_raw.kv is None
        uncached = policy.velocity(x, sigma, cond_raw)
        # the cached condition is ignored (recomputed) while the cache is off
        assert torch.allclose(policy.velocity(x, sigma, cond), uncached, atol=ATOL)
    assert torch.allclose(cached, uncached, atol=ATOL)


@pytest.mark.parametrize("cached", [True, False])
def test_velocity_does_not_depend_on_batch_mates(cached):
    policy = make_policy(use_ref_cache=cached)
    x, sigma = inputs(3)
    with torch.no_grad():
        alone = policy.velocity(x[1:2], sigma[1:2], policy.encode_condition([A]))
        # B has more references (of a larger size) and a longer prompt; C has none
        batched = policy.velocity(x, sigma, policy.encode_condition([B, A, C]))
        c_alone = policy.velocity(x[2:], sigma[2:], policy.encode_condition([C]))
    assert torch.allclose(batched[1:2], alone, atol=ATOL)
    assert torch.allclose(batched[2:], c_alone, atol=ATOL)


@pytest.mark.parametrize("cached", [True, False])
def test_select_condition_equals_reencoding(cached):
    policy = make_policy(use_ref_cache=cached)
    x, sigma = inputs(4)
    with torch.no_grad():
        cond = policy.select_condition(policy.encode_condition([A, B]), torch.tensor([1, 0, 1, 1]))
        direct = policy.encode_condition([B, A, B, B])
        assert torch.allclose(policy.velocity(x, sigma, cond), policy.velocity(x, sigma, direct), atol=ATOL)


def test_drop_text_and_drop_refs_equal_empty_condition():
    policy = make_policy()
    x, sigma = inputs(2)
    b_no_text = LoadedSample("b", "", B.ref_images, B.ref_types)
    b_no_refs = LoadedSample("b", B.prompt, [], [])
    with torch.no_grad():
        full = policy.velocity(x, sigma, policy.encode_condition([A, B]))
        drop_t = policy.velocity(x, sigma, policy.encode_condition([A, B], drop_text=torch.tensor([False, True])))
        drop_r = policy.velocity(x, sigma, policy.encode_condition([A, B], drop_refs=torch.tensor([False, True])))
        empty_t = policy.velocity(x[1:], sigma[1:], policy.encode_condition([b_no_text]))
        empty_r = policy.velocity(x[1:], sigma[1:], policy.encode_condition([b_no_refs]))
    assert torch.allclose(drop_t[:1], full[:1], atol=ATOL) and torch.allclose(drop_r[:1], full[:1], atol=ATOL)
    assert (drop_t[1] - full[1]).abs().max() > 1e-3 and (drop_r[1] - full[1]).abs().max() > 1e-3
    assert torch.allclose(drop_t[1:], empty_t, atol=ATOL)
    assert torch.allclose(drop_r[1:], empty_r, atol=ATOL)


def test_references_and_their_order_matter():
    policy = make_policy()
    x, sigma = inputs(1)
    swapped = LoadedSample("b", B.prompt, B.ref_images[::-1], B.ref_types[::-1])
    with torch.no_grad():
        v = policy.velocity(x, sigma, policy.encode_condition([B]))
        v_swapped = policy.velocity(x, sigma, policy.encode_condition([swapped]))
    assert (v - v_swapped).abs().max() > 1e-3  # the index embedding tells "image 1" from "image 3"


def test_gradient_reaches_condition_stream_through_cache():
    policy = make_policy().train()
    x, sigma = inputs(2)
    policy.velocity(x, sigma, policy.encode_condition([A, B])).square().mean().backward()
    for name in ("ref_embed", "type_embed", "index_embed", "text_embed", "cond_blocks"):
        grads = [p.grad for n, p in policy.net.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name


def test_input_errors_name_the_problem():
    policy = make_policy()
    too_many = sample("crowded", "image 1", 4, seed=1)
    too_many.ref_images.append(too_many.ref_images[0])
    too_many.ref_types.append("subject")
    with pytest.raises(RefrlError, match=r"'crowded' has 5 references.*max_refs=4"):
        policy.encode_condition([A, too_many])
    bad_type = LoadedSample("odd", "x", [torch.rand(3, 8, 8)], ["texture"])
    with pytest.raises(RefrlError, match=r"'odd' reference 1: unknown reference type 'texture'; allowed: subject"):
        policy.encode_condition([bad_type])
    gray = LoadedSample("gray", "x", [torch.rand(1, 8, 8)], ["subject"])
    with pytest.raises(RefrlError, match=r"'gray' reference 1: expected a float tensor \(3, H, W\)"):
        policy.encode_condition([gray])
    with pytest.raises(ValueError, match="drop_text must be a bool tensor of shape"):
        policy.encode_condition([A], drop_text=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="batch mismatch"):
        policy.velocity(torch.randn(2, 3, 16, 16), torch.rand(2), policy.encode_condition([A]))


# -- LoRA and persistence --------------------------------------------------------------


def test_lora_trains_only_adapters_and_can_be_disabled():
    policy = make_policy()
    x, sigma = inputs(2)
    with torch.no_grad():
        base = policy.velocity(x, sigma, policy.encode_condition([A, B]))
    with pytest.raises(NotImplementedError, match="no LoRA adapter"):
        policy.adapter_disabled()
    policy.enable_lora(rank=4, alpha=8)
    names = {id(p): n for n, p in policy.net.named_parameters()}
    trainable = list(policy.trainable_parameters())
    assert trainable and all("lora_" in names[id(p)] for p in trainable)
    assert len(trainable) == 2 * (4 * 1 + 4 * 2 + 1)  # A and B of qkv/proj/fc1/fc2 per block + last kv
    with torch.no_grad():
        assert torch.allclose(policy.velocity(x, sigma, policy.encode_condition([A, B])), base, atol=ATOL)
        for p in trainable:
            p.add_(0.1 * torch.randn_like(p))
        adapted = policy.velocity(x, sigma, policy.encode_condition([A, B]))
        with policy.adapter_disabled():
            disabled = policy.velocity(x, sigma, policy.encode_condition([A, B]))
        assert torch.allclose(policy.velocity(x, sigma, policy.encode_condition([A, B])), adapted)
    assert (adapted - base).abs().max() > 1e-3
    assert torch.allclose(disabled, base, atol=ATOL)
    with pytest.raises(RefrlError, match=r"unknown LoRA target modules \['attn'\]"):
        make_policy().enable_lora(2, 2, target_modules=("attn",))


@pytest.mark.parametrize("lora,merge", [(False, False), (True, False), (True, True)])
def test_save_load_roundtrip(tmp_path, lora, merge):
    policy = make_policy()
    x, sigma = inputs(3)
    with torch.no_grad():
        base = policy.velocity(x, sigma, policy.encode_condition([A, B, C]))
    if lora:
        policy.enable_lora(rank=2, alpha=4)
        with torch.no_grad():
            for p in policy.trainable_parameters():
                p.add_(0.1 * torch.randn_like(p))
    policy.save_pretrained(tmp_path / "m", merge_lora=merge)
    files = {"config.json", "model.safetensors", "tokenizer.json"}
    if lora and not merge:
        files |= {"adapter.json", "adapter.safetensors"}
    assert {f.name for f in (tmp_path / "m").iterdir()} == files
    loaded = TinyDiTPolicy.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == policy.config and loaded.has_lora == (lora and not merge)
    with torch.no_grad():
        expected = policy.velocity(x, sigma, policy.encode_condition([A, B, C]))
        got = loaded.velocity(x, sigma, loaded.encode_condition([A, B, C]))
        assert torch.allclose(got, expected, atol=ATOL if merge else 0.0)
        if lora:
            assert (expected - base).abs().max() > 1e-3
        if loaded.has_lora:  # the KL reference survives a save/load (exact resume)
            trainable = lambda pol: sorted(n for n, p in pol.net.named_parameters() if p.requires_grad)  # noqa: E731
            assert trainable(loaded) == trainable(policy)
            with loaded.adapter_disabled():
                assert torch.allclose(loaded.velocity(x, sigma, loaded.encode_condition([A, B, C])), base, atol=ATOL)


def test_from_pretrained_names_missing_file(tmp_path):
    make_policy().save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(RefrlError, match=r"tokenizer\.json is missing"):
        TinyDiTPolicy.from_pretrained(tmp_path)
    lora = make_policy()
    lora.enable_lora(rank=2, alpha=2)
    lora.save_pretrained(tmp_path / "lora", merge_lora=False)
    (tmp_path / "lora" / "adapter.safetensors").unlink()
    with pytest.raises(RefrlError, match=r"adapter\.safetensors is missing"):
        TinyDiTPolicy.from_pretrained(tmp_path / "lora")


def test_tied_index_words_add_the_word_embedding_to_each_reference(tmp_path):
    from refrl.data.refworld.vocab import WORDS
    from refrl.models.build import ModelConfig, build_policy, load_policy

    policy = build_policy(ModelConfig(width=32, depth=2, heads=2, tie_index_words=True))
    tok = WordTokenizer.from_words(WORDS)
    # RefWorld names references 1..7; the model allows 8, and "8" has no word (-1)
    assert policy.config.index_word_ids == [tok.word_to_id[str(i)] for i in range(1, 8)] + [-1]
    net = policy.net
    s = sample("a", "put the subject of image 2 at the top left", n_refs=2, seed=3, size=32)
    inp = policy.condition_inputs([s])
    tokens, _ = net.embed_condition(inp)
    net.index_word_ids = None  # the same network without the tie
    untied, _ = net.embed_condition(inp)
    t = policy.config.tokens_per_ref
    n_text = inp.text_ids.shape[1]
    ref_tokens = (tokens - untied)[0, 1 + n_text:].reshape(2, t, -1)
    for i in range(2):
        expected = net.text_embed.weight[tok.word_to_id[str(i + 1)]]
        torch.testing.assert_close(ref_tokens[i], expected.expand(t, -1))
    torch.testing.assert_close((tokens - untied)[0, : 1 + n_text], torch.zeros(1 + n_text, tokens.shape[-1]))
    policy.save_pretrained(tmp_path / "p")
    assert load_policy(tmp_path / "p").config.index_word_ids == policy.config.index_word_ids
