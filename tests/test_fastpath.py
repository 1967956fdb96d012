"""fastpath.py + bench.py: attack passes compute no weight gradients (fp32 and bf16), the CPU
default is the identity, the baseline loop attacks exactly like ours, the benchmark runs."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from paper_repro.robustness import attacks
from paper_repro.perf import bench
from paper_repro.runtime import fastpath
from paper_repro.perf import probes
from paper_repro.cli import main
from paper_repro.config import build_config
from paper_repro.models import create_model
from paper_repro.training.methods import get_method, list_methods
from paper_repro.training.runner import train_run
from conftest import tiny_config

EPS = 0.1


@pytest.fixture(autouse=True)
def _one_thread():
    """The CPU is shared by other processes: one thread avoids OpenMP oversubscription stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("cnn-small", num_classes=10, in_channels=1, width=4,
                        mean=(0.5,), std=(0.25,))


def _batch(b: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g)


def _cfg(**values):
    return build_config(("test", {"device": "cpu", **values}))


ATTACKS = {"pgd": lambda m, x, y: attacks.pgd(m, x, y, eps=EPS, alpha=EPS / 4, steps=3),
           "fgsm_rs": lambda m, x, y: attacks.fgsm_rs(m, x, y, eps=EPS)}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attack_pass_leaves_every_parameter_gradient_untouched(attack, precision):
    cfg = _cfg(precision=precision)
    model = fastpath.prepare_model(_model(), cfg, torch.device("cpu"))
    model.train()
    params = list(model.parameters())
    for i, p in enumerate(params):  # half hold a gradient already, half have none
        p.grad = torch.randn_like(p) if i % 2 == 0 else None
    before = [None if p.grad is None else p.grad.clone() for p in params]
    x, y = _batch(128)  # = the hidden Linear's 128 outputs: its input gradient has its weight's shape
    with fastpath.autocast(cfg, torch.device("cpu")), probes.WeightGradProbe(model) as probe:
        x_adv = ATTACKS[attack](model, x, y)
    for p, b in zip(params, before):
        assert p.requires_grad  # unfrozen again
        if b is None:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, b)
    assert not probe.ops, probe.ops  # no conv/BN/linear weight-gradient op was launched
    assert x_adv.dtype == torch.float32  # δ and the images stay fp32 under bf16 autocast
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1


def test_reference_loop_attacks_like_ours_but_computes_weight_gradients():
    """The --baseline-loop is a fair comparison: same adversarial examples for the same seed
    (and the same BN running statistics), only the gradient call differs."""
    ours, ref = _model(), _model()
    ours.train(), ref.train()
    x, y = _batch()
    torch.manual_seed(7)
    x_ours = attacks.pgd(ours, x, y, eps=EPS, alpha=EPS / 4, steps=3)
    torch.manual_seed(7)
    with probes.WeightGradProbe(ref) as probe:
        x_ref = bench.reference_pgd(ref, x, y, eps=EPS, alpha=EPS / 4, steps=3)
    assert torch.equal(x_ours, x_ref)
    for a, b in zip(ours.buffers(), ref.buffers()):
        assert torch.equal(a, b)
    # ...and the probe does see the waste it is meant to catch
    assert probe.ops["convolution_backward"] >= 3
    assert probe.ops["mm"] + probe.ops["addmm"] >= 3  # the classifier's weight gradient
    assert all(p.grad is not None for p in ref.parameters())


def test_cpu_default_fast_path_is_the_identity():
    cfg = _cfg()
    cpu = torch.device("cpu")
    assert fastpath.describe(cfg, cpu) == {"precision": "fp32", "channels_last": False,
                                          "compiled": False}
    model = _model()
    x, _ = _batch()
    expected = model(x)
    fastpath.prepare_model(model, cfg, cpu)
    assert "forward" not in vars(model.stem)  # nothing patched
    assert model.stem.weight.is_contiguous()
    with fastpath.autocast(cfg, cpu):
        assert not torch.is_autocast_enabled("cpu")
        assert torch.equal(model(x), expected)
    assert fastpath.resolve_precision(cfg, torch.device("cuda")) == "bf16"
    assert fastpath.uses_channels_last(cfg, torch.device("cuda"))


