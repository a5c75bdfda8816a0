"""Streaming finer than one canvas: per-step drafts and per-canvas commits, and the iterator form for servers."""

import threading

import pytest
import torch
from conftest import build_pair, left_padded_batch, variant_config
from transformers import pipeline
from transformers.generation.streamers import BaseStreamer

from dgemma_hf.pipelines import (
    DiffusionTextStreamer,
    StreamEvent,
    TextDiffusionIteratorStreamer,
    TextDiffusionPipeline,
    register_pipelines,
)
from dgemma_hf.schedulers import TopKPerStepScheduler

register_pipelines()

# Three canvases of 16, three steps each (adaptive stopping and EOS off): a known number of events.
FIXED = dict(max_new_tokens=48, stability_threshold=None, confidence_threshold=None, eos_token_id=None,
             scheduler=TopKPerStepScheduler(num_inference_steps=3))


class Recorder(DiffusionTextStreamer):
    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.events = []

    def on_prompt(self, text):
        self.events.append(("prompt", text))

    def on_draft(self, text):
        self.events.append(("draft", text))

    def on_commit(self, text):
        self.events.append(("commit", text))

    def on_end(self):
        self.events.append(("end", ""))


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_pair(variant_config("default"), tokenizer, seed=1)[0]


@pytest.fixture(scope="module")
def pipe(model, tokenizer):
    return pipeline("text-diffusion", model=model, tokenizer=tokenizer, device="cpu")


def _kinds(events):
    return [kind for kind, _ in events]


def test_streamer_is_a_transformers_streamer():
    assert issubclass(DiffusionTextStreamer, BaseStreamer)
    assert issubclass(TextDiffusionIteratorStreamer, DiffusionTextStreamer)
    assert hasattr(DiffusionTextStreamer, "put_draft")  # what the engine looks for to send drafts


def test_committed_text_equals_the_non_streamed_text(pipe, tokenizer):
    expected = pipe("Why is the sky blue?", seed=3, return_full_text=False, **FIXED)[0]["generated_text"]
    recorder = Recorder(tokenizer)
    streamed = pipe("Why is the sky blue?", seed=3, return_full_text=False, streamer=recorder, **FIXED)
    assert streamed[0]["generated_text"] == expected  # streaming changes nothing
    assert _kinds(recorder.events) == (["draft"] * 3 + ["commit"]) * 3 + ["end"]
    assert "".join(text for kind, text in recorder.events if kind == "commit") == expected
    assert recorder.committed_text == expected
    assert all(isinstance(text, str) for _, text in recorder.events)


def test_last_draft_of_a_canvas_is_what_it_commits(model, tokenizer):
    input_ids, _ = left_padded_batch(tokenizer, ["Tom has 3 apples."])
    recorder = Recorder(tokenizer, skip_prompt=False)
    torch.manual_seed(0)
    out = model.generate(input_ids, streamer=recorder, sampling="reference", **FIXED)
    assert recorder.events[0] == ("prompt", "Tom has 3 apples.")
    drafts = [text for kind, text in recorder.events if kind == "draft"]
    canvases = out.sequences[0, input_ids.shape[1]:].view(3, 16)
    assert [drafts[2], drafts[5], drafts[8]] == [tokenizer.decode(c, skip_special_tokens=True) for c in canvases]


def test_drafts_stop_at_a_stop_token(tokenizer):
    streamer = Recorder(tokenizer, stop_token_ids=[tokenizer.eos_token_id])
    streamer.put(torch.tensor([[5, 6]]))  # the prompt
    ids = tokenizer("a boy").input_ids
    streamer.put_draft(torch.tensor([ids + [tokenizer.eos_token_id] + tokenizer("more").input_ids]))
    assert streamer.events == [("draft", "a boy")]


def test_an_incomplete_character_is_held_back_until_it_completes(tokenizer):
    """A multi-byte character split across two canvases is committed once, whole."""
    ids = tokenizer("café ok").input_ids
    split = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    streamer = Recorder(tokenizer)
    streamer.put(torch.tensor([[5]]))
    streamer.put(torch.tensor([ids[:split]]))
    streamer.put(torch.tensor([ids[split:]]))
    streamer.end()
    commits = [text for kind, text in streamer.events if kind == "commit"]
    assert "\ufffd" not in "".join(commits) and "".join(commits) == "café ok"


