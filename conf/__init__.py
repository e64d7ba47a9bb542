# Makes conf/ importable as the package `rlcm_exp.conf` (see setup.py), so Hydra finds the configs
# through `pkg://rlcm_exp.conf` in an editable and in a non-editable install alike.
