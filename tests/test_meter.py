"""The meter's arithmetic against hand-computed figures; energy counters on a fake sysfs."""

import dataclasses
import time

import pytest

import models
from configs import tiny
from models.config import ModelConfig
from train.meter import energy, flops, hardware
from train.meter import run_meter as meter


@dataclasses.dataclass
class FakeDevice:
  platform: str = "tpu"
  device_kind: str = "TPU v4"
  process_index: int = 0


class FakeCounter:
  source = "fake counter"

  def __init__(self):
    self.value = 1000.0

  def joules(self) -> float:
    return self.value


def _tiny_model() -> ModelConfig:
  config = tiny.get_config()
  return ModelConfig.from_config(config.model, seq_len=config.data.seq_len, vocab_size=258)


def test_tiny_config_params_and_flops_by_hand():
  cfg = _tiny_model()  # V 258, D 32, 2 layers, 4 heads of 8, 2 kv heads, SwiGLU 64, tied
  attention = 32 * 4 * 8 + 2 * 32 * 2 * 8 + 4 * 8 * 32  # q, k and v, out = 3,072
  mlp = 3 * 32 * 64  # gate, up, down = 6,144
  per_layer = attention + mlp + 2 * 32  # two RMSNorm scales
  nonembedding = 2 * per_layer + 32  # final norm: 18,592
  assert models.param_count(cfg, embeddings=False) == nonembedding == 18_592
  assert models.param_count(cfg) == nonembedding + 258 * 32 == 26_848
  # 6 * (N_nonembedding + d*V) + 12 * layers * heads * head_dim * seq_len
  assert flops.train_flops_per_token(cfg, 32) == 6 * (18_592 + 8_256) + 12 * 2 * 4 * 8 * 32
  assert flops.train_flops_per_token(cfg, 32) == 185_664
  assert flops.forward_flops_per_token(cfg, 10) == 2 * 26_848 + 4 * 2 * 4 * 8 * 10
  # LoRA of rank 2 on q and down: 2 · ((32 + 32) + (64 + 32)) = 320 a layer. The frozen weights
  # take no weight gradient: 4 FLOPs each a token (forward, input gradient); the adapters 6.
  lora = dataclasses.replace(cfg, lora_rank=2, lora_targets=("q", "down"))
  assert models.param_count(lora) == 26_848 + 2 * 320
  frozen = 18_592 + 8_256
  assert flops.train_flops_per_token(lora, 32) == 4 * frozen + 6 * 640 + 12 * 2 * 4 * 8 * 32
  assert flops.forward_flops_per_token(lora, 10) == 2 * (26_848 + 640) + 4 * 2 * 4 * 8 * 10


def _meter(span: energy.EnergySpan | None = None) -> meter.Meter:
  m = meter.Meter(
    flops_per_token=185_664,
    peak_flops_per_second=1e9,
    energy_span=span or energy.EnergySpan(None),  # no real counter: the figures are hand-checked
  )
  m.tokens = 5_120
  m.seconds.update({"compile": 10.0, "train": 20.0, "eval": 3.0, "checkpoint": 1.0})
  return m


def test_mfu_and_windows():
  m = _meter()
  assert m.mfu(1000.0) == pytest.approx(185_664 * 1000 / 1e9)
  tokens_per_second, mfu = m.record_window(4096, 2.0)
  assert tokens_per_second == 2048 and mfu == pytest.approx(185_664 * 2048 / 1e9)
  m.record_window(4096, 4.0)
  m.record_window(4096, 1.0)
  report = m.report(
    params=26_848,
    params_nonembedding=18_592,
    devices=[FakeDevice()] * 4,
    pue=1.0,
    grid_kg_per_kwh=0.0,
    power_override=0.0,
    wall_seconds=40.0,
  )
  samples = [185_664 * t / 1e9 for t in (2048, 1024, 4096)]
  assert report["mfu_mean"] == pytest.approx(sum(samples) / 3)
  assert report["mfu_median"] == pytest.approx(samples[0])


def test_a_phase_inside_another_is_counted_once():
  """The restore inside start-up had counted in both phases (their sum past the wall time)."""
  m = meter.Meter(flops_per_token=1, peak_flops_per_second=1.0)
  with m.phase("restore_or_init"):
    time.sleep(0.05)
    with m.phase("checkpoint"):
      time.sleep(0.1)
  with m.phase("checkpoint"):
    time.sleep(0.02)
  wall = time.perf_counter() - m.started
  assert 0.05 <= m.seconds["restore_or_init"] < 0.1 and m.seconds["checkpoint"] >= 0.12
  assert sum(m.seconds.values()) <= wall


def test_nvml_reads_the_gpus_cuda_gave_this_process():
  """NVML ignores CUDA_VISIBLE_DEVICES: CUDA's ordinal 0 of a process given "4,5" is NVML's 4
  (it had read GPU 0, another process's or an idle one)."""
  assert energy.nvml_device(0, {}) == ("index", 0)
  assert energy.nvml_device(1, {"CUDA_VISIBLE_DEVICES": "4,5"}) == ("index", 5)
  uuid = "GPU-8e1c2a47-0000-4d3b-9f00-1a2b3c4d5e6f"
  assert energy.nvml_device(0, {"CUDA_VISIBLE_DEVICES": f"{uuid},GPU-x"}) == ("uuid", uuid)


