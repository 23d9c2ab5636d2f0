"""The held-out judge of ``eval_baseline`` / ``evaluate`` when it goes away: transient failures
(HTTP 500, timeouts, connection errors, empty answers) are never journaled or published as
invalid judgements. The stage raises :class:`~cai.errors.JudgeUnavailable` and publishes
nothing; when the judge is back, the rerun asks only the requests never answered and reports
what a run without the outage reports. Refusals stay invalid judgements
(tests/test_evaluate_stage.py::test_failed_judgements_are_invalid_not_losses)."""

from __future__ import annotations

import shutil

import pytest
from test_evaluate_stage import TINY, _evaluate, _perturbed_arm, compose, sft_run  # noqa: F401
from test_label_outage import FlakyServer

from cai.artifacts import ArtifactStore
from cai.errors import JudgeUnavailable
from cai.testing.servers import FakeOpenAIServer

BATCH = 4


def _cfg(base_url: str):
    return compose("experiment.stages=[evaluate]", *TINY, "eval.judge.backend=openai", "eval.judge.model=fake",
                   f"eval.judge.base_url={base_url}", "eval.judge.api_key_env=null", "eval.judge.cache=false",
                   "eval.judge.max_retries=0", "eval.judge.timeout_s=2.0", f"eval.judge_batch={BATCH}",
                   "eval.harmless_prompts=all")


def _copy_store(info, to) -> ArtifactStore:
    shutil.copytree(info["store"], to)
    return ArtifactStore(to)


def _eval_metrics(result) -> dict:
    return {k: v for k, v in result.stage_info["metrics"].items() if k.startswith("eval")}


@pytest.mark.parametrize("k", [8, 2])  # the judge dies during evaluate / during eval_baseline
def test_an_outage_publishes_nothing_and_the_rerun_asks_only_the_missing_requests(sft_run, tmp_path, k):  # noqa: F811
    _, _, _, info = sft_run
    arm = _perturbed_arm(info, tmp_path / "arm")
    with FakeOpenAIServer() as ref_srv:  # the reference: no outage
        ref, ref_base = _evaluate(_cfg(ref_srv.base_url), info, arm, store=_copy_store(info, tmp_path / "ref"))
        n_requests = len({r.body_hash for r in ref_srv.records})
    assert ref.stage_info["metrics"]["eval/ppo/vs_sft/invalid"] == 0

    store = _copy_store(info, tmp_path / "store")
    before = {stage: set(store.list(stage)) for stage in ("eval_baseline", "evaluate_ppo")}
    with FlakyServer(answers=k) as srv:
        with pytest.raises(JudgeUnavailable) as err:
            _evaluate(_cfg(srv.base_url), info, arm, store=store)
        msg = str(err.value)
        assert "failed transiently" in msg and "http_500 x" in msg and "nothing was published" in msg
        assert f"rerun the same command: the {k if k < 6 else k - 6} answered judge requests are kept" in msg
        assert set(store.list("evaluate_ppo")) == before["evaluate_ppo"]  # nothing published
        if k < 6:  # eval_baseline (6 harmlessness requests) failed: not published either
            assert set(store.list("eval_baseline")) == before["eval_baseline"]
        first_ok = {r.body_hash for r in srv.records if r.outcome == "ok"}
        assert len(first_ok) == k

        srv.answers = None  # the judge is back
        srv.reset_log()
        res, base = _evaluate(_cfg(srv.base_url), info, arm, store=store)
        asked = {r.body_hash for r in srv.records}
        assert all(r.outcome == "ok" for r in srv.records)
    assert len(asked) == n_requests - k and not asked & first_ok  # only the missing requests, each once
    assert len(srv.records) == len(asked)
    assert _eval_metrics(res) == _eval_metrics(ref) and _eval_metrics(base) == _eval_metrics(ref_base)
    assert (res.path / "samples.jsonl").read_bytes() == (ref.path / "samples.jsonl").read_bytes()


# ----------------------------------------------------------------------------- the session itself
class _Ctx:
    def __init__(self, root) -> None:
        self.root = root

    def journal(self, name):
        from cai.journal import Journal

        return Journal(self.root / name)


def _session(tmp_path, base_url: str):
    from cai.config import JudgeConfig
    from cai.evaluate.baseline import JudgeSession

    judge = JudgeConfig(backend="openai", model="fake", base_url=base_url, api_key_env=None, cache=False,
                        max_retries=0, timeout_s=2.0, max_concurrency=1)
    return JudgeSession(_Ctx(tmp_path), judge, stage="evaluate", cache_path=None, judge_batch=BATCH, hf_batch_size=1)


def _asks(n: int):
    from cai.judges import ChoiceRequest

    return [(f"r{i}", ChoiceRequest([{"role": "user", "content": f"Is answer {i} harmless? A or B"}], ("A", "B")))
            for i in range(n)]


def test_a_judge_down_for_two_batches_is_not_asked_further(tmp_path):
    with FlakyServer(answers=3) as srv:
        with pytest.raises(JudgeUnavailable) as err, _session(tmp_path, srv.base_url) as session:
            session.ask(_asks(20))
        # batch 1: 3 answered + 1 failed; batches 2, 3: none answered -> down; batches 4, 5 not asked
        assert len(srv.records) == 3 * BATCH
    msg = str(err.value)
    assert "evaluate: 9 of 20 judge requests failed transiently" in msg and "http_500 x 9" in msg
    assert "8 more judge requests were not asked" in msg and "the 3 answered judge requests are kept" in msg
    assert len((tmp_path / "answers_journal.jsonl").read_text().splitlines()) == 3


def test_refusals_are_journaled_as_invalid_answers(tmp_path):
    from cai.testing.servers import Faults

    with FakeOpenAIServer(faults=Faults(refusal=0.5, seed=1)) as srv, _session(tmp_path, srv.base_url) as session:
        results = session.ask(_asks(12))
        refused = srv.count("refusal")
    assert 0 < refused < 12 and sum(r.failure_reason == "refusal" for r in results) == refused
    assert len((tmp_path / "answers_journal.jsonl").read_text().splitlines()) == 12  # final: never asked again
