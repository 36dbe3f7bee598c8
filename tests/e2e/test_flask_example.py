"""examples/flask_app.py: the seed's POST /api/distributed, on a real Dispatcher."""

import importlib.util

import pytest

from gateway import Dispatcher
from tests.handlers import ReverseModel
from tests.processes import REPO

pytestmark = pytest.mark.e2e


def load_example():
    spec = importlib.util.spec_from_file_location("flask_app", REPO / "examples" / "flask_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flask_example_answers_a_json_list_in_form_order():
    example = load_example()
    with Dispatcher(ReverseModel, batch_size=8, worker_num=1) as dispatcher:
        client = example.create_app(dispatcher).test_client()
        response = client.post("/api/distributed", data={"text": ["hello", "world", "abc"]})
        empty = client.post("/api/distributed", data={})
    assert response.status_code == 200
    assert [o["reversed"] for o in response.get_json()] == ["olleh", "dlrow", "cba"]
    assert empty.status_code == 400
    assert issubclass(example.ManagedBertModel, example.Manager)
