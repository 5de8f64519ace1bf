"""Slot engine (r1jax.rl.engine) and stop strings on text (r1jax.rl.stops): the engine gives the static sampler's
rows whatever its slot count (and with a paged cache, however short its pool: preempted rows draw the same tokens
again), ends rows on any of several EOS ids / a stop string / max length, and a row put into a slot (or pages) that
earlier rows used reads none of their cache (checked against a fresh full forward)."""

import functools
import json

import jax
import numpy as np
import pytest

from r1jax import models as M
from r1jax.data import tokenizer as tk
from r1jax.rl import engine as E
from r1jax.rl import sampler as S
from r1jax.rl import stops as ST
from r1jax.rl import trainer as TR

PROMPTS = [[5, 17, 99, 203, 41, 8, 77], [9, 300, 12], [250, 6, 31, 90, 2], [44, 45]]  # B = 4
BUCKETS = (8,)
G, T_NEW = 4, 12  # N = 16 rows
NO_EOS = 10_000
PAGE = 4  # a row: (8 + 12) / 4 = 5 pages; 7 pages (page 0 the scratch page) hold one row and a prompt


@functools.lru_cache(maxsize=None)
def _model(name):
    cfg = M.get_preset(name, mtp_depth=0, init_std=0.1, n_layers=2, n_dense_layers=1 if name == "tiny_moe" else 2)
    return cfg, M.init(cfg, jax.random.PRNGKey(0))


def _run(name, spec, slots=None, seed=0, limit_n=None, drain=1, pages=0, stats=None):
    """The static sampler (slots None) or the engine; pages > 0: paged, pages of PAGE positions."""
    cfg, params = _model(name)
    prompts_bp, lengths_b = S.pad_prompts(PROMPTS, BUCKETS, pad_id=0)
    if slots is None:
        fn = S.make_sampler(cfg, spec)
    else:
        fn = E.make_engine(cfg, spec, E.EngineSpec(slots=slots, chunk_steps=4, drain_divisor=drain,
                                                   page=PAGE if pages else 0, pages=pages))
    out = jax.tree.map(np.asarray, fn(params, prompts_bp, lengths_b, jax.random.PRNGKey(seed), limit_n))
    if stats is not None:
        stats.update(fn.stats)
    return out


@pytest.mark.parametrize("name", ["tiny_moe", "tiny_dense"])
def test_greedy_engine_equals_static_sampler(name):
    spec = S.SamplerSpec(S.Greedy(), group_size=G, max_new_tokens=T_NEW, eos_id=NO_EOS)
    ref = _run(name, spec)
    # S = N, N/4, not dividing N; paged: pages for every row, and a pool so short that rows are preempted
    runs = ((16, 0), (4, 0), (5, 0), (16, 81), (5, 7)) if name == "tiny_moe" else ((5, 0), (5, 7))
    for slots, pages in runs:
        stats = {}
        out = _run(name, spec, slots, pages=pages, stats=stats)
        assert (stats["preempted"] > 0) == (pages == 7), stats
        assert (out.tokens == ref.tokens).all() and (out.lengths == ref.lengths).all(), slots
        if slots == G * len(PROMPTS) and not pages:
            assert (out.logprobs == ref.logprobs).all()  # the same program shapes: bit for bit
        else:  # other batch shapes round differently in XLA's matmuls
            np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5, rtol=0)


