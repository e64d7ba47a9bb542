"""Phase benchmark of RLCM and DDPO, measured against the bare-model compute floor.

    python -m benchmarks.bench --scale tiny|toy|full --repeats N --out benchmarks/results

For each algorithm the production code runs unchanged: `rlcm_exp.training.build.train` composes
the model family, policy, LoRA, reward and optimizer exactly as a real run does and drives the
real `Trainer`. The benchmark only hands it a callback (instrument.py) that wraps a few bound
methods of the run's own objects with timers (policy.encode_prompts / sample / decode / action_mean_std,
accelerator.backward / clip_grad_norm_, optimizer.step, ...), times each epoch and then, in the
same process and at the same batch sizes, the bare model calls that epoch cannot avoid (the
*floor*, floor.py): text encoder, UNet forwards of sampling, VAE decodes, the reward, UNet
forward+backward of training, optimizer steps. `overhead = epoch / floor` per repeat; median and
spread are reported (report.py).

Each algorithm runs in its own subprocess (run.py), so its peak memory and allocator state are
its own. Results: `OUT/{scale}-{device}.json` (everything, raw per-repeat numbers included) and
`OUT/{scale}-{device}.md` (the table). See benchmarks/README.md for how to read them.

Modules: scales (sizes and overrides), full_models (SD-1.5-sized random pipelines), instrument
(timers, memory, the trainer callback), floor, environment, run (processes), report; __main__
holds the command line only. `python -m benchmarks.bench.gpu_check` (gpu_check, gpu_plan,
gpu_report) is the ten-minute GPU check of `make gpu-check`.
"""
