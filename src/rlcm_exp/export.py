"""`python -m rlcm_exp.export RUN_DIR [--format lora|pipeline] [--out DIR] [--overwrite]`

Writes what a run learned as something diffusers loads without this package: a LoRA folder
(`pipe.load_lora_weights(DIR)`) or a standalone pipeline with the LoRA fused in
(`DiffusionPipeline.from_pretrained(DIR)`), each with a model card (base model, task, reward,
steps, final metrics) and .rlcm_export.json, the list of files the export wrote.

A non-empty DIR is refused; --overwrite replaces an earlier export there, and only the files that
export listed (other files in DIR are kept; one the export would replace but did not write is
refused; nothing is deleted or replaced through a symbolic link). The final LoRA is read whole first:
a truncated or damaged one is refused before anything is written. The export is built in a hidden
folder beside DIR (.DIR.PID.HEX.export-tmp); one left by a killed export is removed by the next.
Exit codes: 0 written, 2 bad arguments, run dir, LoRA or output folder.
The library is `rlcm_exp.evaluation.export`.
"""

from __future__ import annotations

import argparse

from rlcm_exp.errors import exit_on_config_error
from rlcm_exp.evaluation.export import FORMATS, export


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rlcm_exp.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", help="a run dir written by `python -m rlcm_exp`")
    parser.add_argument("--format", default="lora", choices=list(FORMATS))
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/export/FORMAT)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export in --out (only the files it listed in .rlcm_export.json)",
    )
    parser.add_argument(
        "--ema", action="store_true", help="export the EMA weights (checkpoints/final_ema; train.ema_decay)"
    )
    args = parser.parse_args(argv)
    written = exit_on_config_error(
        lambda: export(args.run_dir, args.format, args.out, args.overwrite, ema=args.ema)
    )
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
