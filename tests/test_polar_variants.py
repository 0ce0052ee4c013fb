"perrep.polar_variants: the hooked encoder trains what POLAR trains, nothing learned = the model bit for bit, every variant fits, bad inputs fail clearly."
import tempfile
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import transformers

from perrep.clip import TextImageModel, write_clip_tokenizer
from perrep.polar import PolarConfig, cache_prompts, encode_cached, personalize, text_parts, unit_rows
from perrep.polar_variants import PersonalEncoder, personalize_targets, prompt_tuning, textual_inversion, token_vectors
from perrep.testing import tiny_clip_text_config

TOKENIZER = write_clip_tokenizer(tempfile.mkdtemp())


@pytest.fixture(autouse=True)
def one_thread():   # tiny models: more threads only contend (20x slower on a busy 2-core machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Toy(TextImageModel):
    def __init__(self, layers):
        super().__init__()
        torch.manual_seed(layers)
        self.text_encoder = transformers.CLIPTextModelWithProjection(tiny_clip_text_config(num_hidden_layers=layers)).eval()
        self.tokenizer = TOKENIZER
    def text_embeddings(self, tokens): return self.text_encoder(**tokens).text_embeds


def images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"mug": F.normalize(torch.randn(4, 16, generator=g), dim=-1), "bottle": F.normalize(torch.randn(3, 16, generator=g), dim=-1)}


CONFIG = PolarConfig(iterations=30, lr=1e-2, reg_weight=0.1)
QUERIES, CONCEPTS = ["a photo of * next to *", "a dog on the grass", "an image of *"], [["mug", "bottle"], ["mug"], ["bottle"]]


@pytest.mark.parametrize("layers", [1, 3])
def test_the_last_value_update_is_polars(layers):
    model, concepts = Toy(layers), images()
    encoder, log = personalize_targets(model, concepts, config=CONFIG, targets=[(-1, "v")], progress=False)
    reference, reference_log = personalize(model, concepts, config=CONFIG, progress=False)
    A, B = encoder.updates[(layers - 1, "v")]
    for k, name in enumerate(concepts):
        torch.testing.assert_close(unit_rows(A[k]), reference[name].A, rtol=0, atol=1e-5)
        torch.testing.assert_close(B[k], reference[name].B, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor([r["loss"] for r in log]), torch.tensor([r["loss"] for r in reference_log]), rtol=0, atol=1e-5)
    assert encoder.identifiers == {"mug": "sks", "bottle": "sks"}
    text_model, projection = text_parts(model)       # two concepts in one query: their updates added (POLAR's merge)
    A2, B2 = unit_rows(A).flatten(0, 1)[None], B.permute(1, 0, 2).flatten(1)[None]                        # (1, 2, d), (1, d, 2)
    cache = cache_prompts(text_model, model.tokenize(["a photo of sks next to sks"]))
    torch.testing.assert_close(encoder.encode(QUERIES[:1], CONCEPTS[:1]), F.normalize(encode_cached(text_model, projection, cache, A2, B2), dim=-1).detach(),
                               rtol=0, atol=1e-5)


def test_nothing_learned_is_the_model_bit_for_bit():
    model = Toy(2)
    updates, _ = personalize_targets(model, images(), config=replace(CONFIG, iterations=2), targets=[(0, "q"), (1, "mlp2"), ("head", "proj")], progress=False)
    zero = replace(updates, updates={key: (A, torch.zeros_like(B)) for key, (A, B) in updates.updates.items()})
    filled = ["a photo of sks next to sks", "a dog on the grass", "an image of sks"]
    assert torch.equal(zero.encode(QUERIES, CONCEPTS), model.encode_text(filled))
    for n in (1, 2):
        start = token_vectors(model, ["sks"] * n).expand(2, -1, -1)
        ti, _ = textual_inversion(model, images(), config=replace(CONFIG, iterations=1), n_tokens=n, progress=False)
        runs = ["a photo of {0} next to {0}", "a dog on the grass", "an image of {0}"]
        assert torch.equal(replace(ti, vectors=start).encode(QUERIES, CONCEPTS), model.encode_text([q.format(" ".join(["sks"] * n)) for q in runs]))
        pt, _ = prompt_tuning(model, images(), config=replace(CONFIG, iterations=1), n_tokens=n, progress=False)
        prefixed = [" ".join(["sks"] * (n * len(cs)) + [q]) for q, cs in zip(filled, CONCEPTS)]
        assert torch.equal(replace(pt, vectors=start).encode(QUERIES, CONCEPTS), model.encode_text(prefixed))


