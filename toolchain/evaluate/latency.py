"""The bench stage: latency percentiles, throughput, cold start and peak memory of every variant.

Each variant runs in a process of its own (toolchain.evaluate.measure, started by toolchain.core.launcher), so that
training, or another variant, cannot pollute its memory or its load time, and the measurement is repeated in rounds:
in each round every variant, in a rotating order, gets a fresh process that loads it (cold start), times every case
after a warm-up, and reports its peak memory. A slow drift of a shared machine then lands on every variant alike, and
because each round is a new process (new memory layout, new thread placement), the spread of the per-round ratios to
PyTorch covers what changes from one run to the next, not only the jitter within one process.
"""

from __future__ import annotations

import logging

log = logging.getLogger("toolchain")

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def available_targets(targets: list[str]) -> tuple[list[str], dict[str, str]]:
    """(targets to measure, {skipped target: why}) for this machine's onnxruntime build and devices. A provider
    that the build lists is started on a one-node model first: onnxruntime falls back to the CPU, with only a log
    line, when its libraries (CUDA, cuDNN, TensorRT) or the device are missing, and a CPU timing must never be
    reported under a GPU target's name."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    measured, skipped = [], {}
    for t in targets:
        if PROVIDERS[t] not in have:
            skipped[t] = (
                f"onnxruntime has no {PROVIDERS[t]} here (install onnxruntime-gpu, built for this machine's CUDA "
                "major version, on a machine with an NVIDIA GPU"
                + (", and put the TensorRT libraries on the library path)" if t == "tensorrt" else ")")
            )
        elif t != "cpu" and (why := provider_fails(PROVIDERS[t])):
            skipped[t] = why
        else:
            measured.append(t)
    return measured, skipped


def provider_fails(provider: str) -> str | None:
    """Why `provider` does not start here (None: it runs), from a session on a one-node model."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=[provider, "CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - any failure to start is the answer
        return f"{provider} is in this onnxruntime build but did not start: {e}".strip()
    active = session.get_providers()
    if provider not in active:
        return (
            f"{provider} is in this onnxruntime build but did not start (onnxruntime fell back to {active}; its "
            "log above says which library or device is missing)"
        )
    return None
