"""How a built-in text model's batch is cut into passes (worker/passes.py: sorted_passes), and how
the task picks the handler class and the form of its inputs (pure logic, no model loaded); and, on
a tiny local BERT (built in a second), how many model calls a pass without padding takes."""

import pytest

from worker.models import InputError
from worker.models.hf_text import HFTextModel
from worker.models.text_classify import TextClassifier
from worker.models.text_embedding import TextEmbedding
from worker.models.text_inputs import TextInputs
from worker.models.text_rerank import TextReranker
from tests.conftest import WORDS
from worker.passes import pass_size, plan_pass, sorted_passes


def test_passes_hold_at_most_most_inputs_shortest_first():
    assert sorted_passes([5, 1, 4, 2, 3], most_inputs=2, cost_budget=10_000) == [[1, 3], [4, 2], [0]]


def test_a_pass_closes_before_its_padded_tokens_exceed_the_budget():
    # Sorted lengths 2, 3, 8, 9: {2, 3} pads to 2 × 3 = 6; adding 8 would pad to 3 × 8 = 24 > 20.
    assert sorted_passes([8, 2, 9, 3], most_inputs=16, cost_budget=20) == [[1, 3], [0, 2]]


def test_an_input_over_the_budget_alone_still_runs_in_a_pass_of_its_own():
    assert sorted_passes([50, 2, 3], most_inputs=16, cost_budget=20) == [[1, 2], [0]]


def test_equal_lengths_keep_their_order():
    assert sorted_passes([4, 4, 1, 4], most_inputs=2) == [[2, 0], [1, 3]]


def test_every_input_lands_in_exactly_one_pass():
    lengths = [(i * 37) % 61 + 1 for i in range(64)]
    passes = sorted_passes(lengths, most_inputs=16, cost_budget=2048)
    assert sorted(k for p in passes for k in p) == list(range(64))
    assert all(len(p) <= 16 and max(lengths[k] for k in p) * len(p) <= 2048 for p in passes)
    in_order = [lengths[k] for p in passes for k in p]
    assert in_order == sorted(lengths)


def test_unpadded_a_pass_closes_before_the_sum_of_its_tokens_exceeds_the_budget():
    # 15 inputs of 10 tokens and one of 100: 250 tokens in all, but 16 × 100 = 1600 padded.
    costs = [10] * 7 + [100] + [10] * 8
    assert sorted_passes(costs, most_inputs=16, cost_budget=1024) == [[*range(7), *range(8, 16)], [7]]
    assert sorted_passes(costs, most_inputs=16, cost_budget=1024, padded=False) == [[*range(7), *range(8, 16), 7]]
    assert sorted_passes([8, 2, 9, 3], most_inputs=16, cost_budget=13, padded=False) == [[1, 3, 0], [2]]
    assert sorted_passes([50, 2, 3], most_inputs=16, cost_budget=20, padded=False) == [[1, 2], [0]]


def test_unpadded_passes_keep_every_bound_and_every_input():
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.lists(st.integers(1, 80), max_size=70), st.integers(1, 20), st.integers(0, 600), st.integers(0, 8))
    def bounded(costs, most, budget, least):
        passes = sorted_passes(costs, most, budget, least, padded=False)
        assert [costs[k] for p in passes for k in p] == sorted(costs)
        assert sorted(k for p in passes for k in p) == list(range(len(costs)))
        for p in passes:
            assert 1 <= len(p) <= max(1, pass_size(len(costs), most, least))
            assert not budget or len(p) == 1 or sum(costs[k] for k in p) <= budget

    bounded()


def test_a_small_batch_still_runs_as_two_sorted_halves_down_to_least_inputs():
    def sizes(n: int) -> list[int]:
        return [len(p) for p in sorted_passes([1] * n, most_inputs=16, cost_budget=10**9, least_inputs=8)]

    assert sizes(64) == [16, 16, 16, 16]
    assert sizes(24) == [12, 12]
    assert sizes(16) == [8, 8]
    assert sizes(10) == [8, 2]
    assert sizes(8) == [8]
    assert sizes(0) == []


def test_pass_size_halves_only_with_least_inputs():
    assert pass_size(10, most_inputs=16) == 16
    assert [pass_size(n, most_inputs=16, least_inputs=8) for n in (1, 16, 17, 18, 40)] == [8, 8, 9, 9, 16]


def test_the_task_picks_the_handler_class_once(tmp_path):
    assert type(HFTextModel(model_path=str(tmp_path))) is TextEmbedding
    assert type(HFTextModel(model_path=str(tmp_path), task="embedding")) is TextEmbedding
    assert type(HFTextModel(model_path=str(tmp_path), task="classification")) is TextClassifier
    assert type(HFTextModel("cpu", str(tmp_path), "rerank")) is TextReranker
    assert type(TextReranker(model_path=str(tmp_path))) is TextReranker
    with pytest.raises(ValueError, match="task must be one of embedding, classification, rerank, got 'translate'"):
        HFTextModel(model_path=str(tmp_path), task="translate")
    with pytest.raises(ValueError, match="TextReranker serves --task rerank, not embedding"):
        TextReranker(model_path=str(tmp_path), task="embedding")


def test_pooling_is_an_embedding_option_only(tmp_path):
    assert HFTextModel(model_path=str(tmp_path), pooling="cls+mean").pooling_override == ("cls", "mean")
    with pytest.raises(ValueError, match="--pooling applies to --task embedding, not rerank"):
        HFTextModel(model_path=str(tmp_path), task="rerank", pooling="cls")


def read(handler_class, value):
    """One input parsed by the task's form (no tokenizer: parsing comes before tokenising)."""
    return TextInputs(None, None, handler_class.form, max_tokens=16, auto_truncate=False)._parse(0, value)


