"""Reading finished runs and turning them into figures, tables and reports (no wandb needed).

- runs.py: finding run folders, reading metrics.jsonl / eval.jsonl, seed-mean curves
- tables.py: the comparison tables (time to threshold, seconds per phase, rollout time)
- figures.py: every figure (a run's summary, a sweep's comparison, the paper's Figs. 4-7)
- summary.py: the end-of-run summary (its figures and the printed before -> after line)
- plan.py: a reproduction's scale (conf/reproduce/<scale>.yaml) and its planned training runs
- reproduction.py: running a plan, evaluating its checkpoints (Fig. 6), then the report
- report.py: the reproduction's report.md / report.json
"""
