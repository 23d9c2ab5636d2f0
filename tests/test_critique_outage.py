"""The ``revisions`` stage with ``critique.generator: judge`` when the judge goes away: a record
whose critique or revision failed transiently (HTTP 500 after the retries) is never journaled;
the stage raises :class:`~cai.errors.JudgeUnavailable` and publishes nothing, and when the judge
is back the rerun asks only the unfinished records and writes what a run without the outage
writes."""

from __future__ import annotations

import pytest
from test_critique import _build, _critique, _judge_cfg, world  # noqa: F401
from test_label_outage import FlakyServer

from cai.artifacts import ArtifactStore
from cai.errors import JudgeUnavailable
from cai.testing.servers import FakeOpenAIServer


def _cfg(srv, tmp_path):
    return {"critique": _critique(generator="judge", max_new_tokens=8), "seed": 0,
            "judge": {**_judge_cfg(srv, tmp_path / "cache.sqlite", max_retries=0, max_concurrency=1), "cache": False}}


def test_a_critique_outage_publishes_nothing_and_the_rerun_asks_only_the_rest(tmp_path, world):  # noqa: F811
    with FakeOpenAIServer() as ref_srv:
        ref = _build(tmp_path / "ref", _cfg(ref_srv, tmp_path), world)
        n_requests = len({r.body_hash for r in ref_srv.records})
    assert n_requests == 16 * 2 * 2

    k = 11  # answers before the judge goes away: in the first block's revisions
    with FlakyServer(answers=k) as srv:
        with pytest.raises(JudgeUnavailable) as err:
            _build(tmp_path / "s", _cfg(srv, tmp_path), world)
        msg = str(err.value)
        assert "revisions:" in msg and "critique records failed transiently" in msg and "http_500 x" in msg
        assert "the 3 finished critique records are kept" in msg
        assert not ArtifactStore(tmp_path / "s", durable=False).list("revisions")
        first_ok = {r.body_hash for r in srv.records if r.outcome == "ok"}
        assert len(first_ok) == k

        srv.answers = None
        srv.reset_log()
        res = _build(tmp_path / "s", _cfg(srv, tmp_path), world)
        asked = {r.body_hash for r in srv.records}
        assert all(r.outcome == "ok" for r in srv.records)
    # only what was never answered: the 3 finished records' 6 answers are not asked again; the
    # critiques of the 5 records whose revision failed are (a record is journaled whole)
    assert len(first_ok - asked) == 6
    assert len(asked) == n_requests - 6 and len(srv.records) == len(asked)
    assert (res.path / "revisions.jsonl").read_bytes() == (ref.path / "revisions.jsonl").read_bytes()
    m, m_ref = res.stage_info["metrics"], ref.stage_info["metrics"]
    assert {k: v for k, v in m.items() if "per_s" not in k and "resumed" not in k} == \
        {k: v for k, v in m_ref.items() if "per_s" not in k and "resumed" not in k}