def test_iterator_streamer_yields_drafts_and_commits(pipe):
    expected = pipe("Hi there", seed=8, return_full_text=False, **FIXED)[0]["generated_text"]
    streamer = TextDiffusionIteratorStreamer(pipe.tokenizer, timeout=60)
    # The documented server usage: generation in a thread, the events consumed here.
    thread = threading.Thread(target=pipe, args=("Hi there",),
                              kwargs=dict(seed=8, return_full_text=False, streamer=streamer, **FIXED))
    thread.start()
    events = list(streamer)
    thread.join()
    assert all(isinstance(event, StreamEvent) for event in events)
    assert _kinds(events) == (["draft"] * 3 + ["commit"]) * 3
    assert "".join(text for kind, text in events if kind == "commit") == expected

    # run_in_thread keeps the result; drafts=False queues commits only; the streamer is reusable.
    streamer = TextDiffusionIteratorStreamer(pipe.tokenizer, timeout=60, drafts=False)
    thread = streamer.run_in_thread(pipe, "Hi there", seed=8, return_full_text=False, **FIXED)
    commits = [text for _, text in streamer]
    thread.join()
    assert len(commits) == 3 and "".join(commits) == expected == streamer.result[0]["generated_text"]
    thread = streamer.run_in_thread(pipe, "Hi there", seed=8, return_full_text=False, **FIXED)
    assert "".join(text for _, text in streamer) == expected
    thread.join()


def test_iterator_streamer_with_the_diffusers_pipeline_and_generate(model, tokenizer):
    pipe = TextDiffusionPipeline(model=model, scheduler=FIXED["scheduler"], tokenizer=tokenizer)
    settings = {k: v for k, v in FIXED.items() if k != "scheduler"}
    streamer = TextDiffusionIteratorStreamer(tokenizer, timeout=60)
    thread = streamer.run_in_thread(pipe, "Hi", seed=2, **settings)
    events = list(streamer)
    thread.join()
    assert "".join(text for kind, text in events if kind == "commit") == streamer.result.texts[0]
    assert _kinds(events).count("draft") == 9

    # model.generate itself, in a thread.
    input_ids, _ = left_padded_batch(tokenizer, ["Hi"])
    thread = streamer.run_in_thread(model.generate, input_ids, sampling="reference", **FIXED)
    text = "".join(text for kind, text in streamer if kind == "commit")
    thread.join()
    assert text == tokenizer.decode(streamer.result.sequences[0, input_ids.shape[1]:], skip_special_tokens=True)


def test_iteration_ends_with_the_error_when_generation_fails(pipe):
    streamer = TextDiffusionIteratorStreamer(pipe.tokenizer, timeout=60)
    thread = streamer.run_in_thread(pipe, "Hi", max_new_tokens=0)
    with pytest.raises(ValueError, match="`max_new_tokens` must be a positive integer"):
        list(streamer)
    thread.join()
    # An error inside generate(), in a plain thread: the pipeline hands it to the streamer.
    thread = threading.Thread(target=lambda: _swallow(pipe, "Hi", streamer=streamer, max_new_tokens=10**6))
    thread.start()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        list(streamer)
    thread.join()


def _swallow(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except ValueError:
        pass


def test_streamers_take_one_sequence(pipe):
    with pytest.raises(ValueError, match="stream one sequence, got a batch of 2"):
        pipe(["Hi", "Hello"], streamer=DiffusionTextStreamer(pipe.tokenizer), max_new_tokens=16)
    recorder = Recorder(pipe.tokenizer)
    out = pipe(["Hi", "Hello"], streamer=recorder, batch_size=1, seed=0, return_full_text=False, **FIXED)
    commits = [text for kind, text in recorder.events if kind == "commit"]
    assert "".join(commits[:3]) == out[0][0]["generated_text"] and "".join(commits[3:]) == out[1][0]["generated_text"]
    assert _kinds(recorder.events).count("end") == 2
