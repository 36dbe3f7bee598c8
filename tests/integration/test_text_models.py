"""The built-in text handler against sentence-transformers itself, in this process: every pooling
mode, Dense layers, normalisation or none, a default prompt left out of pooling, length limits,
truncation, and rerank scores against CrossEncoder. (tests/e2e/test_embedding_apis.py checks the
same through HTTP for a few of these models and the real MiniLM.)"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import WORDS, _build_sentence_transformer
from tests.unit.test_worker_continuous import loop, outcome  # noqa: F401 (loop is a fixture)
from worker.connection import WorkBatch
from worker.models import InputError, default_model_path
from worker.models.hf_text import HFTextModel
from worker.models.st_config import weights_version

pytestmark = pytest.mark.integration

TEXTS = ["the quick brown fox", "lazy dog", "model serving batch request reply worker broker", "a"]
SENTENCE = " ".join(WORDS)  # 16 words, 18 tokens with MiniLM's [CLS] and [SEP]
LONG = " ".join(WORDS * 6)  # 96 words: over every limit below but the model's 128 positions


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def served(path, **options) -> HFTextModel:
    model = HFTextModel(device="cpu", model_path=str(path), **options)
    model.init_model()
    return model


VARIANTS = {  # name: (pooling, options for _build_sentence_transformer)
    "cls": ("cls", {}),
    "mean": ("mean", {}),
    "max": ("max", {}),
    "mean_sqrt_len_tokens": ("mean_sqrt_len_tokens", {"normalize": False}),
    "weightedmean": ("weightedmean", {}),
    "lasttoken": ("lasttoken", {}),
    "cls+mean": (("cls", "mean"), {}),
    "mean, Dense, not normalised": ("mean", {"dense": True, "normalize": False}),
    "mean, prompt left out of pooling": ("mean", {"prompt": "query: ", "include_prompt": False}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_embeddings_match_sentence_transformers_encode(variant, tiny_bert, tmp_path):
    from sentence_transformers import SentenceTransformer

    pooling, options = VARIANTS[variant]
    path = _build_sentence_transformer(tmp_path / "st", tiny_bert, pooling, max_seq_length=24, **options)
    reference = SentenceTransformer(str(path), device="cpu")
    model = served(path)
    assert model.max_tokens == 24

    expected = reference.encode(TEXTS + [LONG])
    outputs = model.predict(TEXTS + [{"text": LONG, "truncate": True}])
    cosines = [cosine(got, want) for got, want in zip(outputs, expected)]
    assert min(cosines) >= 0.9999, (variant, cosines)
    np.testing.assert_allclose(np.stack(outputs), expected, atol=1e-4)  # the same vectors, norms included
    assert model.metadata()["outputs"][0]["shape"] == [-1, expected.shape[1]]


def test_over_long_input_fails_alone_unless_truncation_is_asked(tiny_st_cls):
    model = served(tiny_st_cls)
    assert model.max_tokens == 16
    short, refused, truncated = model.predict(["lazy dog", LONG, {"text": LONG, "truncate": True, "count_tokens": True}])
    assert isinstance(short, np.ndarray)
    assert isinstance(refused, InputError) and "more than this model's limit of 16" in str(refused)
    assert truncated["tokens"] == 16 and len(truncated["embedding"]) == 32
    auto = served(tiny_st_cls, auto_truncate=True)
    [vector, still_refused] = auto.predict([LONG, {"text": LONG, "truncate": False}])
    np.testing.assert_allclose(vector, truncated["embedding"], atol=1e-6)
    assert isinstance(still_refused, InputError)


def test_inputs_take_text_objects_and_count_tokens_and_refuse_unknown_fields(tiny_st_mean):
    model = served(tiny_st_mean)
    plain, counted, wrong, unknown = model.predict(
        ["lazy dog", {"text": "lazy dog", "count_tokens": True}, {"text": 3}, {"text": "x", "prompt": "y"}])
    np.testing.assert_allclose(counted["embedding"], plain)
    assert counted["tokens"] == 4  # [CLS] lazy dog [SEP]
    assert isinstance(wrong, InputError) and isinstance(unknown, InputError) and "'prompt'" in str(unknown)


def test_overrides_and_a_plain_directory_keep_the_old_defaults(tiny_bert, tiny_st_cls):
    plain = served(tiny_bert)  # no modules.json: mean pooling, normalised, 256 capped by its 128 positions
    assert plain.config.pooling == ("mean",) and plain.config.normalize and plain.max_tokens == 128
    forced = served(tiny_st_cls, pooling="mean", max_length=8)
    assert forced.config.pooling == ("mean",) and forced.max_tokens == 8
    np.testing.assert_allclose(forced.predict(["lazy dog"])[0], plain.predict(["lazy dog"])[0], atol=1e-5)


def test_version_is_a_hash_of_weights_and_configs(tiny_bert, tiny_st_cls, tmp_path):
    assert weights_version(str(tiny_st_cls)) == weights_version(str(tiny_st_cls))
    assert weights_version(str(tiny_st_cls)) != weights_version(str(tiny_bert))
    (tiny_st_cls / "README.md").touch()  # documentation is not part of the version
    assert len(weights_version(str(tiny_st_cls))) == 12


def test_rerank_scores_match_cross_encoder(tiny_cross_encoder):
    from sentence_transformers import CrossEncoder

    pairs = [("lazy dog", "the quick brown fox jumps over the lazy dog"), ("model serving", "batch request reply"),
             ("fox", LONG)]
    expected = CrossEncoder(str(tiny_cross_encoder), device="cpu").predict(pairs)
    model = served(tiny_cross_encoder, task="rerank")
    assert model.max_tokens == 48
    scores = model.predict([[q, d] for q, d in pairs[:2]] + [{"query": "fox", "document": LONG, "truncate": True}])
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    counted, refused = model.predict([{"query": "fox", "document": "dog", "count_tokens": True}, ["fox", LONG]])
    assert counted["tokens"] == 5 and counted["score"] == pytest.approx(model.predict([["fox", "dog"]])[0])
    assert isinstance(refused, InputError)


def test_a_hugging_face_id_is_found_in_the_local_cache_at_its_revision(tiny_st_mean, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-mean"
    shutil.copytree(tiny_st_mean, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = served("acme/tiny-mean", revision="v1")
    assert model.model_dir == str(repo / "snapshots" / commit)
    np.testing.assert_allclose(model.predict(["lazy dog"])[0], served(tiny_st_mean).predict(["lazy dog"])[0])
    with pytest.raises(ValueError, match="at revision 'v2'"):
        served("acme/tiny-mean", revision="v2")
    with pytest.raises(ValueError, match="is a local directory"):
        HFTextModel(model_path=str(tiny_st_mean), revision="v1")


def test_two_compute_lanes_and_the_intake_thread_give_the_vectors_of_one_thread(tiny_st_mean, loop):
    """Continuous batching with 2 lanes: passes run in two threads at once while a third tokenizes
    what arrives; every input still gets exactly the vector predict() gives it alone."""
    import torch

    start, inbox, state, results = loop
    model = served(tiny_st_mean)
    texts = [" ".join(WORDS[k % len(WORDS):][: 1 + k % 11]) for k in range(120)]
    expected = model.predict(texts)
    most, budget, _ = model.pass_limits()
    threads_before = torch.get_num_threads()
    try:
        start(model, most, budget, lanes=2, threads=2,
              set_threads=torch.set_num_threads)
        for first in range(0, len(texts), 6):
            inbox.put(WorkBatch(first, texts[first:first + 6], request_ids=[str(first)] * 6))
        got = outcome(results(len(texts), timeout_s=30))
    finally:
        torch.set_num_threads(threads_before)
    assert sorted(got) == [(first, k) for first in range(0, len(texts), 6) for k in range(6)]
    for (first, k), vector in got.items():
        np.testing.assert_allclose(np.asarray(vector, dtype=np.float32), expected[first + k], atol=1e-5)
    assert state.items == len(texts) and state.batches < len(texts)


# ------------------------------------------------------------------ passes without padding


@pytest.mark.parametrize("products", ["oneDNN", "torch"])
@pytest.mark.parametrize("attention", ["one input at a time", "padded"])
@pytest.mark.parametrize("task", ["embedding", "classification", "rerank"])
def test_unpadded_passes_give_the_outputs_of_padded_ones(task, attention, products, tiny_st_mean,
                                                         tiny_bert_classifier, tiny_cross_encoder, monkeypatch):
    from hypothesis import given, settings, strategies as st

    from worker.models import unpadded as unpadded_module

    if attention == "padded":  # as in a pass of more than ATTENTION_LOOP_MOST inputs
        monkeypatch.setattr(unpadded_module, "ATTENTION_LOOP_MOST", 0)
    if products == "oneDNN":  # every pass, however few its tokens, with its rows rounded up
        import torch

        if unpadded_module.onednn_linear(torch) is None:
            pytest.skip("this torch has no oneDNN linear")
        monkeypatch.setattr(unpadded_module, "ONEDNN_LEAST_ROWS", 1)
    path = {"embedding": tiny_st_mean, "classification": tiny_bert_classifier, "rerank": tiny_cross_encoder}[task]
    unpadded = served(path, task=task, onednn="auto" if products == "oneDNN" else "off")
    padded = served(path, task=task, unpadded="off")
    assert unpadded._unpadded is not None and padded._unpadded is None  # auto: on, on a CPU
    assert unpadded._unpadded.linear_kind == products
    text = st.lists(st.sampled_from(WORDS), min_size=0, max_size=30).map(" ".join)
    one = st.tuples(text, text).map(list) if task == "rerank" else text

    @settings(max_examples=40, deadline=None, database=None)
    @given(st.lists(one, min_size=1, max_size=9))
    def same_outputs(inputs):
        got, want = unpadded.predict(inputs), padded.predict(inputs)
        refused = [isinstance(o, InputError) for o in want]  # over the limit (the cross-encoder's is 48)
        assert [isinstance(o, InputError) for o in got] == refused
        got = [o for o, r in zip(got, refused) if not r]
        want = [o for o, r in zip(want, refused) if not r]
        if task == "classification":
            got = [list(o["probabilities"].values()) for o in got]
            want = [list(o["probabilities"].values()) for o in want]
        np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64),
                                   atol=1e-5, rtol=1e-5)

    same_outputs()


@pytest.mark.parametrize("fault, logged", [("disagrees", "oneDNN's products disagree"),
                                           ("raises", "oneDNN's products failed")])
def test_onednn_products_that_disagree_or_fail_at_load_give_way_to_torchs(tiny_st_mean, monkeypatch, caplog,
                                                                          fault, logged):
    import torch

    from worker.models import unpadded as unpadded_module

    def faulty(torch_module):
        def linear(x, weight, bias, activation="none"):
            if fault == "raises":
                raise RuntimeError("no primitive for this shape")
            out = torch.nn.functional.linear(x, weight, bias) * 1.01
            return torch.nn.functional.gelu(out) if activation == "gelu" else out
        return linear

    monkeypatch.setattr(unpadded_module, "onednn_linear", faulty)
    with caplog.at_level("WARNING"):
        model = served(tiny_st_mean)
    assert model._unpadded is not None and model._unpadded.linear_kind == "torch"  # unpadded still
    assert logged in caplog.text


def test_models_unpadded_passes_do_not_know_run_padded(tiny_bert, tmp_path):
    import json
    import shutil

    from transformers import BertConfig, BertModel

    from worker.models.unpadded import unpadded_encoder

    decoder = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, is_decoder=True)
    assert unpadded_encoder(BertModel(decoder)) is None  # causal attention
    assert unpadded_encoder(BertModel(BertConfig(**{**decoder.to_dict(), "is_decoder": False})))
    shutil.copytree(tiny_bert, tmp_path / "decoder")
    BertModel(decoder).save_pretrained(tmp_path / "decoder")
    model = served(tmp_path / "decoder", unpadded="on")
    assert model._unpadded is None and model.padded and len(model.predict(TEXTS)) == len(TEXTS)

    # A tokenizer that pads on the left: BERT's positions count from the padded row's start.
    shutil.copytree(tiny_bert, tmp_path / "left")
    settings = json.loads((tmp_path / "left" / "tokenizer_config.json").read_text())
    (tmp_path / "left" / "tokenizer_config.json").write_text(json.dumps({**settings, "padding_side": "left"}))
    model = served(tmp_path / "left")
    assert model._unpadded is None and len(model.predict(TEXTS)) == len(TEXTS)


def test_unpadded_passes_that_fail_at_load_are_not_used(tiny_st_mean, monkeypatch, caplog):
    from worker.models.unpadded import UnpaddedBert

    def missing(self, *args):
        raise AttributeError("'BertSelfAttention' object has no attribute 'scaling'")

    monkeypatch.setattr(UnpaddedBert, "__init__", missing)
    model = served(tiny_st_mean)
    assert model._unpadded is None and "failed" in caplog.text
    assert len(model.predict(TEXTS)) == len(TEXTS)


def test_unpadded_passes_that_disagree_with_the_model_at_load_are_not_used(tiny_st_mean, monkeypatch, caplog):
    from worker.models.unpadded import UnpaddedBert

    hidden = UnpaddedBert.hidden
    monkeypatch.setattr(UnpaddedBert, "hidden", lambda self, *a: (lambda h, m: (h * 1.01, m))(*hidden(self, *a)))
    model = served(tiny_st_mean)
    assert model._unpadded is None
    assert "disagree" in caplog.text
    assert len(model.predict(TEXTS)) == len(TEXTS)


def test_tei_options_normalize_prompt_name_and_truncation_direction(tiny_bert, tiny_st_cls, tmp_path):
    """The per-input options the TEI routes send: raw vectors as sentence-transformers gives them without
    its Normalize module, a named prompt as encode(prompt_name=...) applies it, and left truncation."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    with_prompt = _build_sentence_transformer(tmp_path / "prompted", tiny_bert, "mean", prompt="query: ")
    unnormalised = _build_sentence_transformer(tmp_path / "raw", tiny_bert, "mean", normalize=False)
    model = served(with_prompt)
    raw, as_default, named, unknown = model.predict([
        {"text": TEXTS[0], "normalize": False, "prompt_name": "document"},
        {"text": TEXTS[0], "prompt_name": "query"}, {"text": TEXTS[0], "prompt_name": "document"},
        {"text": TEXTS[0], "prompt_name": "nope"}])
    reference = SentenceTransformer(str(with_prompt), device="cpu")
    want_raw = SentenceTransformer(str(unnormalised), device="cpu").encode([TEXTS[0]])[0]
    np.testing.assert_allclose(raw, want_raw, atol=1e-5)
    assert abs(np.linalg.norm(raw) - 1.0) > 0.01  # truly not normalised
    np.testing.assert_allclose(as_default, reference.encode([TEXTS[0]])[0], atol=1e-5)
    np.testing.assert_allclose(named, reference.encode([TEXTS[0]], prompt_name="document")[0], atol=1e-5)
    assert cosine(named, as_default) < 0.9999  # the named prompt was used, not the default
    assert isinstance(unknown, InputError) and "Available prompts: ['document', 'query']" in str(unknown)

    # The tiny models' vocabulary is lost (transformers' BertTokenizerFast(vocab_file=...) keeps only the
    # special tokens), so every word is [UNK]: the real MiniLM shows which end was cut.
    short = served(default_model_path(), max_length=16)
    left, right = short.prepare([{"text": SENTENCE, "truncate": True, "truncation_direction": "left"},
                                 {"text": SENTENCE, "truncate": True}])
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    for item, side in ((left, "left"), (right, "right")):
        tokenizer.truncation_side = side
        assert list(item.features["input_ids"]) == tokenizer(SENTENCE, truncation=True, max_length=16)["input_ids"]
    assert list(left.features["input_ids"]) != list(right.features["input_ids"])
    bad = short.predict([{"text": "a", "truncation_direction": "up"}, {"text": "a", "raw_scores": True}])
    assert all(isinstance(error, InputError) for error in bad)


