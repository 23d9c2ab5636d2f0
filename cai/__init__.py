"""cai: Constitutional AI and RL from AI feedback, matched against human-feedback RLHF.

The data flow is one direction, every arrow an artifact on disk (see DESIGN.md):
prompts -> responses -> critique/revision -> SFT -> pairs -> labels -> reward/DPO/PPO ->
evaluation -> report.
"""

__version__ = "0.1.0"
