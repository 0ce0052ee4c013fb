"perrep.polar: the cached fast path is the encoder with W_V + BÂ, B = 0 changes nothing, merging adds, bad inputs fail clearly."
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from perrep.clip import write_clip_tokenizer
from perrep.polar import (PolarConfig, PolarEncoder, Update, cache_prompts, encode_cached, encode_with_update, fill_placeholders, load_update,
                          merge, personalize, save_update, text_parts)
from perrep.testing import tiny_clip_text_config


class Toy(torch.nn.Module):
    def __init__(self, layers):
        super().__init__()
        torch.manual_seed(layers)
        self.text_encoder = transformers.CLIPTextModelWithProjection(tiny_clip_text_config(num_hidden_layers=layers)).eval()
        self.tokenizer = TOKENIZER
    def tokenize(self, texts): return dict(self.tokenizer(list(texts), padding=True, return_tensors="pt"))


TOKENIZER = write_clip_tokenizer(tempfile.mkdtemp())
QUERIES = ["a photo of sks.", "sks on the grass next to a red bottle", "an image of sks"]


@pytest.mark.parametrize("layers", [1, 2, 5])
def test_fast_path_equals_the_whole_encoder_at_any_depth(layers):
    model = Toy(layers)
    text_model, projection = text_parts(model)
    tokens = model.tokenize(QUERIES)
    g = torch.Generator().manual_seed(layers)
    A, B = torch.randn(3, 32, generator=g), torch.randn(32, 3, generator=g)
    with torch.no_grad():
        cache = cache_prompts(text_model, tokens)
        torch.testing.assert_close(encode_cached(text_model, projection, cache, A.expand(3, 3, 32), B.expand(3, 32, 3)),
                                   encode_with_update(text_model, projection, tokens, A, B), rtol=1e-5, atol=1e-5)
        original = model.text_encoder(**tokens).text_embeds
        assert torch.equal(encode_with_update(text_model, projection, tokens, A, torch.zeros_like(B)), original)  # B = 0: bit-identical


def test_training_moves_text_towards_the_images_and_merging_adds():
    model = Toy(2)
    g = torch.Generator().manual_seed(0)
    concepts = {"a": F.normalize(torch.randn(3, 16, generator=g), dim=-1), "b": F.normalize(torch.randn(5, 16, generator=g), dim=-1)}
    updates, log = personalize(model, concepts, config=PolarConfig(iterations=40, lr=1e-2, reg_weight=0.1), progress=False)
    assert log[-1]["loss"] < log[0]["loss"]
    merged = merge(list(updates.values()))
    assert merged.A.shape == (2, 32) and merged.B.shape == (32, 2)
    torch.testing.assert_close(merged.B @ merged.A, updates["a"].B @ updates["a"].A + updates["b"].B @ updates["b"].A)
    averaged = merge(list(updates.values()), how="average")
    torch.testing.assert_close(averaged.B @ averaged.A, (merged.B @ merged.A) / 2)
    path = save_update(updates["a"], Path(tempfile.mkdtemp()) / "a.safetensors")
    again = load_update(path, width=32)
    assert torch.equal(again.A, updates["a"].A) and torch.equal(again.B, updates["a"].B) and again.identifier == "sks"


def test_bad_inputs_fail_clearly(tmp_path):
    model = Toy(1)
    with pytest.raises(ValueError, match="3 placeholders but only 2"):
        fill_placeholders("* and * and *", ["sks", "qrv"])
    with pytest.raises(ValueError, match="expected one"):
        personalize(model, {"a": torch.randn(2, 16)}, config=PolarConfig(identifier="zqxjvk", iterations=1), progress=False)
    text_model, projection = text_parts(model)
    tokens = model.tokenize(QUERIES[:1])
    with pytest.raises(ValueError, match="wrong shape"):
        encode_with_update(text_model, projection, tokens, torch.randn(1, 31), torch.randn(32, 1))
    path = save_update(Update(A=torch.randn(1, 64), B=torch.randn(64, 1), identifier="sks"), tmp_path / "u.safetensors")
    with pytest.raises(ValueError, match="wrong shape"):
        load_update(path, width=32)
    with pytest.raises(ValueError, match="needs \\(N, D\\) image embeddings"):
        personalize(model, {"a": torch.randn(16)}, config=PolarConfig(iterations=1), progress=False)


def test_merges_and_the_encoder_apply_several_updates_to_one_query():
    model = Toy(2)
    g = torch.Generator().manual_seed(1)
    concepts = {k: F.normalize(torch.randn(3, 16, generator=g), dim=-1) for k in ("a", "b", "c")}
    updates, _ = personalize(model, concepts, config=PolarConfig(iterations=15, lr=1e-2, reg_weight=0.1), progress=False)
    deltas = [u.B @ u.A for u in updates.values()]
    peak = merge(list(updates.values()), how="max")
    assert torch.equal(peak.B @ peak.A, torch.stack(deltas).amax(0))          # A = I: the element-wise max itself
    text_model, projection = text_parts(model)
    tokens = model.tokenize(["a photo of sks next to sks"])
    for how in ("add", "average", "max"):
        u = merge([updates["a"], updates["b"]], how=how)
        got = PolarEncoder(model, updates, how=how).encode(["a photo of * next to *"], [["a", "b"]])
        with torch.no_grad(): want = F.normalize(encode_with_update(text_model, projection, tokens, u.A, u.B), dim=-1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2 placeholders but only 1"):
        PolarEncoder(model, updates).encode(["* next to *"], [["a"]])


def test_orthogonal_adaptation_freezes_disjoint_rows_of_one_basis_and_negatives_push_away():
    model = Toy(1)
    g = torch.Generator().manual_seed(2)
    concepts = {k: F.normalize(torch.randn(3, 16, generator=g), dim=-1) for k in ("a", "b", "c")}
    config = PolarConfig(iterations=30, lr=1e-2, reg_weight=0.1, orthogonal=True)
    updates, _ = personalize(model, concepts, config=config, progress=False)
    A = torch.cat([u.A for u in updates.values()])                               # (3, 32)
    torch.testing.assert_close(A @ A.T, torch.eye(3), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="exceed the width"):
        personalize(model, {str(k): concepts["a"] for k in range(33)}, config=config, progress=False)
    plain, _ = personalize(model, concepts, config=PolarConfig(iterations=30, lr=1e-2, reg_weight=0.1), progress=False)
    pushed, _ = personalize(model, concepts, config=PolarConfig(iterations=30, lr=1e-2, reg_weight=0.1, neg_weight=1.0), progress=False)
    others = lambda ups: float(sum(PolarEncoder(model, ups).encode(["a photo of *"], [[c]]) @ concepts[o].T.mean(1, keepdim=True)
                                   for c in concepts for o in concepts if o != c))
    assert others(pushed) < others(plain)
