"""Package layout only (metadata is in pyproject.toml): every package under src/, plus the top-level
conf/ folder shipped inside the wheel as `rlcm_exp.conf`, so that an installed `rlcm-exp` composes
the same configs as a source checkout."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages("src"), "rlcm_exp.conf"],
    package_dir={"": "src", "rlcm_exp.conf": "conf"},
)
