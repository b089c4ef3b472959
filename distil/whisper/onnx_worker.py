"""The ONNX side of `format=onnx`, run as `python -m distil.whisper.onnx_worker` by distil.whisper.onnx_export.

It runs in its own process because optimum-onnx (the ONNX exporter kept for Whisper) pins transformers<4.58
while distil runs transformers 5: the process puts the exporter's own transformers first on its path
(onnx_export.exporter_env), so it imports nothing of distil's but this file.

    export SOURCE OUT QUANTIZATION   the graphs of SOURCE (a Hugging Face Whisper directory) into OUT/onnx/;
                                     the exporter's versions as JSON on stdout
    transcribe DIR FEATURES.npy MAX_NEW_TOKENS
                                     greedy token ids of ORTModelForSpeechSeq2Seq on the log-mel FEATURES, as
                                     JSON on stdout (end-of-text and padding dropped)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

TASK = "automatic-speech-recognition-with-past"  # encoder, decoder and decoder-with-past graphs
GRAPHS = ("encoder_model", "decoder_model_merged")  # what transformers.js and ORTModelForSpeechSeq2Seq load
# transformers.js picks a variant by its file-name suffix (its `dtype` option: fp32, fp16, int8).
SUFFIXES = {"float32": "", "float16": "_fp16", "int8": "_int8"}


def export(source: Path, out: Path, quantization: str) -> None:
    from optimum.exporters.onnx import main_export

    onnx_dir = out / "onnx"
    onnx_dir.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="fp32-", dir=out) as tmp:
        fp32 = Path(tmp)
        # optimum's exporter traces the three graphs, merges the two decoders (decoder_model_merged.onnx) and
        # checks each graph's outputs against PyTorch's on example inputs (do_validation).
        main_export(str(source), fp32, task=TASK, device="cpu")
        suffix = SUFFIXES[quantization]
        if quantization == "float32":
            for graph in GRAPHS:
                _move_graph(fp32, graph, onnx_dir / f"{graph}{suffix}.onnx")
        elif quantization == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            for graph in GRAPHS:
                # Dynamic quantization: int8 weights of the matrix products, activations quantized at run time.
                # Only MatMul/Gemm: the encoder's two input convolutions hold about 1% of the weights
                # (tiny: 0.5 M of 39 M), so they stay float and read the log-mel exactly.
                quantize_dynamic(
                    fp32 / f"{graph}.onnx",
                    onnx_dir / f"{graph}{suffix}.onnx",
                    weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm"],
                    use_external_data_format=_is_large(fp32, graph),
                )
        else:
            _float16(fp32, onnx_dir, suffix)
    # Load it once as it will be run, so an export that does not load never appears complete.
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq

    ORTModelForSpeechSeq2Seq.from_pretrained(out)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("optimum-onnx", "transformers", "onnxruntime")}


def _float16(fp32: Path, onnx_dir: Path, suffix: str) -> None:
    """float16 weights and activations, float32 inputs and outputs (transformers.js feeds float32 features).

    ONNX Runtime's converter mistypes the If branches of the merged decoder, so the decoder and the
    decoder-with-past are converted apart and merged again with optimum's own merge; the casts the converter
    adds at the inputs come last in its node list, which a branch may not have: each graph is sorted first."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel
    from optimum.onnx.graph_transformations import merge_decoders

    def half(graph: str) -> onnx.ModelProto:
        model = OnnxModel(convert_float_to_float16(onnx.load(fp32 / f"{graph}.onnx"), keep_io_types=True))
        model.topological_sort()
        return model.model

    _save(half("encoder_model"), onnx_dir / f"encoder_model{suffix}.onnx", _is_large(fp32, "encoder_model"))
    # The merge saves it, with its weights beside it (<name>.onnx_data) when the exporter had to.
    os.environ["FORCE_ONNX_EXTERNAL_DATA"] = "1" if _is_large(fp32, "decoder_model") else "0"
    # strict=False: the first-step decoder also outputs the cross-attention cache, the with-past one does not.
    merge_decoders(
        half("decoder_model"),
        half("decoder_with_past_model"),
        save_path=onnx_dir / f"decoder_model_merged{suffix}.onnx",
        strict=False,
    )


def _is_large(directory: Path, graph: str) -> bool:
    """Whether optimum wrote `graph`'s weights beside it (over protobuf's 2 GB: large-v3's decoder)."""
    return any(directory.glob(f"{graph}.onnx_data*"))


def _save(model, path: Path, external: bool) -> None:
    import onnx

    if external:  # one weights file beside the graph, as optimum and transformers.js name it
        onnx.save(model, path, save_as_external_data=True, location=f"{path.name}_data")
    else:
        onnx.save(model, path)


def _move_graph(src_dir: Path, graph: str, dest: Path) -> None:
    shutil.move(src_dir / f"{graph}.onnx", dest)
    for data in src_dir.glob(f"{graph}.onnx_data*"):  # external weights keep the name the graph refers to
        shutil.move(data, dest.parent / data.name)


def transcribe(model_dir: Path, features: Path, max_new_tokens: int) -> list[list[int]]:
    import numpy as np
    import torch
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq

    model = ORTModelForSpeechSeq2Seq.from_pretrained(model_dir)
    feats = torch.from_numpy(np.load(features))
    with torch.inference_mode():
        out = model.generate(feats, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
    eot = model.generation_config.eos_token_id
    # Whisper's generate returns the generated tokens only (its prompt stripped), padded with end-of-text.
    return [[int(t) for t in row if int(t) != eot] for row in out.tolist()]


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "export":
        export(Path(args[0]), Path(args[1]), args[2])
        print(json.dumps(versions()))  # what distil_export.json records
    elif command == "transcribe":
        print(json.dumps(transcribe(Path(args[0]), Path(args[1]), int(args[2]))))
    else:
        raise SystemExit(f"unknown command {command!r}: export or transcribe")


if __name__ == "__main__":
    main(sys.argv[1:])