def test_sampled_rows_do_not_depend_on_slots_and_end_on_any_eos():
    probe = _run("tiny_moe", S.SamplerSpec(S.Temperature(1.0), group_size=G, max_new_tokens=T_NEW, eos_id=NO_EOS))
    tokens, counts = np.unique(probe.tokens[:, 1:], return_counts=True)
    eos = tuple(int(t) for t in tokens[np.argsort(-counts)[:2]])  # two ids that do occur: rows end early
    spec = S.SamplerSpec(S.Temperature(1.0), group_size=G, max_new_tokens=T_NEW, eos_id=eos)
    ref = _run("tiny_moe", spec)
    for slots, pages in ((16, 0), (4, 0), (5, 0), (8, 12)):  # paged: 8 slots, rows preempted
        stats = {}
        out = _run("tiny_moe", spec, slots, drain=4 if slots == 4 else 1, pages=pages, stats=stats)
        assert (stats["preempted"] > 0) == (pages > 0), stats
        for field in ("tokens", "lengths", "truncated"):
            assert (getattr(out, field) == getattr(ref, field)).all(), (slots, field)
        np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    for n in range(len(ref.lengths)):  # each row ends at its first EOS (either id), kept, or at T
        row = ref.tokens[n].tolist()
        hits = [j for j in range(T_NEW) if row[j] in eos]
        expected = hits[0] + 1 if hits else T_NEW
        assert ref.lengths[n] == expected and ref.truncated[n] == (not hits), (n, row)
        assert (ref.tokens[n, expected:] == 0).all() and (ref.logprobs[n, expected:] == 0).all()
    assert 0 < ref.truncated.sum() < len(ref.lengths)


@pytest.mark.parametrize("pages", [0, 9])
def test_reused_slots_read_no_stale_cache(pages):
    """Four slots serve 16 rows of forced different lengths (rows enter slots other rows used, then the drain
    compacts them; paged: rows take pages other rows wrote, and some are preempted): each row's log-probs equal
    a fresh full forward over its prompt and completion."""
    cfg, params = _model("tiny_moe")
    spec = S.SamplerSpec(S.Temperature(1.0), group_size=G, max_new_tokens=T_NEW, eos_id=NO_EOS)
    limit_n = np.array([12, 3, 7, 1, 5, 12, 2, 9, 4, 11, 6, 8, 10, 2, 12, 5], np.int32)
    stats = {}
    out = _run("tiny_moe", spec, slots=6 if pages else 4, limit_n=limit_n, drain=4, pages=pages, stats=stats)
    assert (stats["preempted"] > 0) == (pages > 0), stats
    assert (out.lengths == limit_n).all() and (out.truncated == (limit_n == T_NEW)).all()
    prompts = [p for p in PROMPTS for _ in range(G)]
    batch = TR.build_batch(prompts, out.tokens, out.lengths, prompt_buckets=BUCKETS, completion_buckets=(T_NEW,),
                           pad_id=0)
    logp, _ = jax.jit(lambda p, b: TR.completion_logprobs(p, b, cfg, 1.0))(params, batch)
    mask = batch["mask"] > 0
    np.testing.assert_allclose(np.asarray(logp)[mask], out.logprobs[mask], atol=1e-4, rtol=0)


def test_slots_for_budget():
    cfg, _ = _model("tiny_moe")
    per = E.cache_bytes_per_position(cfg)
    assert E.slots_for_budget(cfg, per * (8 * 20 + 4 * 8), 8, 12, prompts=4, group_size=4) == 8
    with pytest.raises(ValueError, match="holds no decode slot"):
        E.slots_for_budget(cfg, per * 10, 8, 12)
    assert E.pages_for_budget(cfg, per * (8 * 20 + 4 * 8), PAGE, 8, prompts=4) == 40


def test_paged_engine_refuses_pages_that_do_not_fit():
    spec = S.SamplerSpec(S.Greedy(), group_size=G, max_new_tokens=T_NEW, eos_id=NO_EOS)
    with pytest.raises(ValueError, match="holds no whole row"):
        _run("tiny_moe", spec, slots=4, pages=5)
    cfg, params = _model("tiny_moe")
    engine = E.make_engine(cfg, spec, E.EngineSpec(slots=4, page=3, pages=40))
    with pytest.raises(ValueError, match="must divide the prompt bucket"):
        engine(params, *S.pad_prompts(PROMPTS, BUCKETS, pad_id=0), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="paged engine needs"):
        E.EngineSpec(slots=0, page=4, pages=40)


# ------------------------------------------------------------------------------------------- stop strings

TEXT = ("<think> 2 + 3 = 5 </think> <answer>5</answer>\n ok <answer> 7 </answer>x then</answer>.\n"
        "so the answer is 9 </answer>\n\n") * 20


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE trained with `tokenizers` (no special tokens: `</answer>` is plain text, cut into
    several tokens, differently after a space), saved as a checkpoint's tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([TEXT, "the answer is </ans", "a </ b"], trainer)
    directory = tmp_path_factory.mktemp("bpe")
    hf.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eos|>", "bos_token": None}))
    return tk.load_tokenizer(str(directory))


