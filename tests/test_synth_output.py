"""What a synthesis run writes: text-only (T->T) samples, the MMEB text layout, shards streamed in bounded memory."""
import hashlib
import json
import shutil
import tracemalloc
from types import SimpleNamespace

import pytest
import yaml
from fake_openai_server import FakeOpenAI, write_images

from data_synth.config import CONFIG_DIR, load_defaults, load_languages
from data_synth.journal import Journal, read_journal
from data_synth.layout import IMAGE_TARGET_TEXT, mmeb_text
from data_synth.output import finalize, status
from data_synth.plan import SampleSpec, make_plan
from data_synth.prompts import build_request
from data_synth.quality import Rejected, check_sample, make_record
from data_synth.run import Synthesis, resolve_settings
from mme5_jax.processing import MllamaInputProcessor, model_string
from mme5_jax.records import TFDS_FILES, read_records, tfds_name, validate_record

TEXT_TASKS = {"retrieval": {"share": 1, "modalities": ["T->T", "I->T"]}}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("pool"), 40, side=8)


def _spec(task, modality, qry_image=None, pos_image=None, neg_image=None, language="en"):
    return SampleSpec(id=f"{task}-{modality}", task=task, modality=modality, language=language, anchor="a.png",
                      qry_image=qry_image, pos_image=pos_image, neg_image=neg_image)


# -- T->T -----------------------------------------------------------------------------------------------------


