"""SFT on a real Hugging Face checkpoint and conversational data, end to end through `python -m r1jax.main`, then
export and load in `transformers` — the commands of docs/real_models.md at small sizes.

Two checkpoint families saved by `transformers` (tests/hf_fixtures.py): Qwen2 with the Qwen2.5 ChatML template in
tokenizer_config.json (run with configs/sft.py:hf) and Llama-3 with its header-token template and two EOS ids
(configs/distill.py:hf). Only init_from, the data file, field names and sizes are overridden. Checked:
- the loss mask of the batches the stage builds covers exactly the assistant turns of transformers'
  `apply_chat_template` rendering (every assistant turn, its end-of-turn token included, nothing else);
- `python -m r1jax.hf --in RUN --out DIR` loads in transformers with max |Δlogit| <= 1e-4 (fp32) against r1jax on
  the run's weights, and brings the source's tokenizer, chat template and every EOS id;
- bad input: a missing / wrong-typed mapped field fails in seconds before the model is loaded (file:line, field,
  config key); an all-skipped run exits non-zero with the counts, without a traceback; SIGTERM while the data layer
  searches past skipped records ends the run as preempted, with the last step saved.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import REPO, subprocess_env
from hf_fixtures import hf_checkpoints, write_messages  # noqa: F401 (fixture)

pytest.importorskip("transformers")

SIZES = ["--config.data.seq_len=256", "--config.data.batch_size=2", "--config.train.micro_batches=1",
         "--config.train.steps=3"]
PRESETS = {"qwen2": "configs/sft.py:hf", "llama3": "configs/distill.py:hf"}
N_RECORDS = 12


def main_cmd(preset, workdir, *overrides):
    return [sys.executable, "-m", "r1jax.main", "--config", preset, "--workdir", str(workdir), *overrides]


def run(cmd, env, timeout=240, **kw):
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    return result


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return subprocess_env(cache_dir=tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    return write_messages(str(tmp_path_factory.mktemp("data") / "chat.jsonl"), N_RECORDS)


HUB_ID = "meta-llama/Llama-3.2-1B-Instruct"  # the Llama-3 fixture, as a Hub id in a local cache


def hub_cache(root, repo_id, checkpoint):
    """A Hugging Face cache at `root` laid out as huggingface_hub lays it out (refs/main -> snapshots/<commit>/)
    holding `checkpoint` as `repo_id`; returns the snapshot directory."""
    import shutil

    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    return str(repo / "snapshots" / commit)


@pytest.fixture(scope="module")
def sft_runs(hf_checkpoints, chat_file, env, tmp_path_factory):  # noqa: F811
    """{family: (checkpoint dir, run dir, export dir)}: 3 SFT steps with the :hf preset, then the export. The
    Llama-3 run names its checkpoint by a Hub id, resolved through the local cache (HF_HUB_OFFLINE: no network)."""
    out = {}
    for family, preset in PRESETS.items():
        ckpt, init_from, run_env = hf_checkpoints(family), hf_checkpoints(family), env
        base = tmp_path_factory.mktemp(f"sft_{family}")
        if family == "llama3":
            ckpt = hub_cache(base / "hub", HUB_ID, ckpt)
            init_from, run_env = HUB_ID, {**env, "HF_HUB_CACHE": str(base / "hub"), "HF_HUB_OFFLINE": "1"}
        workdir, export = base / "run", base / "export"
        result = run(main_cmd(preset, workdir, f"--config.init_from={init_from}",
                              f"--config.data.train_files=('{chat_file}',)", "--config.data.messages_field=messages",
                              *SIZES), run_env)
        assert result.returncode == 0, result.stderr[-3000:]
        result = run([sys.executable, "-m", "r1jax.hf", "--in", str(workdir), "--out", str(export)], env)
        assert result.returncode == 0, result.stderr[-3000:]
        out[family] = (ckpt, str(workdir), str(export))
    return out


def stage_config(family, ckpt, chat_file):
    """The config the stage ran with (its preset and the test's overrides), built in-process."""
    import importlib.util

    path, _, arg = PRESETS[family].partition(":")
    spec = importlib.util.spec_from_file_location("_stage_config", os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.init_from = ckpt
    config.data.train_files = (chat_file,)
    config.data.seq_len, config.data.batch_size, config.train.steps = 256, 2, 3
    return config


@pytest.mark.parametrize("family", list(PRESETS))
def test_sft_run_records_the_source(sft_runs, family):
    ckpt, workdir, _ = sft_runs[family]
    result = json.load(open(os.path.join(workdir, "result.json")))
    assert result["status"] == "done" and result["metrics"]["step"] == 3
    assert result["outputs"]["tokenizer"] == os.path.abspath(ckpt)  # what export needs: the source's directory
    if family == "llama3":  # the Hub id's snapshot in the local cache
        assert "/snapshots/" in ckpt and f"models--{HUB_ID.replace('/', '--')}" in ckpt
    assert np.isfinite(result["metrics"]["loss"]) and result["metrics"]["data/skipped_total"] == 0
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["model"]["preset"] == "qwen2.5_math_1.5b"  # the :hf preset's numerics; the size is the checkpoint's


def _segments(batch):
    """[(token ids of the document, the trained target runs as lists of ids)] of every packed document."""
    out = []
    for inputs, targets, mask, segs in zip(batch["inputs"], batch["targets"], batch["loss_mask"],
                                           batch["segment_ids"]):
        for s in sorted(set(segs.tolist()) - {0}):
            where = np.flatnonzero(segs == s)
            ids = list(inputs[where])  # the whole document (its last target is padding)
            runs, current = [], []
            for i in where:
                if mask[i]:
                    current.append(int(targets[i]))
                elif current:
                    runs.append(current)
                    current = []
            runs += [current] if current else []
            out.append((ids, runs))
    return out


@pytest.mark.parametrize("family", list(PRESETS))
def test_loss_mask_is_exactly_the_assistant_turns(sft_runs, chat_file, family):
    """The batches the stage builds, against transformers' rendering of each conversation: the document is
    apply_chat_template's text, and the trained tokens are exactly each assistant turn as the template writes it
    (ChatML: content + `<|im_end|>\\n`; Llama-3: content + `<|eot_id|>`)."""
    import transformers

    from r1jax.data.tokenizer import load_tokenizer
    from r1jax.stages import sft

    ckpt = sft_runs[family][0]
    hf_tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    config = stage_config(family, ckpt, chat_file)
    tok = load_tokenizer(ckpt)
    records = [json.loads(line)["messages"] for line in open(chat_file)]
    by_text = {hf_tok.apply_chat_template(m, tokenize=False): m for m in records}
    end = {"qwen2": "<|im_end|>\n", "llama3": "<|eot_id|>"}[family]
    seen = set()
    for batch in sft.make_dataset(config, tok, [chat_file], train=False):
        for ids, runs in _segments(batch):
            text = hf_tok.decode(ids, skip_special_tokens=False)
            assert text in by_text, text
            messages = by_text[text]
            assert [hf_tok.decode(r, skip_special_tokens=False) for r in runs] == \
                [m["content"] + end for m in messages if m["role"] == "assistant"]
            seen.add(text)
    assert len(seen) == N_RECORDS  # every conversation trained once (one epoch, nothing skipped)


def test_prompt_response_records_through_the_chat_template(hf_checkpoints, tmp_path):  # noqa: F811
    """data.template="checkpoint" with prompt/response records (a system field too): each record is the chat
    template's system + user + assistant conversation, and only the assistant turn is trained."""
    import transformers

    from r1jax.data.tokenizer import load_tokenizer
    from r1jax.stages import sft

    ckpt = hf_checkpoints("qwen2")
    records = [{"problem": f"What is {i} + {i}?", "generation": f"<answer> {2 * i} </answer>", "sys": "Be brief."}
               for i in range(6)]
    path = _lines(tmp_path / "pairs.jsonl", records)
    config = stage_config("qwen2", ckpt, path)
    config.data.messages_field, config.data.prompt_field, config.data.response_field = "", "problem", "generation"
    config.data.system_field = "sys"
    hf_tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    want = {hf_tok.apply_chat_template([{"role": "system", "content": r["sys"]},
                                        {"role": "user", "content": r["problem"]},
                                        {"role": "assistant", "content": r["generation"]}], tokenize=False):
            r["generation"] + "<|im_end|>\n" for r in records}
    got = {}
    for batch in sft.make_dataset(config, load_tokenizer(ckpt), [path], train=False):
        for ids, runs in _segments(batch):
            got[hf_tok.decode(ids)] = "".join(hf_tok.decode(r) for r in runs)
    assert got == want


def test_aot_reads_the_architecture_from_config_json(tmp_path):
    """The AOT check with init_from a directory holding only config.json (Qwen2.5-7B's released numbers): the
    checkpoint's architecture with the :hf preset's training numerics (chunked attention and logits, remat)."""
    import importlib.util

    from r1jax import aot
    from r1jax.models.transformer import count_params

    config_json = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                   "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
                   "tie_word_embeddings": False, "use_sliding_window": False}
    (tmp_path / "config.json").write_text(json.dumps(config_json))
    spec = importlib.util.spec_from_file_location("_r1_zero", os.path.join(REPO, "configs/r1_zero.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("hf")
    preset, _ = aot.stage_model(config)  # the placeholder init_from: the preset itself
    config.init_from = str(tmp_path)
    cfg, source = aot.stage_model(config)
    assert source == f"init_from {tmp_path}"
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.tie_embeddings) == \
        (3584, 28, 28, 4, 152064, False)
    assert round(count_params(cfg)["total"] / 1e9, 2) == 7.62
    for name in ("attn_block", "logits_chunk", "remat", "dtype", "param_dtype"):
        assert getattr(cfg, name) == getattr(preset, name), name
    assert cfg.attn_block > 0 and cfg.logits_chunk > 0  # an HF config.json has neither: they come from the preset


@pytest.mark.parametrize("family", list(PRESETS))
def test_export_loads_in_transformers(sft_runs, chat_file, family):
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from r1jax import models
    from r1jax.train import checkpoint as ckpt_lib

    ckpt, workdir, export = sft_runs[family]
    directory, step = ckpt_lib.find_checkpoint(workdir)
    meta = ckpt_lib.Checkpointer(directory, read_only=True).restore_meta(step)
    cfg = dataclasses.replace(models.ModelConfig(**meta["model"]), dtype="float32", attn_block=0, logits_chunk=0)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params, _ = ckpt_lib.load_params(workdir, cfg, jax.tree.map(lambda _: device, models.abstract_params(cfg)))

    source_tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    tok = transformers.AutoTokenizer.from_pretrained(export)
    messages = json.loads(open(chat_file).readline())["messages"]
    text = source_tok.apply_chat_template(messages, tokenize=False)
    assert tok.apply_chat_template(messages, tokenize=False) == text and tok.chat_template == source_tok.chat_template
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == source_tok(text, add_special_tokens=False)["input_ids"]

    model = transformers.AutoModelForCausalLM.from_pretrained(export, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(models.forward(params, jnp.asarray([ids], jnp.int32), cfg)[0])
    assert np.abs(ours - theirs).max() <= 1e-4
    source_gen = transformers.GenerationConfig.from_pretrained(ckpt)
    gen = transformers.GenerationConfig.from_pretrained(export)
    assert gen.eos_token_id == source_gen.eos_token_id
    if family == "llama3":  # both of Llama-3's stop tokens, in config.json too
        assert len(gen.eos_token_id) == 2 and sorted(model.config.eos_token_id) == sorted(gen.eos_token_id)
        assert tok.bos_token == "<|begin_of_text|>" and model.config.bos_token_id == tok.bos_token_id


# ------------------------------------------------------------------------------------------------ bad input

def _lines(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


@pytest.mark.parametrize("case", ["missing", "wrong_type"])
def test_bad_mapping_fails_before_the_model_loads(hf_checkpoints, chat_file, env, tmp_path, case):  # noqa: F811
    ckpt = hf_checkpoints("qwen2")
    if case == "missing":  # the conversations are in `messages`; the config names `conversation`
        files, field, want = chat_file, "conversation", rf"{chat_file}:1: field 'conversation': expected "
    else:
        records = [{"messages": f"What is {i} + {i}?"} for i in range(5)]
        files = _lines(tmp_path / "flat.jsonl", records)
        field, want = "messages", rf"{files}:1: field 'messages': expected a non-empty list"
    start = time.perf_counter()
    result = run(main_cmd(PRESETS["qwen2"], tmp_path / "w", f"--config.init_from={ckpt}",
                          f"--config.data.train_files=('{files}',)", f"--config.data.messages_field={field}",
                          *SIZES), env, timeout=60)
    assert result.returncode != 0
    assert time.perf_counter() - start < 30
    import re

    assert re.search(want, result.stderr) and "mapped by data.messages_field" in result.stderr
    assert "initial weights from" not in result.stderr  # nothing heavy ran
    assert "Traceback" not in result.stderr


def test_all_skipped_run_exits_nonzero_with_counts(hf_checkpoints, chat_file, env, tmp_path):  # noqa: F811
    """Every conversation is longer than seq_len: no batch; the counts and the user's lines, no traceback."""
    result = run(main_cmd(PRESETS["qwen2"], tmp_path / "w", f"--config.init_from={hf_checkpoints('qwen2')}",
                          f"--config.data.train_files=('{chat_file}',)", "--config.data.seq_len=16",
                          "--config.data.batch_size=2", "--config.train.micro_batches=1", "--config.train.steps=3"),
                 env, timeout=120)
    assert result.returncode != 0
    assert f"error: AllSkippedError: no usable record in {chat_file} ({N_RECORDS} records)" in result.stderr
    assert f"too_long ({2 * N_RECORDS}), e.g. at {chat_file}:" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_during_a_data_search_ends_preempted(hf_checkpoints, env, tmp_path):  # noqa: F811
    """64 good conversations, then 300,000 wrong-typed records: once the good ones are trained on, the data layer
    searches (no skip limit); SIGTERM then ends the run as preempted with its last step saved."""
    path = tmp_path / "chat.jsonl"
    good = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"<answer> {2 * i} </answer>"}]} for i in range(64)]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in good)
        f.write('{"messages": 7}\n' * 300_000)
    workdir = tmp_path / "w"
    proc = subprocess.Popen(
        main_cmd(PRESETS["qwen2"], workdir, f"--config.init_from={hf_checkpoints('qwen2')}",
                 f"--config.data.train_files=('{path}',)", "--config.data.seq_len=256", "--config.data.batch_size=2",
                 "--config.train.micro_batches=1", "--config.train.steps=1000", "--config.data.shuffle=False",
                 "--config.data.max_skips_in_a_row=100000000", "--config.train.progress=False"),
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr = []
    try:
        for line in proc.stderr:  # the first skip is logged: the search has begun
            stderr.append(line)
            if "skipped a malformed record" in line:
                proc.send_signal(signal.SIGTERM)
                break
        start = time.perf_counter()
        stderr.append(proc.communicate(timeout=60)[1])
        assert time.perf_counter() - start < 30
    finally:
        proc.kill()
    stderr = "".join(stderr)
    assert proc.returncode == 0, stderr[-3000:]
    result = json.load(open(workdir / "result.json"))
    assert result["status"] == "preempted" and "while waiting for data" in stderr
    step = int(result["checkpoint"].rsplit("/", 1)[1])
    assert step > 0 and os.path.isdir(result["checkpoint"])  # the steps trained on the good records were saved