def _fires(stops, ids, vocab):
    """Step the on-device matcher over ids; the indices where it fires."""
    window = np.full((1, stops.window_width), -1, np.int32)
    fired = []
    for j, token in enumerate(ids):
        window, count = ST.push(stops, window, np.array([token]), np.array([True]), vocab)
        if bool(ST.hit(stops, window, count)[0]):
            fired.append(j)
    return fired


def _reference_fires(texts, stop):
    """Python reference: token j fires when `stop` ends inside the text of token j."""
    out, text = [], ""
    for j, piece in enumerate(texts):
        start, text = len(text), text + piece
        if any(text.endswith(stop, 0, e) for e in range(start + 1, len(text) + 1)):
            out.append(j)
    return out


@pytest.mark.parametrize("text", ["<answer>5</answer>\n", "so it is 9 </answer>", " then</answer>.", "a </ans"])
def test_stop_string_however_tokenised(bpe, text):
    stops = ST.stop_strings(bpe, ("</answer>",))
    ids = bpe.encode(text)
    texts = ST.token_texts(bpe)
    assert "".join(texts[i] for i in ids) == text
    expected = _reference_fires([texts[i] for i in ids], "</answer>")
    assert _fires(stops, ids, bpe.vocab_size) == expected
    assert len(expected) == ("</answer>" in text)


def test_stop_string_split_across_tokens_and_after_space(bpe):
    stops = ST.stop_strings(bpe, ("</answer>",))
    texts = ST.token_texts(bpe)
    for text in ("x</answer>", " </answer>", "9 </answer>\n\n"):
        ids = bpe.encode(text)
        assert sum("<" in texts[i] or "/" in texts[i] for i in ids) >= 1 and len(ids) >= 2, [texts[i] for i in ids]
        assert _fires(stops, ids, bpe.vocab_size) == _reference_fires([texts[i] for i in ids], "</answer>") != []


def test_sampler_and_engine_stop_on_text(bpe):
    """A stop string taken from greedy text across a token boundary ends each row exactly where the python
    reference says, in the static sampler and the engine."""
    spec0 = S.SamplerSpec(S.Greedy(), group_size=G, max_new_tokens=T_NEW, eos_id=NO_EOS)
    ref = _run("tiny_moe", spec0)
    texts = ST.token_texts(bpe) + [""] * (512 - bpe.vocab_size)
    row = [texts[i] for i in ref.tokens[0]]
    j = next(j for j in range(2, T_NEW - 1) if row[j] and row[j + 1])
    stop = row[j][-1:] + row[j + 1]  # spans tokens j and j+1
    spec = S.SamplerSpec(S.Greedy(), group_size=G, max_new_tokens=T_NEW, eos_id=NO_EOS,
                         stop_sequences=ST.stop_strings(bpe, (stop,)))
    for slots in (None, 5):
        out = _run("tiny_moe", spec, slots)
        for n in range(len(out.lengths)):
            fires = _reference_fires([texts[i] for i in ref.tokens[n]], stop)
            expected = fires[0] + 1 if fires else T_NEW
            assert out.lengths[n] == expected and out.truncated[n] == (not fires), (slots, n)
            assert (out.tokens[n, :expected] == ref.tokens[n, :expected]).all()
    assert out.lengths[0] <= j + 2


def test_stop_strings_errors(bpe):
    with pytest.raises(ValueError, match="empty stop string"):
        ST.stop_strings(bpe, ("",))
    assert ST.stop_strings(bpe, ()) is None
    spec = S.SamplerSpec(S.Greedy(), group_size=1, max_new_tokens=2, eos_id=[3, 4], stop_sequences=((5, 6),))
    assert spec.eos_id == (3, 4) and spec.stop_sequences == ST.from_token_sequences([(5, 6)])
    assert hash(spec) == hash(S.SamplerSpec(S.Greedy(), group_size=1, max_new_tokens=2, eos_id=(3, 4),
                                            stop_sequences=((5, 6),)))
