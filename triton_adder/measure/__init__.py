"""The measurement layer of `python -m triton_adder.bench`, `.report` and `.tune`.

- `machine`: where the numbers were taken (device, clocks, versions, git revision) and the
  device's peak rates (`device_ceiling`);
- `precision`: `tf32_mode`, the one switch for TF32 in cuDNN convolutions and cuBLAS matmuls;
- `timing`: the benchmarker per device and the `Recorder` that turns every measurement, failed
  ones included, into a row (one at a time, or several interleaved);
- `baselines`: the published unfold-and-broadcast adder, cdist(p=1), their working sets;
- `derived`: the row columns (`COLUMNS`), the derived ones (`derive`: rates, percent of the
  ceiling, speedups, operation counts, 45 nm energy) and their constants;
- `int8`: the int8 rows on the CPU: the int8 adder (tuned and default blocking) against float32
  conv2d, PyTorch's int8 quantized conv2d and the float32 adder, timed interleaved;
- `loops`: `measure`, the layer and whole-model measurements of one model.
"""
