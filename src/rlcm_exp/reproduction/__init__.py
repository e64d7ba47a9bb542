"""The paper's reproduction and the comparison studies (`python -m rlcm_exp.reproduce`).

What runs is data: a scale is conf/reproduce/<scale>.yaml, a study conf/study/<study>.yaml; both
name the algorithms they know, and which is the method and which the baseline (the code fixes no
algorithm name; it quotes the paper's claims as text). Both run the same way: each
planned training run a subprocess, finished runs skipped and unfinished ones resumed on a re-run,
then the final checkpoints' inference evaluation (Fig. 6) and a report.

- plan.py: a scale and its planned training runs (RunSpec), the Outcome of running a plan
- pipeline.py: running any plan (run_all), the evaluations it still needs, one stage end to end
- scale_run.py: a scale: plan, train, evaluate, then report.py's report
- report.py: a scale's report.md / report.json (Figs. 4-7, the tables, the commands)
- study.py: a study (conf/study/<name>.yaml), its tuning and final plans and the selection rule
- study_run.py: a study's two stages (tuning -> selection.json and tune.md; final -> the report)
- study_stats.py, study_figures.py, study_report.py: its bootstrap statistics, figures and report

Imports: analysis, configs, errors, evaluation, provenance and (study_figures) the toy detector.
"""