def test_tokenize_and_decode_inputs_answer_without_a_forward_pass():
    from transformers import AutoTokenizer

    model = served(default_model_path())  # a real vocabulary (see above), which strips accents
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    text = "lazy  dog é"
    ids = tokenizer(text)["input_ids"]
    tokens, bare, decoded, kept, bad_id, vector = model.predict([
        {"tokenize": text}, {"tokenize": text, "add_special_tokens": False}, {"decode": ids},
        {"decode": ids, "skip_special_tokens": False}, {"decode": [10 ** 6]}, "lazy dog"])
    assert [t["id"] for t in tokens] == ids and [t["special"] for t in tokens] == [True, False, False, False, True]
    assert tokens[0] == {"id": ids[0], "text": "[CLS]", "special": True, "start": None, "stop": None}
    for token in tokens[1:-1]:  # offsets in UTF-8 bytes, as text-embeddings-inference gives them
        assert text.encode()[token["start"]:token["stop"]].decode() == token["text"]
    assert tokens[3]["start"] == len("lazy  dog ".encode()) and tokens[3]["stop"] == len(text.encode())
    assert bare == tokens[1:-1]
    assert decoded == tokenizer.decode(ids, skip_special_tokens=True) and kept.startswith("[CLS]")
    assert isinstance(bad_id, InputError) and isinstance(vector, np.ndarray)
    prepared = model.prepare([{"tokenize": "dog"}])[0]
    assert model.cost(prepared) == 0 and prepared.done