def test_each_task_reads_its_own_form_of_input():
    assert read(TextEmbedding, "a").text == "a"
    assert read(TextClassifier, {"text": "a", "text_pair": "b"}).text == ("a", "b")
    assert read(TextReranker, ["q", "d"]).text == ("q", "d")
    assert read(TextReranker, {"query": "q", "document": "d", "raw_scores": True}).raw_scores
    with pytest.raises(InputError, match=r"a rerank input is \{'query': str, 'document': str\} or \[query, document\]"):
        read(TextReranker, "a")
    with pytest.raises(InputError, match="unknown field 'text_pair' in an input \\(it takes text, truncate"):
        read(TextEmbedding, {"text": "a", "text_pair": "b"})
    with pytest.raises(InputError, match="unknown field 'x' in an input \\(it takes text, text_pair, truncate"):
        read(TextClassifier, {"text": "a", "x": 1})


@pytest.mark.parametrize(("handler_class", "option", "message"), [
    (TextEmbedding, "raw_scores", "applies to classification and rerank models, not embedding"),
    (TextClassifier, "normalize", "applies to embedding models, not classification"),
    (TextReranker, "all_tokens", "applies to embedding models, not rerank"),
])
def test_an_option_of_another_task_fails_the_input_alone(handler_class, option, message):
    value = {"query": "q", "document": "d"} if handler_class is TextReranker else {"text": "a"}
    with pytest.raises(InputError, match=f"input field '{option}' {message}"):
        read(handler_class, {**value, option: True})


def test_the_text_model_modules_import_neither_torch_nor_transformers_until_a_model_loads():
    # In a fresh interpreter, so that whatever the imports reach, at any depth, is in sys.modules.
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; import worker.models.hf_text, worker.models.text_embedding, worker.models.text_classify, "
            "worker.models.text_rerank, worker.models.unpadded; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def greedy_passes(costs: list[int], most: int, budget: int) -> list[list[int]]:
    """The rule sorted_passes() keeps, written out: in cost order, close a pass before an input
    would take it past most inputs or past budget padded tokens."""
    passes, current = [], []
    for k in sorted(range(len(costs)), key=lambda k: (costs[k], k)):
        if current and (len(current) + 1 > most or costs[k] * (len(current) + 1) > budget):
            passes.append(current)
            current = []
        current.append(k)
    return passes + ([current] if current else [])


def test_sorted_passes_close_each_pass_where_the_greedy_rule_does():
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.lists(st.integers(1, 80), max_size=70), st.integers(1, 20), st.integers(1, 600))
    def same(costs, most, budget):
        assert sorted_passes(costs, most, budget) == greedy_passes(costs, most, budget)

    same()


# ------------------------------------------------------------------ model calls, on a tiny BERT

SHORT = " ".join(WORDS[:8])  # 10 tokens with [CLS] and [SEP]
LONGER = " ".join((WORDS * 7)[:98])  # 100 tokens


def served(path, **options) -> HFTextModel:
    model = HFTextModel(device="cpu", model_path=str(path), **options)
    model.init_model()
    return model


def model_calls(model, monkeypatch) -> list[int]:
    """The inputs of each call of the model (the unpadded encoder) from now on."""
    calls = []
    hidden = model._unpadded.hidden

    def counted(features, device):
        calls.append(len(features))
        return hidden(features, device)

    monkeypatch.setattr(model._unpadded, "hidden", counted)
    return calls


def assert_same_vectors(got, want):
    import numpy as np

    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    cosines = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosines.min() >= 0.9999
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)  # as the unpadded tests of test_text_models


def test_a_continuous_workers_unpadded_pass_runs_as_one_model_call(tiny_st_mean, monkeypatch):
    """Regression: the worker formed the pass within the budget on the sum of tokens, and the
    handler cut it again against the padded budget: model calls of 15 and 1."""
    model = served(tiny_st_mean)
    assert not model.padded  # a CPU's default: passes without padding
    texts = [SHORT] * 7 + [LONGER] + [SHORT] * 8
    prepared = model.prepare(texts)
    costs = [model.cost(p) for p in prepared]
    assert sorted(costs) == [10] * 15 + [100]
    most, budget, _ = model.pass_limits()
    assert sum(costs) <= budget < len(costs) * max(costs)  # within the budget summed, not padded
    assert plan_pass(costs, [0] * len(costs), most, budget, padded=False) == list(range(16))  # the worker's pass
    calls = model_calls(model, monkeypatch)
    got = model.predict(prepared)
    assert calls == [16]
    assert_same_vectors(got, served(tiny_st_mean, unpadded="off").predict(texts))


def test_an_unpadded_batch_is_cut_by_the_sum_of_its_tokens(tiny_st_mean, monkeypatch):
    """A batch whole (--continuous off): halves of 16 sorted inputs, the second of 14 × 10 and
    2 × 100 tokens (340 in all, 1600 padded) in one call, not cut into 14 and 2."""
    model = served(tiny_st_mean)
    texts = [SHORT] * 20 + [LONGER] + [SHORT] * 10 + [LONGER]
    calls = model_calls(model, monkeypatch)
    got = model.predict(texts)
    assert calls == [16, 16]
    assert_same_vectors(got, served(tiny_st_mean, unpadded="off").predict(texts))


def test_a_padded_pass_keeps_the_padded_budget(tiny_st_mean):
    model = served(tiny_st_mean, unpadded="off")
    assert model.padded
    texts = [SHORT] * 20 + [LONGER] + [SHORT] * 10 + [LONGER]
    passes = sorted_passes([model.cost(p) for p in model.prepare(texts)], *model.pass_limits()[:2],
                           model.least_pass_size, padded=model.padded)
    assert [len(p) for p in passes] == [16, 14, 2]
