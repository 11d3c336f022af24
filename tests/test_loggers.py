"""Hyper-parameters reach the loggers: the resolved config, flattened to dotted keys, in
TensorBoard's hparams.yaml and HPARAMS plugin data (with the final metrics) and in the offline
wandb run's config; wandb prints no warning about the ``anonymous`` setting."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_cli

ARGS = ("experiment=digits_teacher", "trainer.max_steps=3", "dataset.batch_size=16", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "callbacks.progress=none", "logger.tensorboard=true", "logger.wandb=true")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run with both loggers (wandb offline); its run dir and output."""
    tmp = tmp_path_factory.mktemp("loggers")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp), "WANDB_CACHE_DIR": str(tmp / "cache"),
           "WANDB_CONFIG_DIR": str(tmp / "cfg")}
    r = run_cli(*ARGS, f"runs_dir={tmp / 'runs'}", env=env)
    assert r.returncode == 0, r.output
    return next((tmp / "runs" / "digits_teacher").iterdir()), r.output


def hparams_plugin_data(tb_dir: Path) -> dict:
    """The HPARAMS plugin's records in the run's event files: {kind: proto}."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    found = {}
    for f in sorted(tb_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(f)).Load():
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
                    kind = data.WhichOneof("data")
                    found[kind] = getattr(data, kind)
    return found


def wandb_records(path: Path):
    """The records of a wandb run file (LevelDB's log format after a 7-byte header), parsed."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        kind = data[pos + 6] if left >= 7 else 0
        if kind == 0:  # a block's zero padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def test_tensorboard_gets_the_config_and_final_metrics(run):
    run_dir, _ = run
    tb = run_dir / "tensorboard"
    hparams = yaml.safe_load((tb / "hparams.yaml").read_text())
    assert hparams["optim.optimizer.lr"] == pytest.approx(2e-3)
    assert hparams["experiment_name"] == "digits_teacher" and hparams["trainer.max_steps"] == 3
    plugin = hparams_plugin_data(tb)
    assert {"experiment", "session_start_info", "session_end_info"} <= set(plugin), plugin.keys()
    start = plugin["session_start_info"].hparams
    assert start["optim.optimizer.lr"].number_value == pytest.approx(2e-3)
    assert start["model._target_"].string_value.endswith("DigitsCNN")
    metrics = {m.name.tag for m in plugin["experiment"].metric_infos}
    results = json.loads((run_dir / "results.json").read_text())
    assert {"test/acc", "test/loss", "global_step"} <= metrics
    assert {k for k in results if "/" in k} <= metrics
    assert "hp_metric" not in metrics  # no -1 placeholder


def test_offline_wandb_run_holds_the_config_and_no_anonymous_warning(run):
    run_dir, output = run
    assert "anonymous" not in output, output
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    config, summary = {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        items = {"config": lambda: record.config.update, "run": lambda: record.run.config.update}.get(kind)
        if items is not None:
            config.update({i.key: json.loads(i.value_json) for i in items()})
        if kind == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in record.summary.update if i.key})
    assert config["optim.optimizer.lr"] == pytest.approx(2e-3)
    assert config["trainer.max_steps"] == 3
    assert "test/acc" in summary and summary["global_step"] == 3
