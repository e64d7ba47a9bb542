"""Evaluation of a policy: held-out reward (heldout.py, also run by the trainer), the inference-time
budget protocol of the paper's Fig. 6 (budget.py) and the evaluation of one checkpoint or run dir
(report.py; `python -m rlcm_exp.evaluate` is its command line). runs.py reads run dirs.

Everything here uses only the `rlcm_exp.policies.base.Policy` surface.
"""