def test_report_on_four_tpu_v4_chips_for_an_hour_by_hand():
  m = _meter()
  report = m.report(
    params=26_848,
    params_nonembedding=18_592,
    devices=[FakeDevice()] * 4,
    pue=1.1,
    grid_kg_per_kwh=0.4,
    power_override=0.0,
    wall_seconds=3600.0,
  )
  assert report["total_flops"] == 185_664 * 5_120
  assert report["device_hours"] == pytest.approx(4.0)
  # 4 device-hours × 192 W (TPU v4 table) = 0.768 kWh, × PUE 1.1 = 0.8448 kWh, × 0.4 kg/kWh.
  assert report["energy_kwh"] == pytest.approx(0.8448)
  assert report["co2e_kg"] == pytest.approx(0.8448 * 0.4)
  assert report["energy_source"] == "estimated"
  assert report["assumptions"]["power_watts_per_device"] == 192.0
  breakdown = report["time_breakdown"]
  for phase in ("compile_s", "train_s", "eval_s", "checkpoint_s", "input_wait_s", "other_s"):
    assert phase in breakdown
  assert breakdown["input_wait_s"] == 0.0 and breakdown["other_s"] == pytest.approx(3566.0)
  figures = report["figures"]
  assert figures["energy_kwh"] == {
    "value": report["energy_kwh"],
    "unit": "kWh",
    "source": "estimated",
  }
  assert figures["wall_time_s"]["source"] == "measured"
  assert figures["params"] == {"value": 26_848, "unit": "parameters", "source": "counted"}
  assert all({"value", "unit", "source"} == set(f) for f in figures.values())
  assert len(meter.summary_lines(report)) == 4
  assert "0.845 kWh (estimated" in meter.summary_lines(report)[3]


def test_power_override_and_unknown_devices():
  m = _meter()
  report = m.report(
    params=1,
    params_nonembedding=1,
    devices=[FakeDevice()] * 2,
    pue=1.0,
    grid_kg_per_kwh=1.0,
    power_override=500.0,
    wall_seconds=1800.0,
  )
  assert report["energy_kwh"] == pytest.approx(2 * 0.5 * 0.5)  # 1 device-hour at 500 W
  unknown = FakeDevice(device_kind="Mystery X1")
  assert energy.device_power_watts(unknown)[0] == hardware.DEFAULT_WATTS
  assert energy.device_power_watts(FakeDevice("gpu", "NVIDIA H100 80GB HBM3"))[0] == 700.0


def test_measured_energy_wins_over_the_table():
  counter = FakeCounter()
  m = _meter(energy.EnergySpan(counter, counter.joules()))
  counter.value += 3.6e6  # one kWh drawn since the start
  report = m.report(
    params=1,
    params_nonembedding=1,
    devices=[FakeDevice()],
    pue=1.2,
    grid_kg_per_kwh=0.5,
    power_override=0.0,
    wall_seconds=10.0,
  )
  assert report["energy_source"] == "measured" and report["energy_kwh"] == pytest.approx(1.2)
  assert report["co2e_kg"] == pytest.approx(0.6)
  assert "fake counter" in report["assumptions"]["energy_method"]


def test_cpu_devices_count_the_machine_once():
  cpu = FakeDevice("cpu", "cpu")
  assert energy.device_hours(3600.0, [cpu] * 8) == 1.0
  watts, source = energy.device_power_watts(cpu)
  assert "W/core" in source and watts > 0


def _rapl(root, package: int, energy_uj: int, max_uj: int = 1_000_000) -> None:
  domain = root / f"intel-rapl:{package}"
  domain.mkdir(exist_ok=True)
  (domain / "energy_uj").write_text(f"{energy_uj}\n")
  (domain / "max_energy_range_uj").write_text(f"{max_uj}\n")


def test_rapl_counter_sums_packages_and_handles_wraparound(tmp_path):
  _rapl(tmp_path, 0, 900_000)
  _rapl(tmp_path, 1, 100_000)
  sub = tmp_path / "intel-rapl:0:0"  # a sub-domain (core) is inside its package: not summed
  sub.mkdir()
  (sub / "energy_uj").write_text("5\n")
  counter = energy.RaplCounter.detect(str(tmp_path))
  assert counter is not None and len(counter.domains) == 2
  assert counter.joules() == 0.0
  _rapl(tmp_path, 0, 50_000)  # wrapped: 900,000 -> 1,000,000 -> 50,000 is 150,000 µJ
  _rapl(tmp_path, 1, 400_000)  # +300,000 µJ
  assert counter.joules() == pytest.approx(0.45)
  assert energy.RaplCounter.detect(str(tmp_path / "absent")) is None


def test_meter_starts_without_a_counter_on_this_machine_or_with_one():
  # Whatever this machine offers, a new Meter reads it (or nothing) without failing.
  m = meter.Meter(flops_per_token=1, peak_flops_per_second=1.0)
  assert m.energy_span.measured_joules() is None or m.energy_span.measured_joules() >= 0
  assert m.started <= time.perf_counter()


def test_a_given_cpu_peak_is_used_at_float32_and_a_bad_one_is_named(monkeypatch):
  """LOOM_CPU_PEAK_FLOPS (the suite sets it for every run it starts): used as the peak of a float32
  run on the CPU; the benchmark's ``use_given=False`` measures; a bad value is one clear error."""
  monkeypatch.setenv(flops.PEAK_VARIABLE, "1.5e11")
  given = flops.run_peak("float32")
  assert given.flops_per_second == given.measured == 1.5e11 and given.source.startswith("given")
  measured = flops.run_peak("float32", repeats=2, use_given=False)
  assert measured.source.startswith("measured") and measured.flops_per_second != 1.5e11
  for bad in ("fast", "-3", "0", "inf", "nan"):
    monkeypatch.setenv(flops.PEAK_VARIABLE, bad)
    with pytest.raises(flops.PeakError, match=f"LOOM_CPU_PEAK_FLOPS='{bad}': must be a positive"):
      flops.run_peak("float32")
  monkeypatch.setenv(flops.PEAK_VARIABLE, " ")  # blank: unset
  assert flops.given_cpu_peak() is None
