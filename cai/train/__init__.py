"""Training loops, one readable file each (CleanRL-style): ``sft``, ``reward``, ``dpo``, ``ppo``.

Shared plumbing (seeds, accelerator, optimizer and schedule, exact-resume checkpoints, metrics
logging, loss-mask collation) lives in :mod:`cai.train.common`. Import the loop you need from its
module; this package imports nothing heavy on its own.
"""
