"""Where a run's tensors live and in which dtype its gradients travel, checked without a GPU.

The device and the process-group backend come from DeepSpeed's accelerator (DS_ACCELERATOR, else its
detection), never from torch.cuda; every tensor handed to a collective lives on that device; under bf16
autocast with ZeRO the gradients are still reduced in float32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from molscale.trainer.train.config import RunConfig
from tests.support import ROOT, cpu_env
from tests.trainer.helpers import make_batch, tiny_model


@pytest.fixture
def gpu_host(monkeypatch):
    """torch sees a GPU; DS_ACCELERATOR=cpu says to stay on the CPU. DeepSpeed picks its accelerator afresh."""
    import deepspeed.accelerator.real_accelerator as real
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(real, "ds_accelerator", None)


def test_device_and_backend_follow_ds_accelerator_not_torch_cuda(gpu_host):
    from molscale.trainer.train.distributed import backend, run_device
    assert run_device() == torch.device("cpu")
    assert backend() == "gloo"


# torch reports a GPU in the whole process (DeepSpeed's accelerator itself included), DS_ACCELERATOR=cpu.
FAKE_GPU_RUNNER = """
import runpy, sys
import torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
sys.argv = ["trainer/main.py"] + sys.argv[1:]
runpy.run_path("trainer/main.py", run_name="__main__")
"""


def test_a_run_with_ds_accelerator_cpu_on_a_gpu_host_stays_on_the_cpu(qm9_small, tmp_path):
    """Process group, device, validation and the checkpointed RNG states of a whole run (then resumed) follow
    DS_ACCELERATOR=cpu although torch.cuda says a GPU is there (the CPU build of torch has no CUDA to use)."""
    run_dir = tmp_path / "run"
    args = ["--config", "cluster/cpu_smoke.json", "--run-dir", str(run_dir), "--set", f"data.url={qm9_small}"]
    for setting in ("checkpoint.every_steps=1", "evaluation.every_steps=1", "logging.progress_bar=false",
                    "logging.wandb.enabled=false"):
        args += ["--set", setting]
    for steps in (1, 2):  # the second start resumes from the first one's checkpoint
        r = subprocess.run([sys.executable, "-c", FAKE_GPU_RUNNER, *args, "--max-steps", str(steps),
                            "--resume", "auto"], capture_output=True, text=True, timeout=600, env=cpu_env(), cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
    assert (run_dir / "step00000002" / "complete").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and all(row["valid/loss"] > 0 for row in rows)
    state = torch.load(run_dir / "step00000002" / "rank0.pt", weights_only=False)
    assert state["device_rng"] is None  # the CPU accelerator's generator is torch_rng itself


class _Reduced(Exception):
    pass


def test_validation_sums_stay_on_the_run_device(monkeypatch):
    """Trainer.validate on torch's ``meta`` device (shapes, no data) with the all-reduce replaced by a recorder.

    Reading a meta tensor on the host raises, so reaching the all-reduce at all proves the batch loop reads
    nothing back; the recorder then proves the reduced tensor lives on the run's device (on a GPU, NCCL refuses
    CPU tensors). On the old code the loop's float() of each loss raised before the all-reduce, and the sums it
    reduced were made on the CPU whatever the run's device.
    """
    from molscale.trainer.train.loop import Trainer

    class Loader(list):
        def load_state_dict(self, state):
            pass

    trainer = Trainer.__new__(Trainer)  # only what validate uses: no process group, no DeepSpeed engine
    trainer.cfg = RunConfig()
    trainer.cfg.model.properties = ["gap", "mu"]  # tiny_model's property head
    trainer.rank, trainer.device, trainer.ema = 0, torch.device("meta"), None
    trainer.model = tiny_model("unigem", hidden=8, layers=2).to("meta")
    trainer.valid_loader = Loader([make_batch([5, 9, 7], seed=s) for s in range(3)])
    trainer._valid_start = None
    reduced = []

    def recorder(tensor, *args, **kwargs):
        reduced.append(tensor.device)
        raise _Reduced  # meta tensors hold no values to read back

    monkeypatch.setattr(torch.distributed, "all_reduce", recorder)
    with pytest.raises(_Reduced):
        trainer.validate()
    assert reduced == [torch.device("meta")]


# One process, a world of one on gloo: DeepSpeed's engine with ZeRO-2 and molscale's bf16 autocast config.
# DeepSpeed marks a parameter for lower-precision gradient communication by setting `comm_dtype` on it
# (deepspeed/runtime/torch_autocast.py, init_autocast_params) and keeps one reduce bucket per communication
# dtype (zero/stage_1_and_2.py, DeepSpeedZeroOptimizer.ipg_buckets). The same engine built from the config
# without "lower_precision_safe_modules" shows that the check can see the marks.
ENGINE_PROBE = """
import json, torch, deepspeed
from deepspeed.runtime.torch_autocast import has_comm_dtype
from molscale.datasets.chemistry.elements import QM9_ATOM_VOCAB
from molscale.trainer.model.networks import ModelConfig, build_model
from molscale.trainer.train.config import load_config
from molscale.trainer.train.distributed import init_distributed
from molscale.trainer.train.loop import deepspeed_config

