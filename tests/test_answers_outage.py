"""The ``judge_answers`` stage when the judge goes away: a prompt whose answer failed transiently
(HTTP 500 after the retries) is never journaled; the stage raises
:class:`~cai.errors.JudgeUnavailable` and publishes nothing, and when the judge is back the rerun
asks only the unanswered prompts (with the seeds an uninterrupted run uses) and writes the same
``answers.jsonl``."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_label_outage import FlakyServer

from cai.artifacts import ArtifactStore
from cai.config import Config, JudgeAnswersConfig, JudgeConfig, SFTConfig
from cai.data import Prompt, write_jsonl
from cai.errors import CaiError, JudgeUnavailable
from cai.testing.servers import FakeOpenAIServer

N = 12
BS = 4


def _build(store: ArtifactStore, base_url: str, prompts: Path):
    from cai.pipeline import make_stage

    judge = JudgeConfig(backend="openai", model="fake-judge", base_url=base_url, api_key_env=None, max_retries=0,
                        cache=False, timeout_s=2.0, max_concurrency=1)
    cfg = Config(judge=judge, sft=SFTConfig(answers=JudgeAnswersConfig(max_new_tokens=16, batch_size=BS,
                                                                       temperature=1.0)), seed=0)
    stage = make_stage("judge_answers", cfg)
    key = store.key("judge_answers", stage.config, {"prompts": prompts.name}, version=stage.version)
    try:
        return key, store.build(key, lambda ctx: stage.run({"prompts": prompts}, ctx))
    except CaiError as e:
        return key, e


@pytest.mark.parametrize("k", [6, 0])
def test_an_outage_publishes_nothing_and_the_rerun_asks_only_the_missing_prompts(tmp_path, k):
    prompts = tmp_path / "prompts-x"
    prompts.mkdir()
    write_jsonl(prompts / "train.jsonl",
                [Prompt.create([{"role": "user", "content": f"Question {i}?"}], "test").to_dict() for i in range(N)])
    with FakeOpenAIServer() as ref_srv:
        _, ref = _build(ArtifactStore(tmp_path / "ref"), ref_srv.base_url, prompts)

    store = ArtifactStore(tmp_path / "store")
    with FlakyServer(answers=k) as srv:
        key, err = _build(store, srv.base_url, prompts)
        assert isinstance(err, JudgeUnavailable), err
        msg = str(err)
        assert f"judge_answers: {N - k - (N - 8 if k == 0 else 0)} of {N} prompts failed transiently" in msg
        assert f"the {k} answered prompts are kept" in msg
        if k == 0:  # two chunks in a row without an answer: the third is not asked
            assert f"{BS} more prompts were not asked" in msg
        assert not store.exists(key) and not store.list("judge_answers")
        first_ok = {r.body_hash for r in srv.records if r.outcome == "ok"}
        assert len(first_ok) == k
        srv.answers = None
        srv.reset_log()
        _, res = _build(store, srv.base_url, prompts)
        assert not isinstance(res, Exception), res
        asked = [r.body_hash for r in srv.records]
    assert len(asked) == len(set(asked)) == N - k and not set(asked) & first_ok
    assert (res.path / "answers.jsonl").read_bytes() == (ref.path / "answers.jsonl").read_bytes()
