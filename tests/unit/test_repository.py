"""The model repository file: what it accepts, and the clear error for what it does not."""

from __future__ import annotations

import pytest

from ddml_common.repository import Placement, RepositoryError, load_repository, parse_repository

FLAGS = {"handler", "model-path", "task", "max-batch-size", "pooling", "echo-test-directives", "labels"}


def parse(text: str):
    return parse_repository(text, "repo.toml", FLAGS)


def test_model_tables_give_worker_flags_and_placement_apart():
    repo = parse("""
        [models.minilm]
        max-batch-size = 32
        pooling = "mean"
        min-replicas = 1
        max-replicas = 3
        idle-unload-s = 60
        memory-mb = 250.5

        [models.echo]
        echo-test-directives = true
        labels = ["text", "image"]
    """)
    assert set(repo.models) == {"minilm", "echo"}
    minilm = repo.models["minilm"]
    assert minilm.flags == {"max-batch-size": 32, "pooling": "mean"}
    assert minilm.placement == Placement(min_replicas=1, max_replicas=3, idle_unload_s=60.0, memory_mb=250.5)
    echo = repo.models["echo"]
    assert echo.flags == {"echo-test-directives": True, "labels": ["text", "image"]}  # passed through as given
    assert echo.placement == Placement()
    assert repo.describe()["minilm"] == {"min": 1, "max": 3, "idle_unload_s": 60.0, "memory_mb": 250.5}


@pytest.mark.parametrize("text, complaint", [
    ("[models.a]\nbroker = 'tcp://x:1'\n", "[models.a]: unknown setting 'broker'"),
    ("[models.a]\nmodel = 'b'\n", "'model' is the table's name"),
    ("[models.a]\nmin-replicas = -1\n", "min-replicas: must be an integer of at least 0"),
    ("[models.a]\nmax-replicas = 0\n", "max-replicas: must be an integer of at least 1"),
    ("[models.a]\nmin-replicas = 2\nmax-replicas = 1\n", "min-replicas (2) exceeds max-replicas (1)"),
    ("[models.a]\nidle-unload-s = 0\n", "idle-unload-s: must be a positive finite number"),
    ("[models.a]\nmemory-mb = -5\n", "memory-mb: must be a non-negative finite number"),
    ("[models.a]\nmemory-mb = nan\n", "memory-mb: must be a non-negative finite number"),
    ("[models.a]\nmin-replicas = 1.5\n", "min-replicas: must be an integer"),
    ("[models.a]\nhandler = {x = 1}\n", "handler: must be a string, number, boolean or array"),
    ("[models.\"a@1\"]\n", "without '@'"),
    ("[models]\n", "no models"),
    ("models = 3\n", "no models"),
    ("[model.a]\n", "unknown top-level key 'model'"),
    ("[models.a\n", "not valid TOML"),
    ("[models]\na = 3\n", "[models.a]: must be a table"),
])
def test_a_bad_repository_is_refused_naming_the_file_table_and_key(text, complaint):
    with pytest.raises(RepositoryError) as error:
        parse(text)
    assert complaint in str(error.value)
    assert str(error.value).startswith("repo.toml")


def test_an_unreadable_file_is_a_repository_error(tmp_path):
    with pytest.raises(RepositoryError, match="cannot read repository"):
        load_repository(str(tmp_path / "missing.toml"), FLAGS)
    path = tmp_path / "repo.toml"
    path.write_text("[models.a]\ntask = 'rerank'\n")
    assert load_repository(str(path), FLAGS).models["a"].flags == {"task": "rerank"}


def test_a_models_declared_tensors_in_tritons_spelling_become_its_input_and_output_flags():
    text = """
[models.classifier]
model-path = "model.pt2"
inputs = [{name = "IMAGE", datatype = "fp32", dims = [3, 224, 224]}]
outputs = [{name = "PROBS", datatype = "FP32", dims = [1000]}, {name = "CLASSES", datatype = "INT64", dims = [-1]}]
"""
    entry = parse_repository(text, "models.toml", {"model-path", "input", "output"}).models["classifier"]
    assert entry.flags["input"] == ["IMAGE:FP32:3,224,224"]
    assert entry.flags["output"] == ["PROBS:FP32:1000", "CLASSES:INT64:-1"]


def test_a_declared_tensor_that_is_not_one_is_refused_with_where_it_is():
    text = """
[models.classifier]
inputs = [{name = "IMAGE", datatype = "FLOAT", dims = [3]}]
"""
    with pytest.raises(RepositoryError, match=r"\[models.classifier\] inputs: .*datatype must be one of"):
        parse_repository(text, "models.toml", {"input", "output"})
