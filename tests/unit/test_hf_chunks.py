"""How the built-in text model cuts a length-sorted batch into forward passes (pure logic)."""

from worker.models.hf_text import HFTextModel


def chunks(tmp_path, lengths: list[int], max_chunk: int, chunk_tokens: int) -> list[list[int]]:
    model = HFTextModel(model_path=str(tmp_path), max_chunk=max_chunk, chunk_tokens=chunk_tokens)
    order = sorted(range(len(lengths)), key=lambda k: lengths[k])
    return list(model._chunks(order, [lengths[k] for k in order]))


def test_passes_hold_at_most_max_chunk_inputs_shortest_first(tmp_path):
    assert chunks(tmp_path, [5, 1, 4, 2, 3], max_chunk=2, chunk_tokens=10_000) == [[1, 3], [4, 2], [0]]


def test_a_pass_closes_before_its_padded_tokens_exceed_the_budget(tmp_path):
    # Sorted lengths 2, 3, 8, 9: {2, 3} pads to 2 × 3 = 6; adding 8 would pad to 3 × 8 = 24 > 20.
    assert chunks(tmp_path, [8, 2, 9, 3], max_chunk=16, chunk_tokens=20) == [[1, 3], [0, 2]]


def test_every_input_lands_in_exactly_one_pass(tmp_path):
    lengths = [(i * 37) % 61 + 1 for i in range(64)]
    passes = chunks(tmp_path, lengths, max_chunk=16, chunk_tokens=2048)
    assert sorted(k for p in passes for k in p) == list(range(64))
    assert all(len(p) <= 16 and max(lengths[k] for k in p) * len(p) <= 2048 for p in passes)


def test_a_small_batch_still_runs_as_two_sorted_halves_down_to_min_chunk(tmp_path):
    model = HFTextModel(model_path=str(tmp_path), max_chunk=16, chunk_tokens=10**9)
    model.min_chunk = 8

    def sizes(n: int) -> list[int]:
        return [len(p) for p in model._chunks(list(range(n)), [1] * n)]

    assert sizes(64) == [16, 16, 16, 16]
    assert sizes(24) == [12, 12]
    assert sizes(16) == [8, 8]
    assert sizes(10) == [8, 2]
    assert sizes(8) == [8]
