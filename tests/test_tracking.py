"""Tracking: wandb offline without credentials writes a run folder with the config, the time axes and the
images; logger=none does not even import wandb; metrics.jsonl and GPU-hours are always there."""

from __future__ import annotations

import glob
import os
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rlcm_exp.tracking import TIME_AXES, read_metrics, resolve_wandb_mode, to_uint8_hwc, wandb_has_credentials

from .helpers import CONF, SMALL, run_in_process


def wandb_records(path: Path) -> Iterator[object]:
    """The protobuf records of an offline .wandb file (wandb 0.31 ships no reader): a 7-byte header, then
    LevelDB-log framing, 32 KiB blocks of [crc32 u32, length u16, type u8] + payload chunks."""
    from wandb.proto import wandb_internal_pb2 as pb

    buf, pos, block, parts = path.read_bytes(), 7, 32768, []
    assert buf[:4] == b":W&B"
    while pos + 7 <= len(buf):
        if block - pos % block < 7:  # too little room for a header: the block is padded
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", buf[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        parts.append(buf[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            parts = []
            yield rec


@pytest.fixture
def no_wandb_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    for key, sub in (("WANDB_CONFIG_DIR", "cfg"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(key, str(tmp_path / "wandb_home" / sub))


def test_wandb_offline_run_folder_has_config_axes_and_images(
    tiny_cache, tmp_path, no_wandb_credentials, capsys
) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        *SMALL,
        "train.epochs=2",
        "logger=wandb",
        "logger.group=g1",
        "logger.tags=[paper,smoke]",
        "train.eval_every=1",
        "train.reward_server_gpus=2",
    ]
    records = run_in_process(overrides, run_dir)
    assert "wandb sync" in capsys.readouterr().out  # says how to upload the offline run

    (folder,) = [Path(p) for p in glob.glob(str(run_dir / "wandb" / "offline-run-*"))]
    (binary,) = folder.glob("*.wandb")
    assert binary.stat().st_size > 0
    images = sorted((folder / "files" / "media" / "images").glob("*.png"))
    assert any(p.name.startswith("samples_") for p in images) and any(
        p.name.startswith("eval_samples_") for p in images
    )
    pixels = np.asarray(Image.open(images[0]))
    assert pixels.dtype == np.uint8 and pixels.max() > 0  # not the all-black cast of [0, 1] floats

    recs = list(wandb_records(binary))
    (run,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    assert run.run_group == "g1" and list(run.tags) == ["paper", "smoke"]
    config_keys = {item.key for item in run.config.update}
    assert {"algo", "sampler", "train", "batch_plan"} <= config_keys  # the resolved config
    metrics = [r.metric for r in recs if r.WhichOneof("record_type") == "metric"]
    assert {m.name for m in metrics} >= set(TIME_AXES)
    assert any(m.glob_name == "*" and m.step_metric == "epoch" for m in metrics)
    rows = [
        {i.key or "/".join(i.nested_key) for i in r.history.item}
        for r in recs
        if r.WhichOneof("record_type") == "history"
    ]
    scalar_rows = [row for row in rows if "reward_mean" in row]
    assert len(scalar_rows) == 2 and all(set(TIME_AXES) <= row for row in scalar_rows)
    # the epoch's images ride in the epoch's row, so they carry every time axis
    assert any("gpu_hours" in row and any(k.startswith("samples/") for k in row) for row in rows)

    # metrics.jsonl is written whatever the logger; GPU-hours count the process and the reward server's GPUs
    local = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in local] == [0, 1] == [r["epoch"] for r in records]
    for rec in local:
        assert rec["gpu_hours"] == pytest.approx(rec["wallclock_s"] * (1 + 2) / 3600, rel=1e-9)


@pytest.mark.subprocess
def test_logger_none_touches_no_wandb(tiny_cache, tmp_path) -> None:
    """In a fresh interpreter: a whole run with logger=none neither imports wandb nor writes a wandb folder."""
    run_dir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys
        from hydra import compose, initialize_config_dir
        from rlcm_exp.training.build import train
        with initialize_config_dir(config_dir={str(CONF)!r}, version_base="1.3"):
            cfg = compose("config", overrides={[*SMALL, "train.epochs=1", "logger=none"]!r})
        train(cfg, __import__("pathlib").Path({str(run_dir)!r}))
        assert "wandb" not in sys.modules, "logger=none imported wandb"
        print("NO_WANDB_OK")
    """)
    env = {**os.environ, "RLCM_EXP_CACHE": tiny_cache, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0 and "NO_WANDB_OK" in proc.stdout, proc.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").is_file()
    assert not [p for p in run_dir.rglob("*") if "wandb" in p.name.lower()]


def test_wandb_mode_auto(tmp_path: Path) -> None:
    missing = {"NETRC": str(tmp_path / "none")}
    assert resolve_wandb_mode("auto", missing) == "offline"
    assert resolve_wandb_mode("auto", {**missing, "WANDB_API_KEY": "k" * 40}) == "online"
    assert (
        resolve_wandb_mode("auto", {**missing, "WANDB_API_KEY": "k", "WANDB_MODE": "disabled"}) == "disabled"
    )
    assert resolve_wandb_mode("online", missing) == "online"  # an explicit mode is kept
    netrc = tmp_path / "netrc"
    netrc.write_text("machine github.com login me password x\n")
    assert not wandb_has_credentials({"NETRC": str(netrc)})  # a netrc alone is not a wandb login
    netrc.write_text("machine api.wandb.ai login user password secret\n")
    assert wandb_has_credentials({"NETRC": str(netrc)})
    assert not wandb_has_credentials({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.org"})


def test_images_convert_to_uint8_hwc() -> None:
    img = torch.tensor([0.0, 0.5, 1.0, 1.5]).view(1, 2, 2).expand(3, 2, 2)
    out = to_uint8_hwc(img)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[:, :, 0].ravel().tolist() == [0, 128, 255, 255]