def test_learned_tokens_belong_to_their_own_placeholder_or_prefix():
    model = Toy(2)
    vectors = torch.stack([token_vectors(model, ["dog", "red"]), token_vectors(model, ["mug", "sks"])])   # (2, 2, d): mug, bottle
    ti = PersonalEncoder(model=model, identifiers={"mug": "sks sks", "bottle": "sks sks"}, vectors=vectors, placement="insert")
    assert torch.equal(ti.encode(["* next to *", "* next to *"], [["mug", "bottle"], ["bottle", "mug"]]),
                       model.encode_text(["dog red next to mug sks", "mug sks next to dog red"]))
    pt = PersonalEncoder(model=model, identifiers={"mug": "sks", "bottle": "sks"}, vectors=vectors, placement="prepend")
    assert torch.equal(pt.encode(["a photo of *", "a cat"], [["bottle", "mug"], []]), model.encode_text(["mug sks dog red a photo of sks", "a cat"]))


@pytest.mark.parametrize("method", ["v", "qkvo", "head+mlp1", "ti1", "ti2", "ti+update", "prompt1", "prompt2"])
def test_every_variant_fits_and_moves_the_embedding(method):
    model, concepts = Toy(2), images()
    train = {"v": lambda: personalize_targets(model, concepts, config=CONFIG, targets=[(-1, "v")], progress=False),
             "qkvo": lambda: personalize_targets(model, concepts, config=CONFIG, targets=[(-1, n) for n in "qkvo"], progress=False),
             "head+mlp1": lambda: personalize_targets(model, concepts, config=CONFIG, targets=[("head", "proj"), (0, "mlp1")], progress=False),
             "ti1": lambda: textual_inversion(model, concepts, config=CONFIG, progress=False),
             "ti2": lambda: textual_inversion(model, concepts, config=CONFIG, n_tokens=2, progress=False),
             "ti+update": lambda: textual_inversion(model, concepts, config=CONFIG, with_update=True, progress=False),
             "prompt1": lambda: prompt_tuning(model, concepts, config=CONFIG, progress=False),
             "prompt2": lambda: prompt_tuning(model, concepts, config=CONFIG, n_tokens=2, progress=False)}[method]
    encoder, log = train()
    assert len(log) == CONFIG.iterations and log[-1]["loss"] < 0.9 * log[0]["loss"], (log[0], log[-1])
    filled = "an image of " + encoder.identifiers["mug"]
    original = model.encode_text([" ".join(["sks"] * encoder.vectors.shape[1] + [filled])] if method.startswith("prompt") else [filled])
    assert (encoder.encode(["an image of *"], [["mug"]]) - original).abs().max() > 1e-3
    general = encoder.encode(["a dog on the grass"], [["mug"]])
    assert torch.equal(general, model.encode_text(["a dog on the grass"])) == (method in ("ti1", "ti2"))   # only TI leaves captions alone


def test_each_concept_trains_as_if_alone():
    model, concepts = Toy(2), images()
    for train in (lambda c: personalize_targets(model, c, config=CONFIG, targets=[(0, "mlp1")], progress=False),
                  lambda c: textual_inversion(model, c, config=CONFIG, with_update=True, progress=False)):
        both, alone = train(concepts)[0], train({"bottle": concepts["bottle"]})[0]
        torch.testing.assert_close(both.encode(["a photo of *"], [["bottle"]]), alone.encode(["a photo of *"], [["bottle"]]), rtol=0, atol=1e-5)


def test_bad_inputs_fail_clearly():
    model, concepts, one = Toy(2), images(), replace(CONFIG, iterations=1)
    with pytest.raises(ValueError, match="unknown name 'w'"):
        personalize_targets(model, concepts, config=one, targets=[(-1, "w")], progress=False)
    with pytest.raises(ValueError, match=r"layer 2 .* out of range for a 2-layer text encoder"):
        personalize_targets(model, concepts, config=one, targets=[(2, "v")], progress=False)
    with pytest.raises(ValueError, match="none given"):
        personalize_targets(model, concepts, config=one, targets=[], progress=False)
    with pytest.raises(ValueError, match="n_tokens=0; expected a positive int"):
        textual_inversion(model, concepts, config=one, n_tokens=0, progress=False)
    with pytest.raises(ValueError, match="n_tokens=0; expected a positive int"):
        prompt_tuning(model, concepts, config=one, n_tokens=0, progress=False)
    with pytest.raises(ValueError, match=r"needs \(N, 16\) image embeddings"):
        textual_inversion(model, {"mug": torch.randn(3, 8)}, config=one, progress=False)
    with pytest.raises(ValueError, match="expected one"):
        prompt_tuning(model, concepts, config=replace(one, identifier="zqxjvk"), progress=False)
    encoder, _ = textual_inversion(model, concepts, config=one, progress=False)
    with pytest.raises(ValueError, match="2 placeholders but only 1"):
        encoder.encode(["* next to *"], [["mug"]])
    with pytest.raises(ValueError, match=r"\['cup'\] not trained"):
        encoder.encode(["a photo of *"], [["cup"]])
    with pytest.raises(ValueError, match="may stand only at placeholders"):
        encoder.encode(["sks next to *"], [["mug"]])
    with pytest.raises(ValueError, match="2 queries and 1 concept lists"):
        encoder.encode(["a", "b"], [[]])