def test_raw_scores_give_logits_for_classifiers_and_rerankers(tiny_bert_classifier, tiny_cross_encoder):
    classifier = served(tiny_bert_classifier, task="classification")
    probabilities, logits = classifier.predict(["lazy dog", {"text": "lazy dog", "raw_scores": True}])
    assert set(logits) == {"label", "logits"} and logits["label"] == probabilities["label"]
    values = np.array([logits["logits"][label] for label in classifier.labels])
    np.testing.assert_allclose(np.exp(values) / np.exp(values).sum(),
                               [probabilities["probabilities"][label] for label in classifier.labels], atol=1e-6)
    ranker = served(tiny_cross_encoder, task="rerank")
    score, raw = ranker.predict([["fox", "dog"], {"query": "fox", "document": "dog", "raw_scores": True}])
    assert score == pytest.approx(1 / (1 + np.exp(-raw)), abs=1e-6)
    assert ranker.metadata()["labels"] == ["LABEL_0"]
    assert classifier.metadata()["labels"] == ["negative", "positive"]


def test_all_tokens_are_sentence_transformers_token_embeddings(tiny_st_mean):
    from sentence_transformers import SentenceTransformer

    model = served(tiny_st_mean)
    rows = model.predict([{"text": text, "all_tokens": True} for text in TEXTS] + [{"text": "a", "all_tokens": 1}])
    expected = SentenceTransformer(str(tiny_st_mean), device="cpu").encode(TEXTS, output_value="token_embeddings")
    for got, want in zip(rows, expected):
        assert got.shape == tuple(want.shape)  # the real tokens only: no padding rows
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    assert isinstance(rows[-1], InputError)


