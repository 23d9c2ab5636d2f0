"""Everything an AI judge produces: critiques and revisions (SL-CAI), pairwise labels (RLAIF).

``cai.judges`` is the layer that talks to a judge model (a local HF model or an API);
the stages built on it turn constitutions and pairs into prompts, and answers into artifacts.
"""
