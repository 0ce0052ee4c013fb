"perrep.genmetrics: fidelity, diversity and CLIP-T equal their definitions; embeddings are cached by content."
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from perrep.genmetrics import cached_embeddings, clip_t, clip_t_prompt, diversity, fidelity, set_scores


def cos(a, b): return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_metrics_equal_a_direct_computation():
    rng = np.random.default_rng(0)
    gen, real, text = rng.normal(size=(6, 5)), rng.normal(size=(4, 5)), rng.normal(size=(6, 5))
    assert fidelity(gen, real) == pytest.approx(np.mean([cos(a, b) for a in gen for b in real]), abs=1e-6)
    assert diversity(gen) == pytest.approx(1 - np.mean([cos(gen[i], gen[k]) for i, k in itertools.permutations(range(6), 2)]), abs=1e-6)
    assert clip_t(gen, text) == pytest.approx(np.mean([cos(a, b) for a, b in zip(gen, text)]), abs=1e-6)
    scores = set_scores(dino_generated=gen, dino_real=real, clip_generated=gen[:, ::-1].copy(), clip_real=real[:, ::-1].copy(),
                        prompt_embeddings=text, object_prompt_embeddings=text[::-1].copy())
    assert scores["dino"] == pytest.approx(scores["clip_i"], abs=1e-6)            # the same cosines, coordinates permuted
    with pytest.raises(ValueError, match="at least 2"):
        diversity(gen[:1])
    with pytest.raises(ValueError, match="differs"):
        fidelity(gen, real[:, :3])


def test_clip_t_prompts():
    assert clip_t_prompt("a photo of sks mug on the grass", identifier="sks", class_word="mug") == "a photo of mug on the grass"
    assert clip_t_prompt("a sks mug, a mug", identifier="sks", class_word="mug", object_name="red mug") == "a red mug, a mug"


def test_cache_reloads_bit_identically_and_embeds_only_what_changed(tmp_path):
    for k in range(4): Image.new("RGB", (4, 4), (k, 2 * k, 3 * k)).save(tmp_path / f"{k}.png")
    seen = []
    def embed(paths):
        seen.append([p.name for p in paths])
        return torch.randn(len(paths), 7)
    paths = sorted(tmp_path.glob("*.png"))
    first = cached_embeddings(paths, embed=embed, cache_file=tmp_path / "c.safetensors")
    assert torch.equal(cached_embeddings(paths, embed=embed, cache_file=tmp_path / "c.safetensors"), first) and len(seen) == 1
    Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "2.png")
    again = cached_embeddings(paths, embed=embed, cache_file=tmp_path / "c.safetensors")
    assert seen[-1] == ["2.png"] and torch.equal(again[[0, 1, 3]], first[[0, 1, 3]]) and not torch.equal(again[2], first[2])