def test_classifier_takes_pairs_as_transformers_scores_them(tiny_bert_classifier):
    """A pair is tokenizer(text, text_pair): its logits are transformers' own, beside single texts in one batch,
    and an over-long pair asked to be truncated is cut longest first, as text-embeddings-inference cuts it."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert_classifier))
    reference = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_classifier)).eval()

    def logits(text, text_pair=None, **options):
        with torch.inference_mode():
            return reference(**tokenizer(text, text_pair, return_tensors="pt", **options)).logits[0].numpy()

    classifier = served(tiny_bert_classifier, task="classification", max_length=20)
    pair, single, long_pair, refused, prompted = classifier.predict([
        {"text": "lazy dog", "text_pair": "the quick brown fox", "raw_scores": True, "count_tokens": True},
        {"text": "lazy dog", "raw_scores": True},
        {"text": LONG, "text_pair": "lazy dog", "raw_scores": True, "truncate": True, "count_tokens": True},
        {"text": LONG, "text_pair": "lazy dog"},
        {"text": "a", "text_pair": "b", "prompt_name": "query"},
    ])
    labels = classifier.labels
    np.testing.assert_allclose([pair["logits"][label] for label in labels], logits("lazy dog", "the quick brown fox"),
                               atol=1e-5)
    assert pair["tokens"] == len(tokenizer("lazy dog", "the quick brown fox")["input_ids"])
    np.testing.assert_allclose([single["logits"][label] for label in labels], logits("lazy dog"), atol=1e-5)
    assert not np.allclose(logits("lazy dog"), logits("lazy dog", "the quick brown fox"))  # the pair mattered
    assert long_pair["tokens"] == 20
    np.testing.assert_allclose([long_pair["logits"][label] for label in labels],
                               logits(LONG, "lazy dog", truncation="longest_first", max_length=20), atol=1e-5)
    assert isinstance(refused, InputError) and "more than this model's limit of 20" in str(refused)
    assert isinstance(prompted, InputError) and "dual inputs" in str(prompted)
    [wrong] = classifier.predict([{"text": "a", "text_pair": 3}])
    assert isinstance(wrong, InputError) and "text_pair" in str(wrong)
    embedder_refuses = classifier.predict([{"text": "a", "text_pair": "b", "normalize": True}])[0]
    assert isinstance(embedder_refuses, InputError)