def test_bf16_runs_the_stem_in_fp32_and_the_rest_in_bf16():
    cfg = _cfg(precision="bf16", channels_last=True)
    model = fastpath.prepare_model(_model(), cfg, torch.device("cpu"))
    assert model.stem.weight.is_contiguous(memory_format=torch.channels_last)
    x, _ = _batch()
    with fastpath.autocast(cfg, torch.device("cpu")):
        z0 = model.stem(model.normalize(x))
        logits = model(x)
    exact = F.conv2d(model.normalize(x), model.stem.weight, padding=1)  # fp32, no autocast
    assert z0.dtype == torch.bfloat16 and torch.equal(z0, exact.to(torch.bfloat16))
    assert logits.dtype == torch.bfloat16
    assert set(model.state_dict()) == set(_model().state_dict())  # checkpoints unchanged


def test_runner_records_the_resolved_precision_and_trains_in_bf16(tmp_path):
    fp32 = train_run(tiny_config(tmp_path / "a", method="pgd_at", epochs=1), quiet=True)
    bf16 = train_run(tiny_config(tmp_path / "b", method="pgd_at", epochs=1, precision="bf16"),
                 quiet=True)
    assert fp32["precision"] == "fp32" and bf16["precision"] == "bf16"
    assert fp32["config_hash"] != bf16["config_hash"]  # a bf16 run is a different result
    assert bf16["status"] == "done" and 0 <= bf16["clean_acc"] <= 100
    assert bf16["train_flops"] == fp32["train_flops"]  # same algorithm, same FLOPs


REQUIRED = ("method", "arch", "batch", "device", "images_per_s", "seconds_per_epoch",
            "gflop_per_image", "tflops", "mfu_datasheet", "mfu_measured", "wgrad_in_attack")
SMOKE = ["--arch", "cnn-small", "--set", "model_args.width=4", "--batch", "8",
         "--dataset", "fashion-mnist", "--warmup", "1", "--steps", "1", "--repeats", "1",
         "--device", "cpu"]


def test_bench_runs_end_to_end_and_merges_its_json(tmp_path, capsys):
    out = tmp_path / "bench" / "cpu.json"
    assert main(["bench", "--method", "pgd_at", "--baseline-loop", *SMOKE,
                 "--results-dir", str(tmp_path)]) == 0
    assert "img/s" in capsys.readouterr().out
    (entry,) = json.loads(out.read_text())["entries"]
    for key in (*REQUIRED, "speedup_vs_baseline_loop"):
        assert key in entry, key
    assert entry["wgrad_in_attack"] is False and entry["attack_passes_probed"] == 10  # PGD-10
    assert entry["mfu_datasheet"] is None and entry["mfu_measured"] > 0
    assert entry["images_per_s"] > 0 and entry["speedup_vs_baseline_loop"] > 0
    # the reference loop's counted FLOPs include the attack's weight gradients: (3k+3)F > (2k+3)F
    assert entry["baseline_gflop_per_image"] > entry["gflop_per_image"]
    assert main(["bench", "--method", "natural", *SMOKE, "--results-dir", str(tmp_path)]) == 0
    assert main(["bench", "--method", "pgd_at", *SMOKE, "--results-dir", str(tmp_path)]) == 0
    entries = json.loads(out.read_text())["entries"]
    assert sorted(e["method"] for e in entries) == ["natural", "pgd_at"]  # merged, re-measured


@pytest.mark.parametrize("method", list_methods())
def test_bench_probes_every_method(method):
    """Every registered method: its attack passes (as its class declares them) compute no
    weight gradient; a method without attack-only passes reports None, not a pass."""
    entry = bench.measure(method, "cnn-small", 8, dataset="fashion-mnist", device="cpu",
                          warmup=1, steps=1, repeats=1, model_args={"width": 4})
    has_attack_passes = get_method(method).attack_passes is not None
    assert entry["wgrad_in_attack"] is (False if has_attack_passes else None)
    assert (entry["attack_passes_probed"] > 0) == has_attack_passes
    assert entry["gflop_per_image"] > 0


def test_bench_bad_input_is_one_line(tmp_path, capsys):
    assert main(["bench", "--method", "natural", "--baseline-loop", *SMOKE,
                 "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--baseline-loop" in err
    assert not (tmp_path / "bench").exists()
