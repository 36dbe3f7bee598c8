"""Shared fixtures: tiny local transformers models, and real broker / worker / gateway processes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.processes import Process, free_port, python_module  # noqa: E402

WORDS = "the a quick brown fox jumps over lazy dog model serving batch request reply worker broker".split()


def _tokenizer_of_vocab(directory: Path, tokenizer_class, **options):
    """The tokenizer of directory/vocab.txt, saved beside it. BertTokenizerFast(vocab_file=...) keeps
    only the special tokens with this transformers, so every word would be [UNK]; from_pretrained
    reads the whole vocabulary. Checked, so that the tiny models always see real tokens."""
    tokenizer = tokenizer_class.from_pretrained(str(directory), do_lower_case=True, **options)
    ids = tokenizer(" ".join(WORDS))["input_ids"]
    assert tokenizer.unk_token_id not in ids and len(ids) == len(WORDS) + 2, ids
    tokenizer.save_pretrained(directory)
    return tokenizer


def _build_tiny_bert(directory: Path, task: str) -> Path:
    """A random-weight BERT small enough to build and run in a second, with its own vocabulary."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = _tokenizer_of_vocab(directory, BertTokenizerFast)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
    )
    torch.manual_seed(0)
    model = BertModel(config) if task == "embedding" else BertForSequenceClassification(config)
    model.save_pretrained(directory)
    return directory


def _build_sentence_transformer(directory: Path, base: Path, pooling: str | tuple, normalize: bool = True,
                                max_seq_length: int | None = None, dense: bool = False, prompt: str = "",
                                include_prompt: bool = True) -> Path:
    """A sentence-transformers directory over a tiny BERT, saved by sentence-transformers itself."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    transformer = Transformer(str(base), max_seq_length=max_seq_length)
    pooled = Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling, include_prompt=include_prompt)
    modules = [transformer, pooled]
    if dense:
        torch.manual_seed(1)
        modules.append(Dense(pooled.get_embedding_dimension(), 16))
    if normalize:
        modules.append(Normalize())
    prompts = {"query": prompt} if prompt else None
    model = SentenceTransformer(modules=modules, prompts=prompts, default_prompt_name="query" if prompt else None)
    model.save(str(directory))
    return directory


def _build_cross_encoder(directory: Path) -> Path:
    """A random-weight BERT cross-encoder: sequence classification with one label, as rerankers are."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = _tokenizer_of_vocab(directory, BertTokenizerFast, model_max_length=48)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1)
    torch.manual_seed(2)
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return _build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), "embedding")


@pytest.fixture(scope="session")
def tiny_bert_classifier(tmp_path_factory) -> Path:
    return _build_tiny_bert(tmp_path_factory.mktemp("tiny-bert-cls"), "classification")


@pytest.fixture(scope="session")
def tiny_st_cls(tmp_path_factory, tiny_bert) -> Path:
    """CLS-pooled and normalised, with a short max_seq_length (16) that long inputs pass."""
    return _build_sentence_transformer(tmp_path_factory.mktemp("tiny-st-cls"), tiny_bert, "cls", max_seq_length=16)


@pytest.fixture(scope="session")
def tiny_st_mean(tmp_path_factory, tiny_bert) -> Path:
    """Mean-pooled and normalised; its limit is its tokenizer's, within the model's 128 positions."""
    return _build_sentence_transformer(tmp_path_factory.mktemp("tiny-st-mean"), tiny_bert, "mean")


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory) -> Path:
    return _build_cross_encoder(tmp_path_factory.mktemp("tiny-cross-encoder"))