def test_text_to_text_run_end_to_end(images, tmp_path, monkeypatch):
    """A config whose tasks include T->T gives valid T->T records with no image, through the real client."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    config_dir = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, config_dir)
    defaults = yaml.safe_load((config_dir / "defaults.yaml").read_text())
    defaults["tasks"] = TEXT_TASKS
    (config_dir / "defaults.yaml").write_text(yaml.safe_dump(defaults))
    out = tmp_path / "out"
    with FakeOpenAI() as server:
        settings = resolve_settings(config_dir=str(config_dir), images=str(images), out=str(out), num_samples=24,
                                    languages="en,de,ja", base_url=server.base_url, concurrency=4, progress=False)
        synthesis = Synthesis(settings)
        summary = synthesis.run()
        text_only_ids = {s.id for s in synthesis.specs if s.modality == "T->T"}
        assert {sample_id for sample_id, _, _ in server.requests} >= text_only_ids
    records = list(read_records(out))
    assert summary["records"] == len(records) == 24 and summary["remaining"] == 0
    text_only = [r for r in records if r["modality"] == "T->T"]
    assert {r["id"] for r in text_only} == text_only_ids and len(text_only) == 12
    for record in text_only:
        validate_record(record)
        assert record["task"] == "retrieval"
        assert record["qry_image"] is None and record["pos_image"] is None and record["neg_image"] == [None]
        for text in (record["qry_text"], record["pos_text"], *record["neg_text"]):
            assert text.endswith("\n") and text.strip()
    assert status(out)["records"] == 24


def test_text_to_text_plan_and_prompt_show_the_anchor_as_inspiration_only(images):
    pool = SimpleNamespace(paths=[f"{i:04d}.png" for i in range(10)], neighbours=[[(i + 1) % 10] for i in range(10)])
    specs = make_plan(10, pool, {"en": {"weight": 1.0}}, {"retrieval": {"share": 1, "modalities": ["T->T"]}})
    assert len({s.anchor for s in specs}) == 10
    for spec in specs:
        assert (spec.qry_image, spec.pos_image, spec.neg_image) == (None, None, None)
    body, _ = build_request(specs[0], images, model="m", language_name="English", detail="low", max_side=64,
                            max_completion_tokens=100, temperature=1.0)
    content = body["messages"][1]["content"]
    assert [p["type"] for p in content].count("image_url") == 1
    assert "not part of the sample" in content[-2]["text"]
    schema = body["response_format"]["json_schema"]["schema"]["properties"]["revised"]
    assert schema["required"] == ["instruction", "query", "positive", "negative"]


def test_default_mix_has_no_text_to_text_and_unknown_combinations_are_named():
    assert all("T->T" not in t["modalities"] for t in load_defaults()["tasks"].values())
    pool = SimpleNamespace(paths=["a.png", "b.png"], neighbours=[[1], [0]])
    with pytest.raises(ValueError, match=r"tasks\.vqa\.modalities: 'T->T'"):
        make_plan(2, pool, load_languages(), {"vqa": {"share": 1, "modalities": ["T->T"]}})


def test_text_to_text_filters():
    spec = _spec("retrieval", "T->T")
    good = {"instruction": "Find the passage that answers the following question:", "query": "Why is the sky blue?",
            "positive": "Rayleigh scattering favours short wavelengths.", "negative": "Sunsets look red."}
    check_sample(spec, good, "Latn")
    with pytest.raises(Rejected, match="quality_mentions_image"):
        check_sample(spec, {**good, "instruction": "Find the Photos matching the following question:"}, "Latn")
    with pytest.raises(Rejected, match="quality_query_equals_positive"):
        check_sample(spec, {**good, "positive": " why is the sky blue? "}, "Latn")
    check_sample(_spec("retrieval", "T->I", pos_image="p.png", neg_image="n.png"),
                 {"instruction": "Find me an everyday image that matches the given caption:", "query": "A cat."},
                 "Latn")


# -- the MMEB text layout ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from assets import make_processor_dir

    return MllamaInputProcessor.from_pretrained(make_processor_dir(str(tmp_path_factory.mktemp("processor"))))


IMG = "<|image_1|>\n"
# (spec, revised sample with untidy whitespace, released-layout qry/pos/neg texts)
LAYOUT_CASES = [
    (_spec("vqa", "IT->T", qry_image="q.png"),
     {"instruction": " Represent the given image with the following question:  ", "query": "What is in the image ",
      "positive": "a cat", "negative": " a dog\n"},
     (IMG + "Represent the given image with the following question: What is in the image\n", "a cat\n", "a dog\n")),
    (_spec("retrieval", "T->I", pos_image="p.png", neg_image="n.png"),
     {"instruction": "Find me an everyday image that matches the given caption:", "query": "A cat and a dog."},
     ("Find me an everyday image that matches the given caption: A cat and a dog.\n",
      IMG + "Represent the given image.\n", IMG + "Represent the given image.\n")),
    (_spec("retrieval", "I->T", qry_image="q.png"),
     {"instruction": "Find a caption describing the given image.", "positive": "Zwei Katzen.", "negative": "Ein Hund."},
     (IMG + "Find a caption describing the given image.\n", "Zwei Katzen.\n", "Ein Hund.\n")),
    (_spec("retrieval", "T->T"),
     {"instruction": "Retrieve the passage that answers the following question:", "query": "Who wrote Faust?",
      "positive": "Goethe wrote Faust.", "negative": "Schiller wrote Die Räuber."},
     ("Retrieve the passage that answers the following question: Who wrote Faust?\n", "Goethe wrote Faust.\n",
      "Schiller wrote Die Räuber.\n")),
]


@pytest.mark.parametrize("spec, sample, released", LAYOUT_CASES, ids=lambda v: getattr(v, "modality", None))
def test_synthesised_texts_tokenize_like_the_released_layout(spec, sample, released, processor):
    record = validate_record(make_record(spec, sample, "m"))
    texts = (record["qry_text"], record["pos_text"], record["neg_text"][0])
    has_image = (record["qry_image"] is not None, record["pos_image"] is not None, record["neg_image"][0] is not None)
    for text, image, expected in zip(texts, has_image, released):
        assert processor.tokenize([model_string(text, image)]) == processor.tokenize([model_string(expected, image)])
        assert text == expected.removeprefix(IMG)


def test_one_layout_function():
    assert IMAGE_TARGET_TEXT == "Represent the given image.\n" == mmeb_text(" Represent the given image. ")
    assert mmeb_text("Find it:", None) == mmeb_text("Find it:") == "Find it:\n"
    assert mmeb_text("Find it:\n", "  a b ") == "Find it: a b\n"


# -- bounded memory -----------------------------------------------------------------------------------------------


def _journal_run(out, count, text_chars):
    """A run directory whose journal holds `count` finished samples (plus a failure each), ids in random order."""
    ids = [hashlib.sha256(str(i).encode()).hexdigest()[:20] for i in range(count)]
    with Journal(out) as journal:
        for i, sample_id in enumerate(ids):
            journal.write({"e": "attempt", "id": sample_id, "ok": False, "reason": "refusal", "detail": "",
                           "strike": True, "usage": [10, 5], "cost": 0.001, "batch": None})
            record = {"id": sample_id, "source": "mme5-synth", "task": "retrieval", "modality": "T->T",
                      "language": "en", "qry_text": f"Find the passage for: question {i}\n", "qry_image": None,
                      "pos_text": "p" * text_chars + "\n", "pos_image": None, "neg_text": ["n" * text_chars + "\n"],
                      "neg_image": [None]}
            journal.write({"e": "attempt", "id": sample_id, "ok": True, "reason": None, "detail": "", "strike": False,
                           "usage": [10, 5], "cost": 0.001, "batch": None, "record": record})
    return [SimpleNamespace(id=i) for i in ids]


def _resume_peak_bytes(out, specs):
    """Peak Python memory of replaying the journal and writing the shards, as a rerun does."""
    tracemalloc.start()
    try:
        state = read_journal(out)
        finalize(out, specs, state, records_per_shard=100)
        return tracemalloc.get_traced_memory()[1], state
    finally:
        tracemalloc.stop()


def test_finalize_streams_records_in_bounded_memory(tmp_path):
    text_chars = 20_000
    peaks = {}
    for count in (100, 400):
        out = tmp_path / str(count)
        specs = _journal_run(out, count, text_chars)
        peaks[count], state = _resume_peak_bytes(out, specs)
        assert len(state.done) == count and state.ledger.billed_responses == 2 * count
        records = list(read_records(out))
        assert [r["id"] for r in records] == sorted(s.id for s in specs)
        assert all(len(r["pos_text"]) == text_chars + 1 for r in records)
    # Holding the 300 extra records would take 300 x 40 KB = 12 MB; their ids and offsets take well under 1 MB.
    assert peaks[400] - peaks[100] < 1_000_000, peaks
    assert peaks[400] < 20 * 2 * text_chars + 1_000_000, peaks


def test_finalize_replaces_the_shards_and_keeps_only_planned_samples(tmp_path):
    specs = _journal_run(tmp_path, 30, 10)
    finalize(tmp_path, specs, read_journal(tmp_path), records_per_shard=7)
    assert len(list(tmp_path.glob("data-*-of-00005.array_record"))) == 5
    finalize(tmp_path, specs[:10], read_journal(tmp_path), records_per_shard=7)
    assert sorted(p.name for p in tmp_path.glob("data-*")) == ["data-00000-of-00002.array_record",
                                                                "data-00001-of-00002.array_record"]
    assert [r["id"] for r in read_records(tmp_path)] == sorted(s.id for s in specs[:10])
    assert not (tmp_path / ".staging").exists()
    assert json.loads((tmp_path / "dataset_info.json").read_text())["name"] == tfds_name(tmp_path.name)
    assert all((tmp_path / name).is_file() for name in TFDS_FILES)


def test_a_journal_changed_after_replay_is_named(tmp_path):
    specs = _journal_run(tmp_path, 3, 10)
    state = read_journal(tmp_path)
    journal = tmp_path / "journal.jsonl"
    journal.write_bytes(b"\n" + journal.read_bytes())
    with pytest.raises(ValueError, match=r"journal\.jsonl byte \d+ holds no record of sample"):
        finalize(tmp_path, specs, state, records_per_shard=10)
    assert not list(tmp_path.glob("data-*")), "a failed finalize publishes nothing"