init_distributed()
cfg = load_config("cluster/cpu_smoke.json", ["deepspeed.zero_stage=2", "deepspeed.bf16=true"])
result = {}
for name, ds_config in (("molscale", deepspeed_config(cfg, 1)), ("default", deepspeed_config(cfg, 1))):
    if name == "default":
        ds_config["torch_autocast"].pop("lower_precision_safe_modules", None)
    model = build_model(ModelConfig(kind="unigem", hidden=8, layers=2, atom_vocab=list(QM9_ATOM_VOCAB)))
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds_config)
    result[name] = {"marked": sum(has_comm_dtype(p) for p in model.parameters()),
                    "buckets": sorted(str(d) for d in engine.optimizer.ipg_buckets)}
print("RESULT " + json.dumps(result))
"""


def test_zero2_bf16_autocast_reduces_gradients_in_float32():
    r = subprocess.run([sys.executable, "-c", ENGINE_PROBE], capture_output=True, text=True, timeout=600,
                       env=cpu_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert result["molscale"] == {"marked": 0, "buckets": ["torch.float32"]}
    assert result["default"]["marked"] > 0 and "torch.bfloat16" in result["default"]["buckets"]


def test_cpu_ranks_compile_nothing_and_ignore_a_stale_extension_lock(tmp_path):
    """DeepSpeed's CPU backend would compile its inference-only shared-memory op under a lock file; a launch killed
    mid-compile leaves the lock and every later launch waited on it forever. The trainer skips that op."""
    extensions = tmp_path / "torch_extensions"
    for py in ("py311_cpu", "py312_cpu"):  # a stale lock where torch would build the op
        (extensions / py / "deepspeed_shm_comm").mkdir(parents=True)
        (extensions / py / "deepspeed_shm_comm" / "lock").touch()
    code = ("import torch, torch.distributed as dist\n"
            "from molscale.trainer.train.distributed import init_distributed\n"
            "init_distributed()\n"
            "t = torch.ones(3)\n"
            "dist.all_reduce(t)\n"
            "print('reduced', t.tolist(), dist.get_backend())\n")
    env = cpu_env(TORCH_EXTENSIONS_DIR=str(extensions))
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    # the op's 67 MB /dev/shm buffers per rank outlived killed ranks and filled the machine's memory
    shm_new = (set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()) - shm_before
    assert not [name for name in shm_new if name.startswith("deepspeed")], shm_new
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reduced [1.0, 1.0, 1.0] gloo" in done.stdout
    built = [p.name for p in extensions.rglob("*") if p.is_file() and p.name != "lock"]
    assert built == [], built
