"""How a built-in text model's batch is cut into passes (worker/passes.py: sorted_passes), and how
the task picks the handler class and the form of its inputs (pure logic, no model loaded)."""

import pytest

from worker.models import InputError
from worker.models.hf_text import HFTextModel
from worker.models.text_classify import TextClassifier
from worker.models.text_embedding import TextEmbedding
from worker.models.text_inputs import TextInputs
from worker.models.text_rerank import TextReranker
from worker.passes import pass_size, sorted_passes


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
