"""Reading finished runs and turning them into figures, tables and summaries (no wandb needed).

Generic: nothing here knows the paper, its claims or which algorithms exist (the reproduction and
the studies, which do, are rlcm_exp.reproduction; it imports this package, never the reverse).

- runs.py: finding run folders, reading metrics.jsonl / eval.jsonl, seed-mean curves
- tables.py: the comparison tables (time to threshold, seconds per phase, rollout time)
- figures.py: the figures (a run's summary, a sweep's comparison, reward curves per task and group,
  reward against inference seconds)
- summary.py: the end-of-run summary (its figures and the printed before -> after line)
- sweep.py: a sweep's results table (`python -m rlcm_exp.compare`)
"""