class Stack:
    """Real broker and worker processes on random ports; everything is stopped strictly at the end."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.processes: list[Process] = []
        self.frontend = self.backend = ""

    def start_broker(self, *flags: str, frontend: str = "tcp://127.0.0.1:0",
                     backend: str = "tcp://127.0.0.1:0") -> Process:
        broker = self._spawn("broker", "--frontend", frontend, "--backend", backend, *flags)
        match = broker.wait_for_output(r"broker ready frontend=(\S+) backend=(\S+)", timeout_s=30)
        self.frontend, self.backend = match.group(1), match.group(2)
        return broker

    def start_worker(self, *flags: str, wait: bool = True, prefix: tuple[str, ...] = (),
                     broker: str | None = None, echo_test_directives: bool = True) -> Process:
        """An echo worker obeys test directives ({"sleep_s": ...}, {"exit": ...}) unless told not to."""
        if echo_test_directives and _serves_echo(flags):
            flags = (*flags, "--echo-test-directives")
        worker = self._spawn("worker", "--broker", broker or self.backend, *flags, prefix=prefix)
        if wait:
            worker.wait_for_output(r"worker ready", timeout_s=120)
        return worker

    def start_gateway(self, *flags: str) -> tuple[Process, str]:
        port = free_port()
        gateway = self._spawn("gateway", "--broker", self.frontend, "--bind", f"127.0.0.1:{port}", *flags)
        return gateway, f"http://127.0.0.1:{port}"

    def _spawn(self, module: str, *flags: str, prefix: tuple[str, ...] = ()) -> Process:
        index = len(self.processes)
        process = Process([*prefix, *python_module(module, *flags)], self.tmp_path / f"{index:02d}-{module}.log")
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        # Gateways and workers first, so the broker's drain has nobody left to wait for. They are all
        # told at once, so that they drain side by side; then each is waited for (stop() is strict).
        failures = []
        for process in self.processes:
            if process.args[2] != "broker" and process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        for process in sorted(self.processes, key=lambda p: p.args[2] == "broker"):
            try:
                process.stop()
            except BaseException as error:  # stop every process even if one fails the test
                failures.append(error)
        if failures:
            raise failures[0]


def _serves_echo(flags: tuple[str, ...]) -> bool:
    return any(flag == "--model" and value == "echo" for flag, value in zip(flags, flags[1:])) \
        or "--model=echo" in flags


@pytest.fixture
def stack(tmp_path):
    stack = Stack(tmp_path)
    yield stack
    stack.stop_all()


@pytest.fixture(scope="module")
def module_stack(tmp_path_factory):
    """One stack for a module whose tests only read from it (they must not stop its processes)."""
    stack = Stack(tmp_path_factory.mktemp("stack"))
    yield stack
    stack.stop_all()


class NetNamespace:
    """A test host: a Linux network namespace joined to this one by a veth pair.

    This side of the link is host_ip, the namespace's side ns_ip (a private /30 that exists only
    between the two ends of the pair). Commands run inside with `prefix`.
    """

    def __init__(self):
        import random
        import subprocess

        tag = f"{os.getpid() % 10000}{random.randrange(100):02d}"
        self.name, self.host_if, self.ns_if = f"ddml{tag}", f"dh{tag}", f"dn{tag}"
        octet, base = random.randrange(1, 255), random.randrange(0, 64) * 4
        self.host_ip, self.ns_ip = f"10.237.{octet}.{base + 1}", f"10.237.{octet}.{base + 2}"
        self._run = lambda *args: subprocess.run(args, check=True, capture_output=True, timeout=10)
        self._run("ip", "netns", "add", self.name)
        try:
            self._run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            self._run("ip", "link", "set", self.ns_if, "netns", self.name)
            self._run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            self._run("ip", "link", "set", self.host_if, "up")
            self._run("ip", "netns", "exec", self.name, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
            self._run("ip", "netns", "exec", self.name, "ip", "link", "set", self.ns_if, "up")
            self._run("ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise
        self.prefix = ("ip", "netns", "exec", self.name)

    def set_link(self, up: bool) -> None:
        self._run("ip", "link", "set", self.host_if, "up" if up else "down")

    def delete(self) -> None:
        import subprocess

        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)


@pytest.fixture
def netns():
    """A network namespace test host; skips, saying why, where namespaces cannot be made."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (`ip`)")
    try:
        namespace = NetNamespace()
    except subprocess.CalledProcessError as error:
        pytest.skip(f"cannot create a network namespace here: {error.stderr.decode(errors='replace').strip()}")
    yield namespace
    namespace.delete()
